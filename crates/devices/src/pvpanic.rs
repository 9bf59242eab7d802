//! The pvpanic device at port 0x505 (`ports::PVPANIC`, ACPI id `QEMU0001`). A read returns the
//! events the device supports: PANICKED (bit 0) and CRASH_LOADED (bit 1). A guest writes bit 0
//! when its kernel panics; bit 1 says a crash kernel was loaded (kdump), which we ignore.

use std::sync::Arc;

use crate::{GuestRequest, GuestRequestSink, PioDevice};

/// The guest kernel panicked.
const PANICKED: u8 = 1 << 0;
/// A crash kernel is loaded and will take over (informational).
const CRASH_LOADED: u8 = 1 << 1;

/// pvpanic: one port, no state.
pub struct PvPanicDevice {
    requests: Arc<dyn GuestRequestSink>,
}

impl PvPanicDevice {
    /// A pvpanic device that sends `GuestRequest::Panic` to `requests`.
    pub fn new(requests: Arc<dyn GuestRequestSink>) -> Self {
        Self { requests }
    }
}

impl PioDevice for PvPanicDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0xff);
        if offset == 0 {
            if let Some(b) = data.first_mut() {
                *b = PANICKED | CRASH_LOADED;
            }
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset != 0 {
            return;
        }
        if data.first().is_some_and(|&v| v & PANICKED != 0) {
            self.requests.guest_request(GuestRequest::Panic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Requests, ODD_OFFSETS, SIZES};

    fn dev() -> (PvPanicDevice, Arc<Requests>) {
        let req = Arc::new(Requests::default());
        (PvPanicDevice::new(req.clone()), req)
    }

    #[test]
    fn reports_supported_events() {
        let (mut d, _) = dev();
        let mut b = [0];
        d.read(0, &mut b);
        assert_eq!(b, [0x03]);
        let mut w = [0; 2];
        d.read(0, &mut w);
        assert_eq!(w, [0x03, 0xff]);
    }

    #[test]
    fn bit_0_is_a_panic_bit_1_is_not() {
        let (mut d, req) = dev();
        d.write(0, &[CRASH_LOADED]);
        d.write(0, &[0]);
        d.write(0, &[0xfe]);
        assert!(req.taken().is_empty());
        d.write(0, &[PANICKED]);
        d.write(0, &[PANICKED | CRASH_LOADED]);
        assert_eq!(req.taken(), vec![GuestRequest::Panic; 2]);
    }

    #[test]
    fn any_offset_and_size_is_safe() {
        let (mut d, req) = dev();
        for &offset in ODD_OFFSETS.iter().filter(|&&o| o != 0) {
            for &size in SIZES {
                d.write(offset, &vec![0xff; size]);
                let mut data = vec![0; size];
                d.read(offset, &mut data);
                assert!(data.iter().all(|&b| b == 0xff));
            }
        }
        d.write(0, &[]);
        assert!(req.taken().is_empty());
        d.write(0, &[1, 0, 0, 0]);
        assert_eq!(req.taken(), vec![GuestRequest::Panic]);
    }
}
