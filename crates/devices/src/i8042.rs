//! Just enough of the i8042 keyboard controller to reset the machine: data port 0x60 and
//! status/command port 0x64 (`ports::I8042_DATA`, `ports::I8042_CMD`), inserted as one range at
//! base 0x60 with length 5. Status reads 0 (output buffer empty, input buffer empty, so a guest
//! waiting to send a command never spins), data reads 0, command 0xfe (pulse the reset line)
//! asks for a reset, and every other command is ignored. There is no keyboard or mouse.
//!
//! Ports 0x61..=0x63 fall inside the range without belonging to the controller; they read 0xff
//! and drop writes. (0x61 is the system control port B; KVM's in-kernel PIT normally answers
//! it before an exit reaches us. If it does not, 0xff keeps PIT polling loops from spinning.)

use std::sync::Arc;

use crate::{byte_offset, GuestRequest, GuestRequestSink, PioDevice};

/// Offset of the data port (0x60) from the base.
const DATA: u16 = 0;
/// Offset of the status/command port (0x64) from the base.
const STATUS_COMMAND: u16 = 4;
/// Command: pulse the output port's reset line.
const CMD_RESET: u8 = 0xfe;

/// The i8042 controller, reduced to its reset command. No state.
pub struct I8042Device {
    requests: Arc<dyn GuestRequestSink>,
}

impl I8042Device {
    /// A controller that sends `GuestRequest::Reset` to `requests`.
    pub fn new(requests: Arc<dyn GuestRequestSink>) -> Self {
        Self { requests }
    }
}

impl PioDevice for I8042Device {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match byte_offset(offset, i) {
                Some(DATA | STATUS_COMMAND) => 0,
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            if byte_offset(offset, i) == Some(STATUS_COMMAND) && v == CMD_RESET {
                self.requests.guest_request(GuestRequest::Reset);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Requests, ODD_OFFSETS, SIZES};
    use ferro_arch::layout::ports;

    fn dev() -> (I8042Device, Arc<Requests>) {
        let req = Arc::new(Requests::default());
        (I8042Device::new(req.clone()), req)
    }

    #[test]
    fn ports_match_the_layout() {
        assert_eq!(ports::I8042_DATA + DATA, 0x60);
        assert_eq!(ports::I8042_DATA + STATUS_COMMAND, ports::I8042_CMD);
    }

    #[test]
    fn command_fe_resets() {
        let (mut d, req) = dev();
        d.write(STATUS_COMMAND, &[CMD_RESET]);
        assert_eq!(req.taken(), vec![GuestRequest::Reset]);
    }

    #[test]
    fn other_commands_and_data_writes_are_ignored() {
        let (mut d, req) = dev();
        for v in 0..=0xffu8 {
            if v != CMD_RESET {
                d.write(STATUS_COMMAND, &[v]);
            }
            d.write(DATA, &[v]);
        }
        assert!(req.taken().is_empty());
    }

    #[test]
    fn status_and_data_read_zero() {
        let (mut d, _) = dev();
        let mut b = [0xaa];
        d.read(STATUS_COMMAND, &mut b);
        assert_eq!(b, [0]);
        b = [0xaa];
        d.read(DATA, &mut b);
        assert_eq!(b, [0]);
        let mut w = [0xaa; 4];
        d.read(1, &mut w);
        assert_eq!(w, [0xff, 0xff, 0xff, 0]);
    }

    #[test]
    fn a_wide_write_reaching_0x64_counts() {
        let (mut d, req) = dev();
        d.write(2, &[0, 0, CMD_RESET, 0]);
        assert_eq!(req.taken(), vec![GuestRequest::Reset]);
    }

    #[test]
    fn any_offset_and_size_is_safe() {
        let (mut d, req) = dev();
        for &offset in ODD_OFFSETS.iter().filter(|&&o| o > STATUS_COMMAND) {
            for &size in SIZES {
                d.write(offset, &vec![CMD_RESET; size]);
                let mut data = vec![0; size];
                d.read(offset, &mut data);
                assert!(data.iter().all(|&b| b == 0xff), "{offset:#x} {size}");
            }
        }
        assert!(req.taken().is_empty());
    }
}
