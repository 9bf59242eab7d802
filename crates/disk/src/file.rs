//! One host file under an image: positioned I/O with an optional O_DIRECT descriptor,
//! fdatasync, and fallocate for holes and zeroes.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{name, DiskError};

/// Alignment of buffer address, length and offset for the O_DIRECT descriptor. 4 KiB covers
/// both 512-byte and 4K-sector devices; smaller or unaligned requests use the buffered one.
const DIRECT_ALIGN: usize = 4096;

/// A host file. Reads and writes at an offset, from any thread, without a lock.
#[derive(Debug)]
pub(crate) struct DiskFile {
    name: String,
    file: File,
    /// The same file opened with O_DIRECT, when asked for and the filesystem allows it.
    direct: Option<File>,
    /// Cleared when the kernel refuses an O_DIRECT transfer we thought aligned.
    direct_ok: AtomicBool,
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
        Ok(Self {
            name,
            file,
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
        let aligned = ptr.is_multiple_of(DIRECT_ALIGN)
            && len.is_multiple_of(DIRECT_ALIGN)
            && offset.is_multiple_of(DIRECT_ALIGN as u64);
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
            use std::os::fd::AsRawFd;
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
