//! Vectored I/O into memory this process does not own exclusively (a guest's RAM): the
//! [`IoVec`] type, `preadv`/`pwritev` loops, and the bounce path for backends (and
//! alignments) that cannot take such memory directly.
//!
//! Guest RAM may change under us while a request runs (a guest may touch a buffer it handed
//! to the device). That is fine for I/O, where the result is simply what the guest raced for,
//! but it rules out Rust references to it: this module only passes the addresses to the
//! kernel or copies bytes with raw pointer copies, never forms a `&[u8]` over an [`IoVec`].
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::error::DiskError;
use crate::BlockBackend;

/// One piece of memory for a vectored transfer: `len` bytes at `ptr` in this process.
#[derive(Debug, Clone, Copy)]
pub struct IoVec {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: an IoVec is an address and a length; whoever made it promised (see `new`) that the
// memory stays mapped while it is used, from whichever thread.
unsafe impl Send for IoVec {}
// SAFETY: as above; shared IoVecs are only read (address and length).
unsafe impl Sync for IoVec {}

impl IoVec {
    /// Describes `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must be mapped readable and writable in this process for as long as
    /// the IoVec (or a copy) is used in a transfer. Others may read or write that memory
    /// concurrently (transfers then see or leave racy bytes, never undefined behaviour, as they
    /// only go through the kernel and raw copies), but nothing may hold a Rust reference to it
    /// while a transfer runs.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        Self { ptr, len }
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.ptr as usize
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Total bytes of `iov`.
pub(crate) fn total(iov: &[IoVec]) -> u64 {
    iov.iter().map(|v| v.len as u64).sum()
}

/// Copies `src` into the stream `iov` from stream offset `at`.
fn copy_to(iov: &[IoVec], mut at: usize, mut src: &[u8]) {
    for v in iov {
        if src.is_empty() {
            return;
        }
        if at >= v.len {
            at -= v.len;
            continue;
        }
        let n = (v.len - at).min(src.len());
        // SAFETY: `v` is mapped writable for `v.len` bytes (IoVec::new's contract) and
        // `at + n <= v.len`; `src` is our own buffer, which cannot overlap guest memory.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), v.ptr.add(at), n) };
        src = &src[n..];
        at = 0;
    }
}

/// Copies from the stream `iov` at stream offset `at` into `dst`.
fn copy_from(iov: &[IoVec], mut at: usize, mut dst: &mut [u8]) {
    for v in iov {
        if dst.is_empty() {
            return;
        }
        if at >= v.len {
            at -= v.len;
            continue;
        }
        let n = (v.len - at).min(dst.len());
        // SAFETY: `v` is mapped readable for `v.len` bytes (IoVec::new's contract) and
        // `at + n <= v.len`; `dst` is our own buffer, which cannot overlap guest memory.
        unsafe { std::ptr::copy_nonoverlapping(v.ptr.add(at), dst.as_mut_ptr(), n) };
        dst = &mut dst[n..];
        at = 0;
    }
}

/// Writes zeros into the stream `iov` from stream offset `at` to its end.
pub(crate) fn zero_from(iov: &[IoVec], mut at: usize) {
    for v in iov {
        if at >= v.len {
            at -= v.len;
            continue;
        }
        // SAFETY: `v` is mapped writable for `v.len` bytes (IoVec::new's contract), at < v.len.
        unsafe { std::ptr::write_bytes(v.ptr.add(at), 0, v.len - at) };
        at = 0;
    }
}

/// Bytes of the bounce buffer: the most one bounced disk call moves.
pub const BOUNCE: usize = 512 * 1024;
/// Alignment of the bounce buffer (what O_DIRECT asks of any device we meet).
const BOUNCE_ALIGN: usize = 4096;

thread_local! {
    /// One aligned bounce buffer per thread, made at its first bounce.
    static BOUNCE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's aligned bounce buffer of [`BOUNCE`] bytes.
fn with_bounce<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    BOUNCE_BUF.with(|b| {
        let mut b = b.borrow_mut();
        if b.is_empty() {
            b.resize(BOUNCE + BOUNCE_ALIGN, 0);
        }
        let start = b.as_ptr().align_offset(BOUNCE_ALIGN).min(BOUNCE_ALIGN);
        f(&mut b[start..start + BOUNCE])
    })
}

/// [`BlockBackend::read_vectored`] through a bounce buffer: `read_at` in chunks of at most
/// [`BOUNCE`] bytes, each copied out to `iov`.
pub fn bounce_read<B: BlockBackend + ?Sized>(
    disk: &B,
    iov: &[IoVec],
    offset: u64,
) -> Result<(), DiskError> {
    let len = total(iov);
    with_bounce(|buf| {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(BOUNCE as u64) as usize;
            disk.read_at(&mut buf[..n], offset + done)?;
            copy_to(iov, done as usize, &buf[..n]);
            done += n as u64;
        }
        Ok(())
    })
}

/// [`BlockBackend::write_vectored`] through a bounce buffer: each chunk of at most
/// [`BOUNCE`] bytes copied in from `iov`, then `write_at`.
pub fn bounce_write<B: BlockBackend + ?Sized>(
    disk: &B,
    iov: &[IoVec],
    offset: u64,
) -> Result<(), DiskError> {
    let len = total(iov);
    with_bounce(|buf| {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(BOUNCE as u64) as usize;
            copy_from(iov, done as usize, &mut buf[..n]);
            disk.write_at(&buf[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    })
}

/// Most iovecs one system call takes (Linux's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// `preadv` (or `pwritev` when `write`) of the whole stream `iov` at `offset` on `file`,
/// repeated after short transfers and EINTR. Returns the bytes moved: less than the stream
/// only when a read meets the end of the file. A write that moves nothing is an error.
pub(crate) fn transfer(file: &File, iov: &[IoVec], offset: u64, write: bool) -> io::Result<u64> {
    let mut v: Vec<libc::iovec> = iov
        .iter()
        .filter(|x| x.len > 0)
        .map(|x| libc::iovec {
            iov_base: x.ptr.cast(),
            iov_len: x.len,
        })
        .collect();
    let mut first = 0usize;
    let mut done = 0u64;
    while first < v.len() {
        let cnt = (v.len() - first).min(IOV_MAX) as libc::c_int;
        let Ok(off) = libc::off_t::try_from(offset + done) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let p = v[first..].as_ptr();
        // SAFETY: `p` points at `cnt` initialised iovecs of `v`, alive for the call; each
        // describes memory mapped for its length (IoVec::new's contract). The kernel reads or
        // writes only that memory, and only during the call; the descriptor is `file`'s, open
        // for the call.
        let rc = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), p, cnt, off)
            } else {
                libc::preadv(file.as_raw_fd(), p, cnt, off)
            }
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            if write {
                return Err(io::ErrorKind::WriteZero.into());
            }
            break;
        }
        let mut n = rc as usize;
        done += n as u64;
        while n > 0 {
            let cur = &mut v[first];
            if n >= cur.iov_len {
                n -= cur.iov_len;
                first += 1;
            } else {
                // SAFETY: n < iov_len: the new base stays inside the same iovec's memory.
                cur.iov_base = unsafe { cur.iov_base.cast::<u8>().add(n) }.cast();
                cur.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(done)
}
