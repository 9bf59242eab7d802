//! The port I/O bus: ranges of the 64 KiB port space, each claimed by one device.
//!
//! Lookups are a binary search over ranges sorted by base: no allocation and no hashing on the
//! vCPU exit path. Devices are `Arc<Mutex<dyn PioDevice>>` so the VMM can keep its own handle
//! (to feed the serial port, press the power button) while vCPU threads dispatch accesses.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::PioDevice;

/// Why a device could not be inserted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The range is empty.
    #[error("empty port range at {base:#x}")]
    EmptyRange {
        /// First port of the range.
        base: u16,
    },
    /// The range runs past port 0xffff.
    #[error("port range {base:#x}+{len:#x} runs past 0xffff")]
    PastEnd {
        /// First port of the range.
        base: u16,
        /// Length of the range.
        len: u16,
    },
    /// The range overlaps one already on the bus.
    #[error("port range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x}")]
    Overlap {
        /// First port of the new range.
        base: u16,
        /// Length of the new range.
        len: u16,
        /// First port of the range already inserted.
        other_base: u16,
        /// Length of the range already inserted.
        other_len: u16,
    },
}

struct Range {
    base: u16,
    len: u16,
    dev: Arc<Mutex<dyn PioDevice>>,
}

impl Range {
    /// One past the last port, as u32 so a range ending at 0xffff does not overflow.
    fn end(&self) -> u32 {
        u32::from(self.base) + u32::from(self.len)
    }
}

/// Port I/O bus. Build it once, then share it (`Arc<PioBus>`) among vCPU threads.
#[derive(Default)]
pub struct PioBus {
    /// Sorted by base; ranges never overlap.
    ranges: Vec<Range>,
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `dev` at ports `base..base + len`; it will see offsets `0..len`.
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        dev: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::EmptyRange { base });
        }
        let new = Range { base, len, dev };
        if new.end() > 0x1_0000 {
            return Err(BusError::PastEnd { base, len });
        }
        // The first range starting after `base`; only it and the one before it can overlap.
        let idx = self.ranges.partition_point(|r| r.base <= base);
        let prev = idx.checked_sub(1).and_then(|i| self.ranges.get(i));
        let overlapping = prev.filter(|p| p.end() > u32::from(base)).or_else(|| {
            self.ranges
                .get(idx)
                .filter(|n| u32::from(n.base) < new.end())
        });
        if let Some(other) = overlapping {
            return Err(BusError::Overlap {
                base,
                len,
                other_base: other.base,
                other_len: other.len,
            });
        }
        self.ranges.insert(idx, new);
        Ok(())
    }

    /// Reads `data.len()` bytes at `port` from the device that claims it. Returns false when no
    /// device claims the port (the caller then fills reads with 0xff).
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some((offset, dev)) => {
                // A device fills every byte; this keeps a careless one from leaking stale bytes.
                data.fill(0xff);
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes `data` at `port` to the device that claims it. Returns false when no device
    /// claims the port.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }

    /// The device claiming `port` and the port's offset in its range.
    fn find(&self, port: u16) -> Option<(u16, &Arc<Mutex<dyn PioDevice>>)> {
        let idx = self.ranges.partition_point(|r| r.base <= port);
        let r = self.ranges.get(idx.checked_sub(1)?)?;
        (u32::from(port) < r.end()).then(|| (port - r.base, &r.dev))
    }
}

/// Locks a device. A poisoned lock only means another vCPU thread panicked inside the device
/// (release builds abort instead); the device state is still the best we have, so use it.
fn lock<'a>(dev: &'a Mutex<dyn PioDevice + 'static>) -> MutexGuard<'a, dyn PioDevice + 'static> {
    dev.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access and reads back `tag + offset + i` for byte `i`.
    #[derive(Default)]
    struct Probe {
        tag: u8,
        last_write: Option<(u16, Vec<u8>)>,
        last_read: Option<(u16, usize)>,
    }

    impl PioDevice for Probe {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            self.last_read = Some((offset, data.len()));
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.tag.wrapping_add(offset as u8).wrapping_add(i as u8);
            }
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn probe(tag: u8) -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe {
            tag,
            ..Default::default()
        }))
    }

    #[test]
    fn routes_by_range_with_relative_offsets() {
        let mut bus = PioBus::new();
        let a = probe(0x10);
        let b = probe(0x40);
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x60, 5, b.clone()).unwrap();

        for size in [1, 2, 4] {
            let mut data = vec![0; size];
            assert!(bus.read(0x3fa, &mut data));
            let want: Vec<u8> = (0..size as u8).map(|i| 0x12 + i).collect();
            assert_eq!(data, want);
            assert_eq!(a.lock().unwrap().last_read, Some((2, size)));

            assert!(bus.write(0x64, &data));
            assert_eq!(b.lock().unwrap().last_write, Some((4, data.clone())));
        }
    }

    #[test]
    fn boundaries_of_a_range() {
        let mut bus = PioBus::new();
        let a = probe(0);
        bus.insert(0x70, 2, a.clone()).unwrap();
        let mut d = [0u8; 1];
        assert!(!bus.read(0x6f, &mut d));
        assert!(bus.read(0x70, &mut d));
        assert!(bus.read(0x71, &mut d));
        assert_eq!(d, [1]);
        assert!(!bus.read(0x72, &mut d));
        assert!(!bus.write(0x72, &[0]));
        assert!(!bus.write(0x6f, &[0]));
        // A wide access starting on the last port goes to the device, which handles the rest.
        let mut d4 = [0u8; 4];
        assert!(bus.read(0x71, &mut d4));
        assert_eq!(a.lock().unwrap().last_read, Some((1, 4)));
    }

    #[test]
    fn unclaimed_ports_are_reported_and_left_alone() {
        let bus = PioBus::new();
        let mut d = [0x12u8, 0x34];
        assert!(!bus.read(0x80, &mut d));
        assert_eq!(d, [0x12, 0x34], "the caller fills unclaimed reads");
        assert!(!bus.write(0, &[1]));
        assert!(!bus.write(0xffff, &[1, 2, 3, 4]));
    }

    #[test]
    fn overlaps_are_refused() {
        let mut bus = PioBus::new();
        bus.insert(0x100, 0x10, probe(0)).unwrap();
        let cases = [
            (0x100, 0x10),
            (0x0f8, 0x09),
            (0x10f, 0x01),
            (0x104, 0x02),
            (0x0f0, 0x40),
        ];
        for (base, len) in cases {
            assert_eq!(
                bus.insert(base, len, probe(0)),
                Err(BusError::Overlap {
                    base,
                    len,
                    other_base: 0x100,
                    other_len: 0x10
                }),
                "{base:#x}+{len:#x}"
            );
        }
        // Adjacent ranges on both sides are fine.
        bus.insert(0x0f8, 8, probe(0)).unwrap();
        bus.insert(0x110, 1, probe(0)).unwrap();
        // Filling a gap exactly is fine too.
        bus.insert(0x111, 0xef, probe(0)).unwrap();
        assert!(bus.insert(0x1ff, 2, probe(0)).is_err());
    }

    #[test]
    fn overlap_with_a_later_range_is_refused() {
        let mut bus = PioBus::new();
        bus.insert(0x200, 4, probe(0)).unwrap();
        bus.insert(0x100, 4, probe(0)).unwrap();
        assert!(matches!(
            bus.insert(0x1f0, 0x11, probe(0)),
            Err(BusError::Overlap {
                other_base: 0x200,
                ..
            })
        ));
    }

    #[test]
    fn empty_and_past_the_end_ranges_are_refused() {
        let mut bus = PioBus::new();
        assert_eq!(
            bus.insert(0x10, 0, probe(0)),
            Err(BusError::EmptyRange { base: 0x10 })
        );
        assert_eq!(
            bus.insert(0xfff0, 0x11, probe(0)),
            Err(BusError::PastEnd {
                base: 0xfff0,
                len: 0x11
            })
        );
        // The very last port can be claimed.
        bus.insert(0xfff0, 0x10, probe(0)).unwrap();
        let mut d = [0u8; 2];
        assert!(bus.read(0xffff, &mut d));
        assert!(!bus.read(0xffef, &mut d));
        // And the very first.
        bus.insert(0, 1, probe(0)).unwrap();
        assert!(bus.read(0, &mut d));
        assert!(!bus.read(1, &mut d));
    }

    #[test]
    fn many_ranges_each_port_goes_to_its_owner() {
        let mut bus = PioBus::new();
        // Blocks of 4 ports every 8, inserted out of order.
        let order = [7u16, 0, 3, 15, 9, 1, 12, 5];
        for &i in &order {
            bus.insert(i * 8, 4, probe(i as u8)).unwrap();
        }
        for port in 0..0x80u16 {
            let mut d = [0u8];
            let claimed = bus.read(port, &mut d);
            let block = port / 8;
            let want = order.contains(&block) && port % 8 < 4;
            assert_eq!(claimed, want, "port {port:#x}");
            if want {
                assert_eq!(d[0], block as u8 + (port % 8) as u8);
            }
        }
    }

    #[test]
    fn poisoned_device_still_answers() {
        let mut bus = PioBus::new();
        let a = probe(5);
        bus.insert(0x10, 1, a.clone()).unwrap();
        let a2 = a.clone();
        let _ = std::thread::spawn(move || {
            let _guard = a2.lock().unwrap();
            panic!("poison the lock");
        })
        .join();
        assert!(a.is_poisoned());
        let mut d = [0u8];
        assert!(bus.read(0x10, &mut d));
        assert_eq!(d, [5]);
    }

    #[test]
    fn bus_prefills_reads() {
        struct Lazy;
        impl PioDevice for Lazy {
            fn read(&mut self, _: u16, _: &mut [u8]) {}
            fn write(&mut self, _: u16, _: &[u8]) {}
        }
        let mut bus = PioBus::new();
        bus.insert(0x10, 1, Arc::new(Mutex::new(Lazy))).unwrap();
        let mut d = [0u8; 4];
        assert!(bus.read(0x10, &mut d));
        assert_eq!(d, [0xff; 4]);
    }
}
