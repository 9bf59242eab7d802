//! A device that swallows writes and reads 0xff: the POST port 0x80 (written by firmware and
//! kernels as a delay), and ports we want to answer cheaply in the VMM instead of leaving them
//! unclaimed, such as the absent COM2-4 at 0x2f8, 0x3e8 and 0x2e8, which Linux probes.

use crate::PioDevice;

/// Ignores writes; every read returns 0xff, as an empty ISA bus would.
#[derive(Debug, Default, Clone, Copy)]
pub struct SinkDevice;

impl SinkDevice {
    /// A new sink.
    pub fn new() -> Self {
        Self
    }
}

impl PioDevice for SinkDevice {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u16, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ODD_OFFSETS, SIZES};

    #[test]
    fn reads_ff_and_ignores_writes() {
        let mut dev = SinkDevice::new();
        for &offset in ODD_OFFSETS {
            for &size in SIZES {
                dev.write(offset, &vec![0x5a; size]);
                let mut data = vec![0; size];
                dev.read(offset, &mut data);
                assert!(data.iter().all(|&b| b == 0xff));
            }
        }
    }

    #[test]
    fn answers_absent_com_ports_on_the_bus() {
        use crate::PioBus;
        use std::sync::{Arc, Mutex};
        let mut bus = PioBus::new();
        for base in [0x2f8, 0x3e8, 0x2e8] {
            bus.insert(base, 8, Arc::new(Mutex::new(SinkDevice)))
                .unwrap();
        }
        bus.insert(
            ferro_arch::layout::ports::POST,
            1,
            Arc::new(Mutex::new(SinkDevice)),
        )
        .unwrap();
        let mut lsr = [0];
        assert!(bus.read(0x2fd, &mut lsr));
        assert_eq!(lsr, [0xff]);
        assert!(bus.write(0x80, &[0x12]));
    }
}
