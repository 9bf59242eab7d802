//! One host file under an image: positioned I/O with an optional O_DIRECT descriptor,
//! fdatasync, and fallocate for holes and zeroes.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{name, DiskError};
use crate::iovec::{self, IoVec};

/// Alignment of buffer address, length and offset for the O_DIRECT descriptor when the
/// kernel does not say (statx STATX_DIOALIGN, Linux 6.1): 4 KiB covers both 512-byte and
/// 4K-sector devices. Smaller or unaligned requests use the buffered descriptor.
const DIRECT_ALIGN: usize = 4096;

/// What O_DIRECT on `f` asks of buffer addresses, lengths and offsets: the larger of the
/// memory and offset alignments statx reports, else [`DIRECT_ALIGN`].
#[allow(unsafe_code)]
fn dio_align(f: &File) -> usize {
    // SAFETY: statx is plain old data; all zeros is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the call, the path is a NUL-terminated empty string
    // (AT_EMPTY_PATH: the descriptor itself), and `st` is a writable statx the kernel fills.
    let rc = unsafe {
        libc::statx(
            f.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    let (mem, off) = (
        st.stx_dio_mem_align as usize,
        st.stx_dio_offset_align as usize,
    );
    if rc != 0 || st.stx_mask & libc::STATX_DIOALIGN == 0 || mem == 0 || off == 0 {
        return DIRECT_ALIGN;
    }
    let a = mem.max(off);
    if a.is_power_of_two() && a <= DIRECT_ALIGN {
        a
    } else {
        DIRECT_ALIGN
    }
}

/// A host file. Reads and writes at an offset, from any thread, without a lock.
#[derive(Debug)]
pub(crate) struct DiskFile {
    name: String,
    file: File,
    /// The same file opened with O_DIRECT, when asked for and the filesystem allows it.
    direct: Option<File>,
    /// Cleared when the kernel refuses an O_DIRECT transfer we thought aligned.
    direct_ok: AtomicBool,
    /// What O_DIRECT asks of addresses, lengths and offsets (a power of two).
    align: usize,
    readonly: bool,
    dev: u64,
    ino: u64,
}

impl DiskFile {
    /// Opens `path`; `direct` adds an O_DIRECT descriptor if the filesystem supports it.
    pub(crate) fn open(path: &Path, readonly: bool, direct: bool) -> Result<Self, DiskError> {
        let name = name(path);
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(!readonly)
                .custom_flags(flags | libc::O_CLOEXEC)
                .open(path)
        };
        let file = open(0).map_err(|source| DiskError::Open {
            file: name.clone(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| DiskError::Io {
            file: name.clone(),
            op: "stat",
            source,
        })?;
        if meta.is_dir() {
            return Err(DiskError::Open {
                file: name,
                source: io::Error::from_raw_os_error(libc::EISDIR),
            });
        }
        // tmpfs and some FUSE filesystems refuse O_DIRECT with EINVAL: use buffered I/O there.
        let direct = if direct {
            open(libc::O_DIRECT).ok()
        } else {
            None
        };
        let align = direct.as_ref().map_or(DIRECT_ALIGN, dio_align);
        Ok(Self {
            name,
            file,
            align,
            direct_ok: AtomicBool::new(direct.is_some()),
            direct,
            readonly,
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn readonly(&self) -> bool {
        self.readonly
    }

    /// Device and inode: what makes two paths the same image.
    pub(crate) fn identity(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// A stable id of at most 20 bytes for VIRTIO_BLK_T_GET_ID.
    pub(crate) fn id(&self) -> String {
        let id = format!("{:x}-{:x}", self.dev, self.ino);
        if id.len() <= 20 {
            return id;
        }
        // FNV-1a over both numbers: 16 hex digits.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self
            .dev
            .to_le_bytes()
            .iter()
            .chain(self.ino.to_le_bytes().iter())
        {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// Current length of the file (or block device).
    pub(crate) fn len(&self) -> Result<u64, DiskError> {
        (&self.file)
            .seek(SeekFrom::End(0))
            .map_err(|e| self.io("seek", e))
    }

    pub(crate) fn io(&self, op: &'static str, source: io::Error) -> DiskError {
        DiskError::Io {
            file: self.name.clone(),
            op,
            source,
        }
    }

    pub(crate) fn corrupt(&self, reason: impl Into<String>) -> DiskError {
        DiskError::Corrupt {
            file: self.name.clone(),
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(&self, what: impl Into<String>) -> DiskError {
        DiskError::Unsupported {
            file: self.name.clone(),
            what: what.into(),
        }
    }

    pub(crate) fn readonly_error(&self) -> DiskError {
        DiskError::ReadOnly {
            file: self.name.clone(),
        }
    }

    fn direct_for(&self, ptr: usize, len: usize, offset: u64) -> Option<&File> {
        let aligned = ptr.is_multiple_of(self.align)
            && len.is_multiple_of(self.align)
            && offset.is_multiple_of(self.align as u64);
        if aligned && self.direct_ok.load(Ordering::Relaxed) {
            self.direct.as_ref()
        } else {
            None
        }
    }

    /// Reads until `buf` is full or the file ends; returns the bytes read.
    pub(crate) fn read_upto(&self, buf: &mut [u8], offset: u64) -> Result<usize, DiskError> {
        let mut done = 0;
        while done < buf.len() {
            let off = offset + done as u64;
            let rest = &mut buf[done..];
            let res = match self.direct_for(rest.as_ptr() as usize, rest.len(), off) {
                Some(d) => match d.read_at(rest, off) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        self.direct_ok.store(false, Ordering::Relaxed);
                        continue;
                    }
                    r => r,
                },
                None => self.file.read_at(rest, off),
            };
            match res {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io("read", e)),
            }
        }
        Ok(done)
    }

    /// Whether an O_DIRECT descriptor is in use.
    fn direct_on(&self) -> bool {
        self.direct.is_some() && self.direct_ok.load(Ordering::Relaxed)
    }

    /// The O_DIRECT descriptor when every piece of `iov` and `offset` meet its alignment.
    fn direct_vectored(&self, iov: &[IoVec], offset: u64) -> Option<&File> {
        let a = self.align;
        let aligned = offset.is_multiple_of(a as u64)
            && iov
                .iter()
                .all(|v| v.addr().is_multiple_of(a) && v.len().is_multiple_of(a));
        if aligned && self.direct_on() {
            self.direct.as_ref()
        } else {
            None
        }
    }

    /// The descriptor [`DiskFile::readv_zero_fill`] / [`DiskFile::writev_all`] would use for
    /// `iov` at `offset`; `None` when they would bounce.
    pub(crate) fn vectored_fd(&self, iov: &[IoVec], offset: u64) -> Option<RawFd> {
        match self.direct_vectored(iov, offset) {
            Some(d) => Some(d.as_raw_fd()),
            None if self.direct_on() => None,
            None => Some(self.file.as_raw_fd()),
        }
    }

    /// Reads into `iov` from `offset` without a copy: `preadv` on the O_DIRECT descriptor
    /// when `iov` meets its alignment, on the buffered one when there is no O_DIRECT one. The
    /// part past the end of the file reads as zeros. `Ok(false)`: O_DIRECT is on but `iov`
    /// cannot take it; the caller bounces through an aligned buffer instead.
    pub(crate) fn readv_zero_fill(&self, iov: &[IoVec], offset: u64) -> Result<bool, DiskError> {
        let file = match self.direct_vectored(iov, offset) {
            Some(d) => d,
            None if self.direct_on() => return Ok(false),
            None => &self.file,
        };
        match iovec::transfer(file, iov, offset, false) {
            Ok(n) => {
                iovec::zero_from(iov, n as usize);
                Ok(true)
            }
            // An alignment the kernel refuses after all: the aligned bounce buffer does it.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(e) => Err(self.io("read", e)),
        }
    }

    /// Writes `iov` at `offset` without a copy; see [`DiskFile::readv_zero_fill`].
    pub(crate) fn writev_all(&self, iov: &[IoVec], offset: u64) -> Result<bool, DiskError> {
        if self.readonly {
            return Err(self.readonly_error());
        }
        let file = match self.direct_vectored(iov, offset) {
            Some(d) => d,
            None if self.direct_on() => return Ok(false),
            None => &self.file,
        };
        match iovec::transfer(file, iov, offset, true) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(e) => Err(self.io("write", e)),
        }
    }

    /// Reads `buf.len()` bytes; the part past the end of the file reads as zeros.
    pub(crate) fn read_zero_fill(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let n = self.read_upto(buf, offset)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes; a short file is corrupt metadata (`what` names it).
    pub(crate) fn read_exact(
        &self,
        buf: &mut [u8],
        offset: u64,
        what: &str,
    ) -> Result<(), DiskError> {
        let n = self.read_upto(buf, offset)?;
        if n < buf.len() {
            return Err(self.corrupt(format!(
                "{what} at {offset:#x} ({} bytes) is past the end of the file",
                buf.len()
            )));
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`.
    pub(crate) fn write_all(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        if self.readonly {
            return Err(self.readonly_error());
        }
        let mut done = 0;
        while done < buf.len() {
            let off = offset + done as u64;
            let rest = &buf[done..];
            let res = match self.direct_for(rest.as_ptr() as usize, rest.len(), off) {
                Some(d) => match d.write_at(rest, off) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        self.direct_ok.store(false, Ordering::Relaxed);
                        continue;
                    }
                    r => r,
                },
                None => self.file.write_at(rest, off),
            };
            match res {
                Ok(0) => return Err(self.io("write", io::ErrorKind::WriteZero.into())),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io("write", e)),
            }
        }
        Ok(())
    }

    /// Writes `len` zero bytes at `offset`, 1 MiB at a time.
    pub(crate) fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write_all(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// fdatasync: written data and the metadata needed to read it back (size, extents) are
    /// durable. Syncing one descriptor covers writes made through the O_DIRECT one too.
    pub(crate) fn sync(&self) -> Result<(), DiskError> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| self.io("sync", e))
    }

    /// `fallocate(mode, offset, len)`; `Ok(false)` when the filesystem does not support it.
    #[allow(unsafe_code)]
    pub(crate) fn fallocate(&self, mode: i32, offset: u64, len: u64) -> Result<bool, DiskError> {
        if self.readonly {
            return Err(self.readonly_error());
        }
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Ok(false);
        };
        loop {
            // SAFETY: fallocate takes only integers: a descriptor that `self.file` owns and keeps
            // open for the duration of the call, a mode, and an in-range offset and length. It
            // touches no memory of this process.
            let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, n) };
            if rc == 0 {
                return Ok(true);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                    return Ok(false)
                }
                _ => return Err(self.io("fallocate", e)),
            }
        }
    }
}
