//! The reset control register at port 0xcf9 (`ports::RESET_REG`), which the FADT names as
//! `RESET_REG` with `RESET_VALUE` 0x06. Bit 2 (reset CPU) asks for a reset; bits 1..=3 read
//! back as last written.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{GuestRequest, GuestRequestSink, PioDevice};

/// Bit 2: reset the CPU.
const RST_CPU: u8 = 1 << 2;
/// Bits that read back: SYS_RST (1), RST_CPU (2), FULL_RST (3).
const READABLE: u8 = 0x0e;

/// Saved state of [`ResetDevice`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetState {
    /// The readable bits of the last value written.
    pub value: u8,
}

/// Reset control register: one port.
pub struct ResetDevice {
    value: u8,
    requests: Arc<dyn GuestRequestSink>,
}

impl ResetDevice {
    /// A reset register that sends `GuestRequest::Reset` to `requests`.
    pub fn new(requests: Arc<dyn GuestRequestSink>) -> Self {
        Self { value: 0, requests }
    }

    /// The register's state.
    pub fn save(&self) -> ResetState {
        ResetState { value: self.value }
    }

    /// Puts back a saved state.
    pub fn restore(&mut self, state: &ResetState) -> Result<(), crate::StateError> {
        self.value = state.value & READABLE;
        Ok(())
    }
}

impl PioDevice for ResetDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0xff);
        if offset == 0 {
            if let Some(b) = data.first_mut() {
                *b = self.value;
            }
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        // Only the first byte lands on our port; the rest belong to 0xcfa.. (not ours).
        let Some(&value) = data.first().filter(|_| offset == 0) else {
            return;
        };
        self.value = value & READABLE;
        if value & RST_CPU != 0 {
            self.requests.guest_request(GuestRequest::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Requests, ODD_OFFSETS, SIZES};
    use ferro_arch::layout::ports;

    fn dev() -> (ResetDevice, Arc<Requests>) {
        let req = Arc::new(Requests::default());
        (ResetDevice::new(req.clone()), req)
    }

    #[test]
    fn reset_value_resets() {
        let (mut d, req) = dev();
        d.write(0, &[ports::RESET_VALUE]);
        assert_eq!(req.taken(), vec![GuestRequest::Reset]);
        let mut b = [0];
        d.read(0, &mut b);
        assert_eq!(b, [0x06]);
    }

    #[test]
    fn writes_without_bit_2_only_latch() {
        let (mut d, req) = dev();
        for v in [0x00, 0x02, 0x08, 0x0a, 0xf1, 0xfb] {
            d.write(0, &[v]);
            let mut b = [0];
            d.read(0, &mut b);
            assert_eq!(b, [v & 0x0e]);
        }
        assert!(req.taken().is_empty());
        d.write(0, &[0xff]);
        assert_eq!(req.taken(), vec![GuestRequest::Reset]);
    }

    #[test]
    fn wide_access_uses_the_first_byte() {
        let (mut d, req) = dev();
        d.write(0, &[0x02, 0x06, 0x06, 0x06]);
        assert!(req.taken().is_empty());
        let mut w = [0; 4];
        d.read(0, &mut w);
        assert_eq!(w, [0x02, 0xff, 0xff, 0xff]);
        d.write(0, &[0x06, 0]);
        assert_eq!(req.taken(), vec![GuestRequest::Reset]);
    }

    #[test]
    fn any_offset_and_size_is_safe() {
        let (mut d, req) = dev();
        for &offset in ODD_OFFSETS.iter().filter(|&&o| o != 0) {
            for &size in SIZES {
                d.write(offset, &vec![0x06; size]);
                let mut data = vec![0; size];
                d.read(offset, &mut data);
                assert!(data.iter().all(|&b| b == 0xff));
            }
        }
        d.write(0, &[]);
        d.read(0, &mut []);
        assert!(req.taken().is_empty());
    }

    #[test]
    fn save_restore() {
        let (mut d, _) = dev();
        d.write(0, &[0x0a]);
        let s = d.save();
        let (mut d2, _) = dev();
        d2.restore(&s).unwrap();
        let mut b = [0];
        d2.read(0, &mut b);
        assert_eq!(b, [0x0a]);
        d2.restore(&ResetState { value: 0xff }).unwrap();
        d2.read(0, &mut b);
        assert_eq!(b, [0x0e]);
    }
}
