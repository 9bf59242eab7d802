//! Legacy PC devices as pure state machines, and the port I/O bus they sit on.
//!
//! Nothing here runs a thread or touches KVM. A device sees port accesses through [`PioDevice`],
//! raises interrupts through an injected [`EventFd`](vmm_sys_util::eventfd::EventFd) (which the
//! VMM registers as a KVM irqfd), and asks the machine to power off, reset or record a panic
//! through an injected [`GuestRequestSink`]. So every device is unit-tested without `/dev/kvm`.
//!
//! | module | device | ports (`ferro_arch::layout::ports`) | insert as |
//! | --- | --- | --- | --- |
//! | [`serial`] | 16550 UART (vm-superio), IRQ 4 | `COM1` 0x3f8 | base 0x3f8, len 8 |
//! | [`i8042`] | keyboard controller: reset only | `I8042_DATA` 0x60, `I8042_CMD` 0x64 | base 0x60, len 5 |
//! | [`cmos`] | MC146818 RTC + 128 bytes of CMOS RAM | `CMOS_INDEX` 0x70, data 0x71 | base 0x70, len 2 |
//! | [`acpi_pm`] | ACPI PM1a event/control blocks, PM timer, SCI on IRQ 9 | `PM1A_EVT_BLK` 0x600 | base 0x600, len `PM_BLK_LEN` (12) |
//! | [`reset`] | reset control register | `RESET_REG` 0xcf9 | base 0xcf9, len 1 |
//! | [`pvpanic`] | pvpanic (ACPI `QEMU0001`) | `PVPANIC` 0x505 | base 0x505, len 1 |
//! | [`sink`] | swallows writes, reads 0xff | `POST` 0x80, absent COM2-4 | anywhere |
//!
//! Guest input is never trusted: every device accepts an access of any size at any offset
//! relative to its base (including offsets past its end, which read as 0xff and drop writes),
//! and none of them panics on what a guest writes. An access wider than one byte is handled as
//! consecutive byte accesses at consecutive offsets, as on a PC's ISA bus, except for the ACPI
//! PM timer, which is sampled once per access so its bytes never tear.
//!
//! Every stateful device has `save(&self) -> State` and `restore(&mut self, &State)`, with plain
//! serde structs for the state; a restore checks what it is given and fails with [`StateError`]
//! instead of trusting it. Stateless devices (i8042, pvpanic, sink) have no state to save.

#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod i8042;
pub mod pvpanic;
pub mod reset;
pub mod serial;
pub mod sink;

pub use acpi_pm::{AcpiPmDevice, AcpiPmState};
pub use bus::{BusError, PioBus};
pub use cmos::{CmosDevice, CmosState};
pub use i8042::I8042Device;
pub use pvpanic::PvPanicDevice;
pub use reset::{ResetDevice, ResetState};
pub use serial::{SerialDevice, SerialDeviceState};
pub use sink::SinkDevice;

/// What a guest asked the machine to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestRequest {
    /// Power off (ACPI S5).
    PowerOff,
    /// Reset the machine (i8042 0xfe, port 0xcf9).
    Reset,
    /// The guest kernel panicked (pvpanic).
    Panic,
}

/// Where devices send what a guest asks of the machine. The VMM implements it.
pub trait GuestRequestSink: Send + Sync {
    /// Takes one request. Called on the vCPU thread that made the access, with the device lock
    /// held: it should record the request and return, not tear the machine down itself.
    fn guest_request(&self, req: GuestRequest);
}

/// A device on the port I/O bus. `offset` is relative to the base it was inserted at.
pub trait PioDevice: Send {
    /// Fills all of `data` with what the guest reads at `offset`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Takes what the guest writes at `offset`.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// A saved device state that cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// CMOS RAM in the saved state is not 128 bytes.
    #[error("CMOS RAM of {0} bytes, expected 128")]
    CmosRamSize(usize),
    /// The serial receive FIFO in the saved state is longer than the FIFO.
    #[error("serial receive FIFO of {len} bytes, more than its {capacity}")]
    SerialFifoOverflow {
        /// Bytes in the saved FIFO.
        len: usize,
        /// Capacity of the FIFO.
        capacity: usize,
    },
}

/// The offset of byte `i` of an access at `offset`, or `None` past the end of the port space.
pub(crate) fn byte_offset(offset: u16, i: usize) -> Option<u16> {
    u16::try_from(i).ok().and_then(|i| offset.checked_add(i))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers shared by the device tests.

    use super::{GuestRequest, GuestRequestSink};
    use std::sync::Mutex;

    /// Records every request it gets.
    #[derive(Default)]
    pub struct Requests(Mutex<Vec<GuestRequest>>);

    impl Requests {
        /// The requests received so far, oldest first.
        pub fn taken(&self) -> Vec<GuestRequest> {
            self.0.lock().unwrap().clone()
        }
    }

    impl GuestRequestSink for Requests {
        fn guest_request(&self, req: GuestRequest) {
            self.0.lock().unwrap().push(req);
        }
    }

    /// Offsets and sizes a guest might use, including ones past any of our devices' ends.
    pub const ODD_OFFSETS: &[u16] = &[
        0, 1, 2, 3, 4, 5, 7, 8, 11, 12, 15, 16, 0x100, 0xfffe, 0xffff,
    ];
    /// Access sizes, including ones a vCPU never produces.
    pub const SIZES: &[usize] = &[0, 1, 2, 3, 4, 8];
}
