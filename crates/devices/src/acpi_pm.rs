//! ACPI fixed-hardware registers: the PM1a event and control blocks and the PM timer, one
//! range of `ports::PM_BLK_LEN` (12) ports at `ports::PM1A_EVT_BLK` (0x600).
//!
//! | offset | register | |
//! | --- | --- | --- |
//! | +0 | PM1a_STS, 16 bit | write 1 to clear; PWRBTN_STS is bit 8 |
//! | +2 | PM1a_EN, 16 bit | PWRBTN_EN is bit 8 |
//! | +4 | PM1a_CNT, 16 bit | SCI_EN (bit 0) always reads 1; SLP_EN (bit 13) with SLP_TYP (bits 10..=12) = `ports::S5_SLP_TYP` powers off, other sleep types are ignored; SLP_EN reads 0 |
//! | +6 | reserved, 16 bit | reads 0 |
//! | +8 | PM_TMR, 32 bit | 24-bit counter at 3.579545 MHz, read-only |
//!
//! The SCI (`ports::SCI_IRQ`, 9) goes out through an `EventFd` the VMM registers as an irqfd.
//! The SCI is a level interrupt; it is approximated by signalling the irqfd whenever an enabled
//! status bit becomes pending (on a power-button press, or when the guest enables an event
//! whose status is already set). The timer's status bit (TMR_STS) is never set.

use std::time::{Duration, Instant};

use ferro_arch::layout::ports;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::{byte_offset, GuestRequest, GuestRequestSink, PioDevice, StateError};
use std::sync::Arc;

/// PM1a_STS / PM1a_EN bit 8: power button.
const PWRBTN: u16 = 1 << 8;
/// PM1a_CNT bit 0: SCI enabled (ACPI mode), always set.
const SCI_EN: u16 = 1 << 0;
/// PM1a_CNT bit 13: enter the sleep state in SLP_TYP (write-only).
const SLP_EN: u16 = 1 << 13;
/// PM1a_CNT bits 10..=12: sleep type.
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0b111;

/// PM timer frequency.
const PM_TIMER_HZ: u128 = 3_579_545;
/// The PM timer counts 24 bits (the FADT leaves TMR_VAL_EXT clear).
const PM_TIMER_MASK: u32 = 0x00ff_ffff;

/// Byte offsets of the registers.
const STS: u16 = 0;
const EN: u16 = 2;
const CNT: u16 = 4;
const TMR: u16 = 8;

/// Time since some fixed origin, never going backwards.
type Monotonic = Box<dyn Fn() -> Duration + Send>;

/// Saved state of [`AcpiPmDevice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    /// PM1a_STS.
    pub status: u16,
    /// PM1a_EN.
    pub enable: u16,
    /// PM1a_CNT (SLP_EN is never stored).
    pub control: u16,
    /// PM_TMR when saved; the restored timer counts on from it.
    pub timer: u32,
}

/// The ACPI PM register block.
pub struct AcpiPmDevice {
    status: u16,
    enable: u16,
    control: u16,
    /// Added to the ticks since `clock`'s origin, so a restored timer continues.
    timer_offset: u32,
    clock: Monotonic,
    sci: EventFd,
    requests: Arc<dyn GuestRequestSink>,
}

impl AcpiPmDevice {
    /// A PM block that raises the SCI through `sci` and sends `GuestRequest::PowerOff` to
    /// `requests`. Its timer starts at 0 now, on the host's monotonic clock.
    pub fn new(sci: EventFd, requests: Arc<dyn GuestRequestSink>) -> Self {
        let start = Instant::now();
        Self::with_clock(sci, requests, Box::new(move || start.elapsed()))
    }

    fn with_clock(sci: EventFd, requests: Arc<dyn GuestRequestSink>, clock: Monotonic) -> Self {
        Self {
            status: 0,
            enable: 0,
            control: SCI_EN,
            timer_offset: 0,
            clock,
            sci,
            requests,
        }
    }

    /// Presses the power button: sets PWRBTN_STS and raises the SCI if the guest enabled
    /// PWRBTN_EN. An ACPI guest answers with an orderly shutdown (ending in an S5 request).
    pub fn press_power_button(&mut self) {
        self.set_status(self.status | PWRBTN);
    }

    /// The registers and the timer's current value.
    pub fn save(&self) -> AcpiPmState {
        AcpiPmState {
            status: self.status,
            enable: self.enable,
            control: self.control,
            timer: self.timer(),
        }
    }

    /// Puts back a saved state; the timer counts on from the saved value, and a pending,
    /// enabled event raises the SCI again.
    pub fn restore(&mut self, state: &AcpiPmState) -> Result<(), StateError> {
        self.status = state.status;
        self.enable = state.enable;
        self.control = (state.control | SCI_EN) & !SLP_EN;
        self.timer_offset = state.timer.wrapping_sub(self.ticks()) & PM_TIMER_MASK;
        if self.status & self.enable != 0 {
            self.raise_sci();
        }
        Ok(())
    }

    /// PM_TMR now.
    fn timer(&self) -> u32 {
        self.ticks().wrapping_add(self.timer_offset) & PM_TIMER_MASK
    }

    /// Timer ticks since the clock's origin, modulo 2^24.
    fn ticks(&self) -> u32 {
        let ticks = (self.clock)().as_nanos() * PM_TIMER_HZ / 1_000_000_000;
        // Masked to 24 bits, so the conversion cannot fail.
        u32::try_from(ticks & u128::from(PM_TIMER_MASK)).unwrap_or(0)
    }

    fn set_status(&mut self, status: u16) {
        let was_pending = self.status & self.enable != 0;
        self.status = status;
        self.sci_if_newly_pending(was_pending);
    }

    fn set_enable(&mut self, enable: u16) {
        let was_pending = self.status & self.enable != 0;
        self.enable = enable;
        self.sci_if_newly_pending(was_pending);
    }

    fn sci_if_newly_pending(&self, was_pending: bool) {
        if !was_pending && self.status & self.enable != 0 {
            self.raise_sci();
        }
    }

    fn raise_sci(&self) {
        // An eventfd write fails only if its counter would overflow; KVM drains it on every
        // signal. Nothing useful could be done about it here, and the guest must go on.
        let _ = self.sci.write(1);
    }

    fn write_control(&mut self, control: u16) {
        self.control = (control | SCI_EN) & !SLP_EN;
        if control & SLP_EN != 0 {
            let slp_typ = (control >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
            if slp_typ == u16::from(ports::S5_SLP_TYP) {
                self.requests.guest_request(GuestRequest::PowerOff);
            }
        }
    }

    fn write_byte(&mut self, offset: u16, v: u8) {
        let shift = (offset & 1) * 8;
        let v = u16::from(v) << shift;
        let keep = !(0xffu16 << shift);
        match offset & !1 {
            STS => self.set_status(self.status & !v),
            EN => self.set_enable(self.enable & keep | v),
            CNT => self.write_control(self.control & keep | v),
            _ => {}
        }
    }
}

/// Byte `offset & 1` of a 16-bit register.
fn byte_of(reg: u16, offset: u16) -> u8 {
    reg.to_le_bytes()[usize::from(offset & 1)]
}

impl PioDevice for AcpiPmDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // Sampled at most once per access, so the bytes of one timer read never tear.
        let mut timer = None;
        for (i, b) in data.iter_mut().enumerate() {
            let Some(o) = byte_offset(offset, i) else {
                *b = 0xff;
                continue;
            };
            *b = match o {
                0..=1 => byte_of(self.status, o),
                2..=3 => byte_of(self.enable, o),
                4..=5 => byte_of(self.control, o),
                6..=7 => 0,
                8..=11 => {
                    let t = *timer.get_or_insert_with(|| self.timer());
                    t.to_le_bytes()[usize::from(o - TMR)]
                }
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        // Apply the low byte of a register before looking at its high byte (SLP_EN is there).
        for (i, &v) in data.iter().enumerate() {
            if let Some(o) = byte_offset(offset, i) {
                self.write_byte(o, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Requests, ODD_OFFSETS, SIZES};
    use std::sync::atomic::{AtomicU64, Ordering};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    struct Rig {
        dev: AcpiPmDevice,
        sci: EventFd,
        requests: Arc<Requests>,
        nanos: Arc<AtomicU64>,
    }

    impl Rig {
        fn new() -> Self {
            let fd = EventFd::new(EFD_NONBLOCK).unwrap();
            let sci = fd.try_clone().unwrap();
            let requests = Arc::new(Requests::default());
            let nanos = Arc::new(AtomicU64::new(0));
            let n = nanos.clone();
            let clock = Box::new(move || Duration::from_nanos(n.load(Ordering::Relaxed)));
            let dev = AcpiPmDevice::with_clock(fd, requests.clone(), clock);
            Self {
                dev,
                sci,
                requests,
                nanos,
            }
        }

        fn sci_raised(&self) -> u64 {
            self.sci.read().unwrap_or(0)
        }

        fn read16(&mut self, offset: u16) -> u16 {
            let mut b = [0; 2];
            self.dev.read(offset, &mut b);
            u16::from_le_bytes(b)
        }

        fn write16(&mut self, offset: u16, v: u16) {
            self.dev.write(offset, &v.to_le_bytes());
        }

        fn read32(&mut self, offset: u16) -> u32 {
            let mut b = [0; 4];
            self.dev.read(offset, &mut b);
            u32::from_le_bytes(b)
        }

        fn advance(&self, d: Duration) {
            self.nanos.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    fn sleep(slp_typ: u16) -> u16 {
        SLP_EN | slp_typ << SLP_TYP_SHIFT | SCI_EN
    }

    #[test]
    fn offsets_match_the_layout() {
        assert_eq!(ports::PM1A_EVT_BLK + CNT, ports::PM1A_CNT_BLK);
        assert_eq!(ports::PM1A_EVT_BLK + TMR, ports::PM_TMR_BLK);
        assert_eq!(TMR + 4, ports::PM_BLK_LEN);
    }

    #[test]
    fn sci_en_always_reads_set() {
        let mut r = Rig::new();
        assert_eq!(r.read16(CNT), SCI_EN);
        r.write16(CNT, 0);
        assert_eq!(r.read16(CNT), SCI_EN);
        r.write16(CNT, 0x0006);
        assert_eq!(r.read16(CNT), 0x0007);
    }

    #[test]
    fn s5_powers_off() {
        let mut r = Rig::new();
        r.write16(CNT, sleep(u16::from(ports::S5_SLP_TYP)));
        assert_eq!(r.requests.taken(), vec![GuestRequest::PowerOff]);
        assert_eq!(r.read16(CNT) & SLP_EN, 0, "SLP_EN is write-only");
    }

    #[test]
    fn s5_by_byte_writes() {
        let mut r = Rig::new();
        let v = sleep(u16::from(ports::S5_SLP_TYP)).to_le_bytes();
        r.dev.write(CNT, &[v[0]]);
        assert!(r.requests.taken().is_empty());
        r.dev.write(CNT + 1, &[v[1]]);
        assert_eq!(r.requests.taken(), vec![GuestRequest::PowerOff]);
    }

    #[test]
    fn s5_type_without_slp_en_or_other_types_do_nothing() {
        let mut r = Rig::new();
        r.write16(CNT, u16::from(ports::S5_SLP_TYP) << SLP_TYP_SHIFT);
        for typ in 0..8 {
            if typ != u16::from(ports::S5_SLP_TYP) {
                r.write16(CNT, sleep(typ));
            }
        }
        assert!(r.requests.taken().is_empty());
        // The stored SLP_TYP without SLP_EN does not count on a later low-byte write.
        r.write16(CNT, u16::from(ports::S5_SLP_TYP) << SLP_TYP_SHIFT);
        r.dev.write(CNT, &[0x01]);
        assert!(r.requests.taken().is_empty());
    }

    #[test]
    fn power_button_with_event_enabled_raises_sci() {
        let mut r = Rig::new();
        r.write16(EN, PWRBTN);
        assert_eq!(r.read16(EN), PWRBTN);
        r.dev.press_power_button();
        assert_eq!(r.sci_raised(), 1);
        assert_eq!(r.read16(STS) & PWRBTN, PWRBTN);
        // Write 1 to clear; writing 0 leaves it.
        r.write16(STS, 0);
        assert_eq!(r.read16(STS) & PWRBTN, PWRBTN);
        r.write16(STS, PWRBTN);
        assert_eq!(r.read16(STS), 0);
        r.dev.press_power_button();
        assert_eq!(r.sci_raised(), 1);
    }

    #[test]
    fn power_button_while_disabled_is_latched_until_enabled() {
        let mut r = Rig::new();
        r.dev.press_power_button();
        assert_eq!(r.sci_raised(), 0);
        assert_eq!(r.read16(STS), PWRBTN);
        r.write16(EN, PWRBTN);
        assert_eq!(r.sci_raised(), 1, "enabling a pending event raises the SCI");
        r.write16(EN, PWRBTN);
        assert_eq!(r.sci_raised(), 0, "no new edge");
    }

    #[test]
    fn status_clears_per_byte() {
        let mut r = Rig::new();
        r.dev.press_power_button();
        r.dev.write(STS, &[0xff]);
        assert_eq!(r.read16(STS), PWRBTN, "low byte clears nothing here");
        r.dev.write(STS + 1, &[0x01]);
        assert_eq!(r.read16(STS), 0);
    }

    #[test]
    fn timer_counts_at_3_579545_mhz_in_24_bits() {
        let mut r = Rig::new();
        assert_eq!(r.read32(TMR), 0);
        r.advance(Duration::from_secs(1));
        assert_eq!(r.read32(TMR), 3_579_545);
        r.advance(Duration::from_secs(4));
        // 5 s = 17_897_725 ticks, past 2^24.
        assert_eq!(r.read32(TMR), 17_897_725 & 0xff_ffff);
        r.advance(Duration::from_secs(86_400 * 365 * 100));
        assert!(r.read32(TMR) <= 0xff_ffff);
        r.dev.write(TMR, &[0xff; 4]);
        let before = r.read32(TMR);
        assert_eq!(r.read32(TMR), before, "read-only");
    }

    #[test]
    fn timer_bytes_are_one_sample() {
        let mut r = Rig::new();
        // 0x00ffffff ticks is just under 4.6873 s: the next tick carries into every byte.
        r.nanos.store(4_687_000_000, Ordering::Relaxed);
        let t = r.read32(TMR);
        let mut b = [0; 3];
        r.dev.read(TMR + 1, &mut b);
        assert_eq!(b, [t.to_le_bytes()[1], t.to_le_bytes()[2], 0]);
    }

    #[test]
    fn host_timer_moves_forward() {
        let requests = Arc::new(Requests::default());
        let mut dev = AcpiPmDevice::new(EventFd::new(EFD_NONBLOCK).unwrap(), requests);
        let mut b = [0; 4];
        dev.read(TMR, &mut b);
        let t0 = u32::from_le_bytes(b);
        std::thread::sleep(Duration::from_millis(20));
        dev.read(TMR, &mut b);
        let t1 = u32::from_le_bytes(b);
        let elapsed = t1.wrapping_sub(t0) & PM_TIMER_MASK;
        // At least 20 ms worth (71_590 ticks); less than a 24-bit wrap (4.69 s) on a busy host.
        assert!((71_590..0x0100_0000).contains(&elapsed), "{elapsed}");
    }

    #[test]
    fn reserved_and_past_the_end() {
        let mut r = Rig::new();
        r.write16(6, 0xffff);
        assert_eq!(r.read16(6), 0);
        for &offset in ODD_OFFSETS {
            for &size in SIZES {
                r.dev.write(offset, &vec![0xff; size]);
                let mut data = vec![0; size];
                r.dev.read(offset, &mut data);
                for (i, &b) in data.iter().enumerate() {
                    if usize::from(offset) + i >= 12 {
                        assert_eq!(b, 0xff, "{offset:#x}+{i}");
                    }
                }
            }
        }
        // All-ones writes included SLP_EN with SLP_TYP 7, which is not S5.
        assert!(r.requests.taken().is_empty());
    }

    #[test]
    fn save_restore_continues_the_timer_and_the_event() {
        let mut r = Rig::new();
        r.write16(EN, PWRBTN);
        r.write16(CNT, 0x0401);
        r.advance(Duration::from_millis(1500));
        r.dev.press_power_button();
        let _ = r.sci_raised();
        let state = r.dev.save();
        assert_eq!(state.timer, 5_369_317);

        let mut r2 = Rig::new();
        r2.advance(Duration::from_secs(1000));
        r2.dev.restore(&state).unwrap();
        assert_eq!(r2.sci_raised(), 1, "pending enabled event raised again");
        assert_eq!(r2.dev.save(), state);
        r2.advance(Duration::from_secs(1));
        assert_eq!(r2.read32(TMR), (5_369_317 + 3_579_545) & 0xff_ffff);
        assert_eq!(r2.read16(CNT), 0x0401);
    }

    #[test]
    fn restore_sanitises_control() {
        let mut r = Rig::new();
        r.dev
            .restore(&AcpiPmState {
                status: 0,
                enable: 0,
                control: sleep(u16::from(ports::S5_SLP_TYP)) & !SCI_EN,
                timer: u32::MAX,
            })
            .unwrap();
        assert!(r.requests.taken().is_empty());
        assert_eq!(r.read16(CNT) & (SLP_EN | SCI_EN), SCI_EN);
        assert!(r.read32(TMR) <= PM_TIMER_MASK);
    }
}
