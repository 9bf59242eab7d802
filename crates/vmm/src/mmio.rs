//! The MMIO bus: guest-physical ranges outside RAM, each claimed by one handler.
//!
//! Built once before the vCPUs start and then only read, so lookups take no lock: a binary
//! search over ranges sorted by base. Handlers lock what they need themselves (the PCI root
//! routes BAR accesses to the device whose BAR decodes the address).

use std::sync::Arc;

/// A handler of MMIO accesses. `offset` is relative to the base the handler was inserted at.
pub trait MmioDevice: Send + Sync {
    /// Fills `data` (pre-filled with 0xff) with what the guest reads; returns false when
    /// nothing answers at that offset.
    fn read(&self, offset: u64, data: &mut [u8]) -> bool;
    /// Takes a guest write; returns false when nothing answers at that offset.
    fn write(&self, offset: u64, data: &[u8]) -> bool;
}

/// Why a range could not be inserted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MmioBusError {
    /// Empty range, or one that wraps past the end of the address space.
    #[error("MMIO range {base:#x}+{len:#x} is empty or wraps")]
    BadRange {
        /// First address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps one already on the bus.
    #[error("MMIO range {base:#x}+{len:#x} overlaps another")]
    Overlap {
        /// First address.
        base: u64,
        /// Length.
        len: u64,
    },
}

struct Range {
    base: u64,
    /// One past the last address.
    end: u64,
    dev: Arc<dyn MmioDevice>,
}

/// The MMIO bus.
#[derive(Default)]
pub struct MmioBus {
    ranges: Vec<Range>,
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims `base..base + len` for `dev`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<dyn MmioDevice>,
    ) -> Result<(), MmioBusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(MmioBusError::BadRange { base, len })?;
        let idx = self.ranges.partition_point(|r| r.base < base);
        let prev_overlaps = idx
            .checked_sub(1)
            .and_then(|i| self.ranges.get(i))
            .is_some_and(|p| p.end > base);
        let next_overlaps = self.ranges.get(idx).is_some_and(|n| n.base < end);
        if prev_overlaps || next_overlaps {
            return Err(MmioBusError::Overlap { base, len });
        }
        self.ranges.insert(idx, Range { base, end, dev });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<&Range> {
        let i = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        self.ranges.get(i).filter(|r| addr < r.end)
    }

    /// A guest read at `addr`; returns false when nothing claims it (the caller fills 0xff).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some(r) => {
                data.fill(0xff);
                r.dev.read(addr - r.base, data)
            }
            None => false,
        }
    }

    /// A guest write at `addr`; returns false when nothing claims it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some(r) => r.dev.write(addr - r.base, data),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Probe(u8, Mutex<Vec<(u64, Vec<u8>)>>);

    impl MmioDevice for Probe {
        fn read(&self, offset: u64, data: &mut [u8]) -> bool {
            data.fill(self.0.wrapping_add(offset as u8));
            true
        }
        fn write(&self, offset: u64, data: &[u8]) -> bool {
            self.1.lock().unwrap().push((offset, data.to_vec()));
            true
        }
    }

    fn probe(tag: u8) -> Arc<Probe> {
        Arc::new(Probe(tag, Mutex::new(Vec::new())))
    }

    #[test]
    fn routes_by_range() {
        let mut bus = MmioBus::new();
        let a = probe(0x10);
        bus.insert(0xe000_0000, 0x10_0000, a.clone()).unwrap();
        bus.insert(0xc000_0000, 0x2000_0000, probe(0x40)).unwrap();
        let mut d = [0u8; 4];
        assert!(bus.read(0xe000_0002, &mut d));
        assert_eq!(d, [0x12; 4]);
        assert!(bus.read(0xdfff_ffff, &mut d));
        assert!(!bus.read(0xe010_0000, &mut d));
        assert!(!bus.read(0xbfff_ffff, &mut d));
        assert!(bus.write(0xe00f_ffff, &[1]));
        assert_eq!(a.1.lock().unwrap()[0], (0xf_ffff, vec![1]));
        assert!(!bus.write(u64::MAX, &[1]));
    }

    #[test]
    fn bad_and_overlapping_ranges_are_refused() {
        let mut bus = MmioBus::new();
        bus.insert(0x1000, 0x1000, probe(0)).unwrap();
        assert!(bus.insert(0x1800, 0x1000, probe(0)).is_err());
        assert!(bus.insert(0x800, 0x1000, probe(0)).is_err());
        assert!(bus.insert(0x1000, 1, probe(0)).is_err());
        assert!(bus.insert(0x0, 0, probe(0)).is_err());
        assert!(bus.insert(u64::MAX, 2, probe(0)).is_err());
        bus.insert(0x2000, 0x10, probe(0)).unwrap();
        bus.insert(0x0, 0x1000, probe(0)).unwrap();
    }
}
