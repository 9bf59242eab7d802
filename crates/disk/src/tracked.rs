//! A disk that remembers which of its blocks the guest changed, for a copy of it that runs
//! while the guest keeps writing (storage migration: copy everything once, then again what
//! changed meanwhile, until little is left for the pause).
//!
//! [`Tracked`] wraps any [`BlockBackend`] and, while its [`WriteLog`] is on, sets the bit of
//! every [`TRACK_BLOCK`]-byte block a write, discard or write-zeroes touched — *after* the
//! call returned. A copier that takes (and clears) the bits before reading the blocks then
//! never misses a change: a write that completed before the take is in what it reads, one
//! that completes after sets its bit again for the next round. A write the block device
//! runs itself through io_uring on [`BlockBackend::vectored_fd`]'s descriptor is marked by
//! [`BlockBackend::wrote`], which it calls when the write has ended, before the guest is told,
//! so that write is ordered like one that passes through here.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::{BlockBackend, DiskError, IoVec};

/// Bytes per tracked block: a 4 KiB guest write costs a resend of this much.
pub const TRACK_BLOCK: u64 = 64 << 10;

/// Which blocks of a disk changed since the last [`WriteLog::take`].
#[derive(Debug)]
pub struct WriteLog {
    on: AtomicBool,
    bits: Vec<AtomicU64>,
    blocks: u64,
}

impl WriteLog {
    /// An empty, stopped log for a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        let blocks = size.div_ceil(TRACK_BLOCK);
        Self {
            on: AtomicBool::new(false),
            bits: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            blocks,
        }
    }

    /// Blocks of the disk.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Starts logging, with nothing marked.
    pub fn start(&self) {
        for w in &self.bits {
            w.store(0, Ordering::SeqCst);
        }
        self.on.store(true, Ordering::SeqCst);
    }

    /// Stops logging.
    pub fn stop(&self) {
        self.on.store(false, Ordering::SeqCst);
    }

    /// Whether the log is on.
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    /// Marks the blocks `[offset, offset + len)` touches (nothing while stopped).
    pub fn mark(&self, offset: u64, len: u64) {
        if !self.is_on() || len == 0 {
            return;
        }
        let first = offset / TRACK_BLOCK;
        let last =
            (offset.saturating_add(len - 1) / TRACK_BLOCK).min(self.blocks.saturating_sub(1));
        for b in first..=last {
            if let Some(w) = self.bits.get((b / 64) as usize) {
                w.fetch_or(1 << (b % 64), Ordering::SeqCst);
            }
        }
    }

    /// Blocks marked now.
    pub fn count(&self) -> u64 {
        self.bits
            .iter()
            .map(|w| u64::from(w.load(Ordering::SeqCst).count_ones()))
            .sum()
    }

    /// The marked blocks as a bitmap (bit `b % 64` of word `b / 64` for block `b`), cleared
    /// here in the same step.
    pub fn take(&self) -> Vec<u64> {
        self.bits
            .iter()
            .map(|w| w.swap(0, Ordering::SeqCst))
            .collect()
    }
}

/// A [`BlockBackend`] that logs its writes in a [`WriteLog`] (see the module docs).
pub struct Tracked {
    inner: Arc<dyn BlockBackend>,
    log: WriteLog,
}

impl Tracked {
    /// Wraps `inner`; its log starts stopped.
    pub fn new(inner: Arc<dyn BlockBackend>) -> Self {
        let log = WriteLog::new(inner.size());
        Self { inner, log }
    }

    /// The write log.
    pub fn log(&self) -> &WriteLog {
        &self.log
    }
}

fn iov_len(iov: &[IoVec]) -> u64 {
    iov.iter().map(|v| v.len() as u64).sum()
}

impl BlockBackend for Tracked {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        let r = self.inner.write_at(buf, offset);
        self.log.mark(offset, buf.len() as u64);
        r
    }

    fn read_vectored(&self, iov: &[IoVec], offset: u64) -> Result<(), DiskError> {
        self.inner.read_vectored(iov, offset)
    }

    fn write_vectored(&self, iov: &[IoVec], offset: u64) -> Result<(), DiskError> {
        let r = self.inner.write_vectored(iov, offset);
        self.log.mark(offset, iov_len(iov));
        r
    }

    fn vectored_fd(&self, iov: &[IoVec], offset: u64, write: bool) -> Option<RawFd> {
        self.inner.vectored_fd(iov, offset, write)
    }

    fn wrote(&self, offset: u64, len: u64) {
        self.inner.wrote(offset, len);
        self.log.mark(offset, len);
    }

    fn flush(&self) -> Result<(), DiskError> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let r = self.inner.discard(offset, len);
        self.log.mark(offset, len);
        r
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DiskError> {
        let r = self.inner.write_zeroes(offset, len, may_unmap);
        self.log.mark(offset, len);
        r
    }

    fn readonly(&self) -> bool {
        self.inner.readonly()
    }

    fn id(&self) -> String {
        self.inner.id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Mem(Mutex<Vec<u8>>);

    impl BlockBackend for Mem {
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
            let d = self.0.lock().unwrap();
            let o = offset as usize;
            buf.copy_from_slice(&d[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
            let mut d = self.0.lock().unwrap();
            let o = offset as usize;
            d[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> Result<(), DiskError> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> Result<(), DiskError> {
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> Result<(), DiskError> {
            self.write_at(&vec![0; len as usize], offset)
        }
        fn readonly(&self) -> bool {
            false
        }
        fn id(&self) -> String {
            "mem".into()
        }
    }

    fn disk(size: usize) -> Tracked {
        Tracked::new(Arc::new(Mem(Mutex::new(vec![0; size]))))
    }

    fn marked(bits: &[u64]) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in bits.iter().enumerate() {
            for b in 0..64 {
                if w & (1 << b) != 0 {
                    out.push(i as u64 * 64 + b);
                }
            }
        }
        out
    }

    #[test]
    fn logs_only_while_on_and_take_clears() {
        let d = disk(10 << 20);
        assert_eq!(d.log().blocks(), 160);
        d.write_at(&[1; 512], 0).unwrap();
        assert!(marked(&d.log().take()).is_empty(), "stopped log marked");
        d.log().start();
        d.write_at(&[1; 512], TRACK_BLOCK - 256).unwrap();
        d.write_zeroes(3 * TRACK_BLOCK, 1, false).unwrap();
        d.discard(159 * TRACK_BLOCK, TRACK_BLOCK).unwrap();
        d.write_at(&[7; 4096], 70 * TRACK_BLOCK + 4096).unwrap();
        assert_eq!(d.log().count(), 5);
        assert_eq!(marked(&d.log().take()), [0, 1, 3, 70, 159]);
        assert!(marked(&d.log().take()).is_empty());
        d.log().stop();
        d.write_at(&[1; 512], 0).unwrap();
        assert!(marked(&d.log().take()).is_empty());
    }

    #[test]
    fn a_range_past_the_end_marks_only_real_blocks() {
        let d = disk((TRACK_BLOCK * 2) as usize);
        d.log().start();
        d.log().mark(TRACK_BLOCK, u64::MAX);
        assert_eq!(marked(&d.log().take()), [1]);
    }

    #[test]
    fn a_write_run_elsewhere_is_marked_when_it_ends() {
        let d = disk((TRACK_BLOCK * 8) as usize);
        d.wrote(TRACK_BLOCK * 3, 512);
        d.log().start();
        assert!(marked(&d.log().take()).is_empty());
        d.wrote(TRACK_BLOCK * 3 + 10, TRACK_BLOCK);
        assert_eq!(marked(&d.log().take()), [3, 4]);
        d.log().stop();
        d.wrote(0, 512);
        assert!(marked(&d.log().take()).is_empty());
    }
}
