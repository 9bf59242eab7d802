//! Raw images: the file is the disk. Positioned I/O straight to the file, no lock.

use std::os::fd::RawFd;

use crate::error::DiskError;
use crate::file::DiskFile;
use crate::iovec::{bounce_read, bounce_write, total, IoVec};
use crate::{check_range, BlockBackend};

/// A raw image file or block device.
#[derive(Debug)]
pub(crate) struct Raw {
    file: DiskFile,
    size: u64,
}

impl Raw {
    pub(crate) fn new(file: DiskFile) -> Result<Self, DiskError> {
        let size = file.len()?;
        Ok(Self { file, size })
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.file.readonly() {
            return Err(self.file.readonly_error());
        }
        check_range(self.file.name(), offset, len, self.size)
    }
}

impl BlockBackend for Raw {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(self.file.name(), offset, buf.len() as u64, self.size)?;
        // A file truncated under us reads as zeros past its new end.
        self.file.read_zero_fill(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.check_write(offset, buf.len() as u64)?;
        self.file.write_all(buf, offset)
    }

    fn read_vectored(&self, iov: &[IoVec], offset: u64) -> Result<(), DiskError> {
        check_range(self.file.name(), offset, total(iov), self.size)?;
        if self.file.readv_zero_fill(iov, offset)? {
            return Ok(());
        }
        bounce_read(self, iov, offset)
    }

    fn write_vectored(&self, iov: &[IoVec], offset: u64) -> Result<(), DiskError> {
        self.check_write(offset, total(iov))?;
        if self.file.writev_all(iov, offset)? {
            return Ok(());
        }
        bounce_write(self, iov, offset)
    }

    fn vectored_fd(&self, iov: &[IoVec], offset: u64, write: bool) -> Option<RawFd> {
        let len = total(iov);
        let checked = if write {
            self.check_write(offset, len)
        } else {
            check_range(self.file.name(), offset, len, self.size)
        };
        checked.ok()?;
        self.file.vectored_fd(iov, offset)
    }

    fn flush(&self) -> Result<(), DiskError> {
        self.file.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // Discard is a hint: a filesystem without hole punching keeps the data.
        self.file.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )?;
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DiskError> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if may_unmap
            && self.file.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )?
        {
            return Ok(());
        }
        if self.file.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )? {
            return Ok(());
        }
        self.file.write_zero_bytes(offset, len)
    }

    fn readonly(&self) -> bool {
        self.file.readonly()
    }

    fn id(&self) -> String {
        self.file.id()
    }
}
