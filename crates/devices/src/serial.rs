//! A 16550A UART for COM1 (`ports::COM1` 0x3f8, 8 ports, IRQ 4), built on `vm_superio::Serial`.
//!
//! The interrupt goes out through an `EventFd` that the VMM registers as a KVM irqfd for
//! `ports::COM1_IRQ`. Guest output goes to a `Box<dyn Write + Send>` and is flushed after every
//! byte, so a reader on the other end of a pipe sees it live; a failing output (a closed pipe)
//! drops the byte and the guest carries on. Input comes from the VMM through
//! [`SerialDevice::enqueue_input`], as much as the 64-byte receive FIFO holds.

use std::io::{self, Write};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::{byte_offset, PioDevice, StateError};

/// Ports the UART decodes.
const REGISTERS: u16 = 8;
/// Offset of the modem control register.
const MCR: u8 = 4;
/// MCR bit 4: loopback; input from outside is not accepted.
const MCR_LOOP: u8 = 1 << 4;

/// Raises the UART interrupt by signalling the irqfd.
struct IrqTrigger(Arc<EventFd>);

impl Trigger for IrqTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        // An eventfd write fails only when its counter would pass u64::MAX - 1; KVM drains the
        // counter on every signal, so this cannot happen with the irqfd registered. Without it
        // there is nobody to tell, and the guest must not be stopped by it either way.
        let _ = self.0.write(1);
        Ok(())
    }
}

/// The guest's output stream.
struct Output(Box<dyn Write + Send>);

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Saved state of [`SerialDevice`]: the UART registers and the bytes waiting in its FIFO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes the guest has not read yet, oldest first.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The COM1 UART.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, Output>,
    interrupt: Arc<EventFd>,
    /// Copy of the modem control register (`Serial::read` needs `&mut self`, and its `state()`
    /// copies the FIFO): kept in step on every MCR write and on restore.
    modem_control: u8,
    /// Capacity of the receive FIFO (that of a freshly made UART).
    fifo_capacity: usize,
}

impl SerialDevice {
    /// A UART that signals `interrupt` and writes the guest's output to `out`.
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Self {
        let interrupt = Arc::new(interrupt);
        let uart = Serial::new(IrqTrigger(interrupt.clone()), Output(out));
        let fifo_capacity = uart.fifo_capacity();
        let modem_control = uart.state().modem_control;
        Self {
            uart,
            interrupt,
            modem_control,
            fifo_capacity,
        }
    }

    /// Puts as many of `bytes` into the receive FIFO as it has room for, raising the receive
    /// interrupt if the guest enabled it, and returns how many it took. The caller keeps the
    /// rest and retries when the guest has read some (see [`fifo_room`](Self::fifo_room)).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if self.fifo_room() == 0 {
            return 0;
        }
        // The trigger cannot fail and the FIFO has room, so this is always Ok.
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// How many bytes [`enqueue_input`](Self::enqueue_input) would take now. Zero while the
    /// guest has the UART in loopback mode, which takes no input from outside.
    pub fn fifo_room(&self) -> usize {
        if self.modem_control & MCR_LOOP != 0 {
            0
        } else {
            self.uart.fifo_capacity()
        }
    }

    /// The UART's registers and FIFO.
    pub fn save(&self) -> SerialDeviceState {
        self.uart.state().into()
    }

    /// Puts back a saved state, keeping this device's interrupt and output. Raises the
    /// interrupt again if the state has one pending and enabled.
    pub fn restore(&mut self, state: &SerialDeviceState) -> Result<(), StateError> {
        if state.in_buffer.len() > self.fifo_capacity {
            return Err(StateError::SerialFifoOverflow {
                len: state.in_buffer.len(),
                capacity: self.fifo_capacity,
            });
        }
        let out = std::mem::replace(self.uart.writer_mut(), Output(Box::new(io::sink())));
        let trigger = IrqTrigger(self.interrupt.clone());
        match Serial::from_state(&state.into(), trigger, NoEvents, out) {
            Ok(uart) => {
                self.uart = uart;
                self.modem_control = state.modem_control;
            }
            // The FIFO length was checked above and the trigger cannot fail: unreachable. Were
            // it reached, the output would be lost (sent to a sink), never the VMM.
            Err(_) => {
                return Err(StateError::SerialFifoOverflow {
                    len: state.in_buffer.len(),
                    capacity: self.fifo_capacity,
                })
            }
        }
        Ok(())
    }
}

impl PioDevice for SerialDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match register(offset, i) {
                Some(reg) => self.uart.read(reg),
                None => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            if let Some(reg) = register(offset, i) {
                if reg == MCR {
                    self.modem_control = v;
                }
                // The only error left is a failed write to the output (EPIPE and the like): the
                // byte is lost, as on a UART with nothing attached, and the guest goes on.
                let _ = self.uart.write(reg, v);
            }
        }
    }
}

/// The UART register byte `i` of an access at `offset` lands on, if any.
fn register(offset: u16, i: usize) -> Option<u8> {
    byte_offset(offset, i)
        .filter(|&o| o < REGISTERS)
        .and_then(|o| u8::try_from(o).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ODD_OFFSETS, SIZES};
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const DATA: u16 = 0;
    const IER: u16 = 1;
    const IIR: u16 = 2;
    const LCR: u16 = 3;
    const LSR: u16 = 5;
    const SCR: u16 = 7;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    const LSR_DR: u8 = 0x01;

    /// What the guest's output saw: bytes, and how many of them had been flushed.
    #[derive(Default)]
    struct Seen {
        bytes: Vec<u8>,
        flushed: usize,
    }

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Seen>>);

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().bytes.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            let mut seen = self.0.lock().unwrap();
            seen.flushed = seen.bytes.len();
            Ok(())
        }
    }

    /// An output whose reader has gone away.
    struct BrokenPipe;

    impl Write for BrokenPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    fn irq() -> (EventFd, EventFd) {
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let peer = fd.try_clone().unwrap();
        (fd, peer)
    }

    /// How many times the interrupt was raised since the last call.
    fn raised(peer: &EventFd) -> u64 {
        peer.read().unwrap_or(0)
    }

    fn dev() -> (SerialDevice, EventFd, Recorder) {
        let (fd, peer) = irq();
        let out = Recorder::default();
        (SerialDevice::new(fd, Box::new(out.clone())), peer, out)
    }

    fn read1(d: &mut SerialDevice, offset: u16) -> u8 {
        let mut b = [0];
        d.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn output_is_written_and_flushed_per_byte() {
        let (mut d, _, out) = dev();
        for &b in b"hello\n" {
            d.write(DATA, &[b]);
            let seen = out.0.lock().unwrap();
            assert_eq!(seen.flushed, seen.bytes.len(), "flushed after every byte");
        }
        assert_eq!(out.0.lock().unwrap().bytes, b"hello\n");
    }

    #[test]
    fn thr_empty_interrupt_when_enabled() {
        let (mut d, peer, _) = dev();
        d.write(DATA, b"x");
        assert_eq!(raised(&peer), 0, "disabled by default");
        d.write(IER, &[IER_THRE]);
        assert!(raised(&peer) > 0, "enabling THRE raises it at once");
        assert_eq!(read1(&mut d, IIR) & 0x0f, 0x02, "IIR says THR empty");
        d.write(DATA, b"y");
        assert_eq!(raised(&peer), 1);
    }

    #[test]
    fn broken_output_does_not_stop_the_guest() {
        let (fd, peer) = irq();
        let mut d = SerialDevice::new(fd, Box::new(BrokenPipe));
        d.write(IER, &[IER_THRE]);
        for _ in 0..100 {
            // The driver acknowledges (reads IIR), then sends the next byte.
            let _ = raised(&peer);
            let _ = read1(&mut d, IIR);
            d.write(DATA, b"z");
            assert_eq!(raised(&peer), 1, "THR empty is still signalled");
        }
        assert_eq!(read1(&mut d, LSR) & 0x60, 0x60, "transmitter idle");
    }

    #[test]
    fn input_fills_the_fifo_and_no_more() {
        let (mut d, peer, _) = dev();
        d.write(IER, &[IER_RDA]);
        let room = d.fifo_room();
        assert_eq!(room, 64);
        let input: Vec<u8> = (0..100).collect();
        assert_eq!(d.enqueue_input(&input), room);
        assert!(raised(&peer) > 0);
        assert_eq!(d.fifo_room(), 0);
        assert_eq!(d.enqueue_input(&input[room..]), 0);
        assert_eq!(d.enqueue_input(&[]), 0);

        assert_eq!(read1(&mut d, LSR) & LSR_DR, LSR_DR);
        for want in 0..3u8 {
            assert_eq!(read1(&mut d, DATA), want);
        }
        assert_eq!(d.fifo_room(), 3);
        assert_eq!(d.enqueue_input(&input[room..]), 3);
        for want in (3..room as u8).chain(64..67) {
            assert_eq!(read1(&mut d, DATA), want);
        }
        assert_eq!(read1(&mut d, LSR) & LSR_DR, 0, "drained");
        assert_eq!(d.fifo_room(), 64);
    }

    #[test]
    fn loopback_takes_no_outside_input() {
        let (mut d, _, out) = dev();
        d.write(MCR.into(), &[MCR_LOOP | 0x0b]);
        assert_eq!(d.fifo_room(), 0);
        assert_eq!(d.enqueue_input(b"abc"), 0);
        d.write(DATA, b"L");
        assert_eq!(read1(&mut d, DATA), b'L', "looped back");
        assert!(out.0.lock().unwrap().bytes.is_empty());
        d.write(MCR.into(), &[0x0b]);
        assert_eq!(d.fifo_room(), 64);
        assert_eq!(d.enqueue_input(b"abc"), 3);
    }

    #[test]
    fn wide_accesses_are_byte_accesses() {
        let (mut d, _, out) = dev();
        // THR, IER: one byte out and THRE enabled.
        d.write(DATA, &[b'w', IER_THRE]);
        assert_eq!(out.0.lock().unwrap().bytes, b"w");
        assert_eq!(read1(&mut d, IER), IER_THRE);
        // Scratch and past the end.
        d.write(SCR, &[0x5a, 0x11, 0x22, 0x33]);
        let mut w = [0; 4];
        d.read(SCR, &mut w);
        assert_eq!(w, [0x5a, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn divisor_latch_through_dlab() {
        let (mut d, _, out) = dev();
        d.write(LCR, &[0x83]);
        d.write(DATA, &[0x01, 0x00]);
        let mut w = [0; 2];
        d.read(DATA, &mut w);
        assert_eq!(w, [0x01, 0x00]);
        d.write(LCR, &[0x03]);
        assert!(
            out.0.lock().unwrap().bytes.is_empty(),
            "divisor writes are not output"
        );
    }

    #[test]
    fn any_offset_and_size_is_safe() {
        let (mut d, _, _) = dev();
        for &offset in ODD_OFFSETS {
            for &size in SIZES {
                d.write(offset, &vec![0xff; size]);
                let mut data = vec![0; size];
                d.read(offset, &mut data);
                for (i, &b) in data.iter().enumerate() {
                    if offset as usize + i >= 8 {
                        assert_eq!(b, 0xff, "{offset:#x}+{i}");
                    }
                }
            }
        }
    }

    #[test]
    fn save_and_restore_keep_registers_fifo_and_pending_interrupt() {
        let (mut d, _, _) = dev();
        d.write(LCR, &[0x83]);
        d.write(DATA, &[0x03, 0x00]);
        d.write(LCR, &[0x03]);
        d.write(SCR, &[0x42]);
        d.write(IER, &[IER_RDA]);
        d.enqueue_input(b"queued");
        let state = d.save();
        assert_eq!(state.in_buffer, b"queued");
        assert_eq!(state.baud_divisor_low, 0x03);

        let (mut d2, peer2, out2) = dev();
        d2.restore(&state).unwrap();
        assert!(raised(&peer2) > 0, "pending receive interrupt raised again");
        assert_eq!(d2.save(), state);
        assert_eq!(d2.fifo_room(), 64 - 6);
        assert_eq!(read1(&mut d2, SCR), 0x42);
        let got: Vec<u8> = (0..6).map(|_| read1(&mut d2, DATA)).collect();
        assert_eq!(got, b"queued");
        d2.write(DATA, b"!");
        assert_eq!(
            out2.0.lock().unwrap().bytes,
            b"!",
            "output kept across restore"
        );
    }

    #[test]
    fn restore_keeps_loopback_in_sight() {
        let (mut d, _, _) = dev();
        d.write(MCR.into(), &[MCR_LOOP]);
        let state = d.save();
        let (mut d2, _, _) = dev();
        d2.restore(&state).unwrap();
        assert_eq!(d2.fifo_room(), 0);
    }

    #[test]
    fn restore_refuses_an_overfull_fifo() {
        let (mut d, _, _) = dev();
        let mut state = d.save();
        state.in_buffer = vec![0; 65];
        assert_eq!(
            d.restore(&state),
            Err(StateError::SerialFifoOverflow {
                len: 65,
                capacity: 64
            })
        );
        d.enqueue_input(b"still works");
        assert_eq!(read1(&mut d, DATA), b's');
    }
}
