//! MC146818 real-time clock and 128 bytes of CMOS RAM at ports 0x70 (index) and 0x71 (data)
//! (`ports::CMOS_INDEX`, insert with length 2).
//!
//! - Index port: bits 0..=6 select a register; bit 7 (NMI mask) is ignored. Reads give 0xff.
//! - Time registers (seconds 0x00, minutes 0x02, hours 0x04, day of week 0x06, day 0x07,
//!   month 0x08, year 0x09, century 0x32) are computed from the host's UTC clock at the
//!   moment of the read, plus an offset that moves when the guest sets the clock. They follow
//!   register B: BCD unless DM (bit 2) is set, 12-hour (PM in bit 7 of the hour) unless bit 1
//!   is set. B starts as 0x02: BCD, 24-hour.
//! - Setting the clock: while B's SET bit (7) is on, the time registers hold still and take
//!   writes; when SET goes off the clock runs on from what was written. A time register
//!   written without SET moves the clock at once.
//! - Register A reads 0x26 (32.768 kHz base, 1024 Hz rate) with UIP always clear: an update is
//!   never in progress, because the time is computed whole at every read. C reads 0 (no
//!   interrupt flags: this RTC raises no IRQ 8), D reads 0x80 (RAM and time valid).
//! - Everything else is plain RAM. [`CmosDevice::new`] fills the memory-size bytes firmware
//!   reads: 0x15/0x16 base memory in KiB (640), 0x17/0x18 and 0x30/0x31 KiB above 1 MiB
//!   (at most 0xffff), 0x34/0x35 64 KiB blocks above 16 MiB below 4 GiB, 0x5b..=0x5d 64 KiB
//!   blocks above 4 GiB, and the checksum over 0x10..=0x2d at 0x2e (high) / 0x2f (low).

mod calendar;

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{byte_offset, PioDevice, StateError};
use calendar::{date_from_days, days_from_date, weekday_from_days, Date};

/// Bytes of CMOS RAM, registers included.
const RAM_LEN: usize = 128;

/// Offset of the index port from the base.
const INDEX_PORT: u16 = 0;
/// Offset of the data port from the base.
const DATA_PORT: u16 = 1;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;

/// Register A at power-on: divider 010 (32.768 kHz), rate 0110 (1024 Hz).
const REG_A_DEFAULT: u8 = 0x26;
/// Register A bit 7: update in progress (read-only, never set here).
const REG_A_UIP: u8 = 0x80;
/// Register B at power-on: 24-hour mode, BCD.
const REG_B_DEFAULT: u8 = B_24H;
/// Register B bit 7: the clock is being set; time registers hold still.
const B_SET: u8 = 0x80;
/// Register B bit 2: binary (not BCD) time registers.
const B_BINARY: u8 = 0x04;
/// Register B bit 1: 24-hour (not 12-hour) hours register.
const B_24H: u8 = 0x02;
/// Register D bit 7: valid RAM and time.
const REG_D_VRT: u8 = 0x80;
/// Hours register bit 7 in 12-hour mode: PM.
const HOUR_PM: u8 = 0x80;

const SECS_PER_DAY: i64 = 86_400;

/// Reads the time: seconds since 1970-01-01 00:00:00 UTC.
pub type UnixClock = Box<dyn Fn() -> i64 + Send>;

/// The host's real-time clock, in whole seconds since the epoch (negative before it).
pub fn host_unix_seconds() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// A broken-down RTC time, in plain binary, 24-hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcTime {
    /// Full year, e.g. 2026.
    pub year: i64,
    /// 1..=12.
    pub month: u8,
    /// 1..=31.
    pub day: u8,
    /// 1 = Sunday ..= 7 = Saturday.
    pub weekday: u8,
    /// 0..=23.
    pub hour: u8,
    /// 0..=59.
    pub minute: u8,
    /// 0..=59.
    pub second: u8,
}

impl RtcTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(SECS_PER_DAY);
        let tod = secs.rem_euclid(SECS_PER_DAY);
        let Date { year, month, day } = date_from_days(days);
        // Each quotient below is in range of u8 by construction (tod < 86 400).
        let part = |v: i64| u8::try_from(v).unwrap_or(0);
        Self {
            year,
            month,
            day,
            weekday: weekday_from_days(days),
            hour: part(tod / 3600),
            minute: part(tod / 60 % 60),
            second: part(tod % 60),
        }
    }

    /// Seconds since the epoch. The weekday is ignored; out-of-range fields (which `set`
    /// never stores) are clamped.
    fn to_unix(self) -> i64 {
        let days = days_from_date(Date {
            year: self.year.clamp(0, 9999),
            month: self.month.clamp(1, 12),
            day: self.day.clamp(1, 31),
        });
        days * SECS_PER_DAY
            + i64::from(self.hour.min(23)) * 3600
            + i64::from(self.minute.min(59)) * 60
            + i64::from(self.second.min(59))
    }

    /// The value of time register `reg` in the format register B selects.
    fn get(&self, reg: u8, reg_b: u8) -> u8 {
        let year_in_century = u8::try_from(self.year.rem_euclid(100)).unwrap_or(0);
        let century = u8::try_from(self.year.div_euclid(100).clamp(0, 99)).unwrap_or(0);
        match reg {
            SECONDS => encode(self.second, reg_b),
            MINUTES => encode(self.minute, reg_b),
            HOURS if reg_b & B_24H != 0 => encode(self.hour, reg_b),
            HOURS => {
                let pm = if self.hour >= 12 { HOUR_PM } else { 0 };
                let h12 = match self.hour % 12 {
                    0 => 12,
                    h => h,
                };
                encode(h12, reg_b) | pm
            }
            WEEKDAY => encode(self.weekday, reg_b),
            DAY => encode(self.day, reg_b),
            MONTH => encode(self.month, reg_b),
            YEAR => encode(year_in_century, reg_b),
            CENTURY => encode(century, reg_b),
            _ => 0,
        }
    }

    /// Stores `value`, in the format register B selects, into time register `reg`. Values out
    /// of a field's range are clamped into it.
    fn set(&mut self, reg: u8, value: u8, reg_b: u8) {
        match reg {
            SECONDS => self.second = decode(value, reg_b).min(59),
            MINUTES => self.minute = decode(value, reg_b).min(59),
            HOURS if reg_b & B_24H != 0 => self.hour = decode(value, reg_b).min(23),
            HOURS => {
                let h12 = decode(value & !HOUR_PM, reg_b).clamp(1, 12) % 12;
                self.hour = if value & HOUR_PM != 0 { h12 + 12 } else { h12 };
            }
            WEEKDAY => self.weekday = decode(value, reg_b).clamp(1, 7),
            DAY => self.day = decode(value, reg_b).clamp(1, 31),
            MONTH => self.month = decode(value, reg_b).clamp(1, 12),
            YEAR => {
                let yy = i64::from(decode(value, reg_b).min(99));
                self.year = self.year.div_euclid(100).clamp(0, 99) * 100 + yy;
            }
            CENTURY => {
                let cc = i64::from(decode(value, reg_b).min(99));
                self.year = cc * 100 + self.year.rem_euclid(100);
            }
            _ => {}
        }
    }
}

/// Binary to the register format: BCD unless register B says binary.
fn encode(v: u8, reg_b: u8) -> u8 {
    if reg_b & B_BINARY != 0 {
        v
    } else {
        let v = v % 100;
        (v / 10) << 4 | (v % 10)
    }
}

/// Register format to binary. Invalid BCD digits are taken at face value (no panic, no error:
/// the field clamps what comes out).
fn decode(v: u8, reg_b: u8) -> u8 {
    if reg_b & B_BINARY != 0 {
        v
    } else {
        (v >> 4) * 10 + (v & 0x0f)
    }
}

fn is_time_register(reg: u8) -> bool {
    matches!(
        reg,
        SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY
    )
}

/// Saved state of [`CmosDevice`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    /// The selected register.
    pub index: u8,
    /// All 128 bytes; the time registers' bytes are unused.
    pub ram: Vec<u8>,
    /// Guest time minus host time, in seconds.
    pub offset_secs: i64,
    /// The time being set, while register B's SET bit is on.
    pub held: Option<RtcTime>,
}

/// The RTC and CMOS RAM.
pub struct CmosDevice {
    index: u8,
    ram: [u8; RAM_LEN],
    /// Guest time minus host time, in seconds.
    offset_secs: i64,
    /// The time the guest is setting, while SET is on.
    held: Option<RtcTime>,
    clock: UnixClock,
}

impl CmosDevice {
    /// An RTC on the host's clock, with CMOS RAM describing `mem_below_4g` bytes of RAM below
    /// the 32-bit hole (the low 1 MiB included) and `mem_above_4g` bytes above 4 GiB.
    pub fn new(mem_below_4g: u64, mem_above_4g: u64) -> Self {
        Self::with_clock(mem_below_4g, mem_above_4g, Box::new(host_unix_seconds))
    }

    /// Like [`new`](Self::new), reading the time from `clock` instead of the host.
    pub fn with_clock(mem_below_4g: u64, mem_above_4g: u64, clock: UnixClock) -> Self {
        let mut ram = [0u8; RAM_LEN];
        ram[usize::from(REG_A)] = REG_A_DEFAULT;
        ram[usize::from(REG_B)] = REG_B_DEFAULT;
        ram[usize::from(REG_D)] = REG_D_VRT;
        fill_memory_size(&mut ram, mem_below_4g, mem_above_4g);
        Self {
            index: 0,
            ram,
            offset_secs: 0,
            held: None,
            clock,
        }
    }

    /// The registers, RAM and clock offset.
    pub fn save(&self) -> CmosState {
        CmosState {
            index: self.index,
            ram: self.ram.to_vec(),
            offset_secs: self.offset_secs,
            held: self.held,
        }
    }

    /// Puts back a saved state. The guest's clock keeps its offset from the host's clock.
    pub fn restore(&mut self, state: &CmosState) -> Result<(), StateError> {
        self.ram = state
            .ram
            .as_slice()
            .try_into()
            .map_err(|_| StateError::CmosRamSize(state.ram.len()))?;
        self.index = state.index & 0x7f;
        self.offset_secs = state.offset_secs;
        self.held = state.held;
        Ok(())
    }

    fn host_now(&self) -> i64 {
        (self.clock)()
    }

    fn guest_now(&self) -> RtcTime {
        RtcTime::from_unix(self.host_now().saturating_add(self.offset_secs))
    }

    fn read_register(&self, reg: u8) -> u8 {
        let reg_b = self.ram[usize::from(REG_B)];
        match reg {
            _ if is_time_register(reg) => self
                .held
                .unwrap_or_else(|| self.guest_now())
                .get(reg, reg_b),
            REG_A => self.ram[usize::from(REG_A)] & !REG_A_UIP,
            REG_C => 0,
            REG_D => REG_D_VRT,
            _ => self.ram.get(usize::from(reg)).copied().unwrap_or(0xff),
        }
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        let reg_b = self.ram[usize::from(REG_B)];
        match reg {
            _ if is_time_register(reg) => match &mut self.held {
                Some(held) => held.set(reg, value, reg_b),
                None => {
                    let mut t = self.guest_now();
                    t.set(reg, value, reg_b);
                    self.offset_secs = t.to_unix().saturating_sub(self.host_now());
                }
            },
            REG_A => self.ram[usize::from(REG_A)] = value & !REG_A_UIP,
            REG_B => {
                let was_set = reg_b & B_SET != 0;
                let now_set = value & B_SET != 0;
                if now_set && !was_set {
                    self.held = Some(self.guest_now());
                } else if was_set && !now_set {
                    if let Some(t) = self.held.take() {
                        self.offset_secs = t.to_unix().saturating_sub(self.host_now());
                    }
                }
                self.ram[usize::from(REG_B)] = value;
            }
            REG_C | REG_D => {}
            _ => {
                if let Some(b) = self.ram.get_mut(usize::from(reg)) {
                    *b = value;
                }
            }
        }
    }
}

impl PioDevice for CmosDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match byte_offset(offset, i) {
                Some(DATA_PORT) => self.read_register(self.index),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            match byte_offset(offset, i) {
                // Bit 7 masks NMIs on a PC; there is nothing to mask here.
                Some(INDEX_PORT) => self.index = v & 0x7f,
                Some(DATA_PORT) => self.write_register(self.index, v),
                _ => {}
            }
        }
    }
}

/// Writes the memory sizes firmware reads from CMOS, and the checksum over 0x10..=0x2d.
fn fill_memory_size(ram: &mut [u8; RAM_LEN], mem_below_4g: u64, mem_above_4g: u64) {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const BLOCK: u64 = 64 * KIB;
    let mut put = |lo: usize, bytes: &[u8]| ram[lo..lo + bytes.len()].copy_from_slice(bytes);

    put(0x15, &640u16.to_le_bytes());
    let ext_kib = (mem_below_4g.saturating_sub(MIB) / KIB).min(0xffff) as u16;
    put(0x17, &ext_kib.to_le_bytes());
    put(0x30, &ext_kib.to_le_bytes());
    let above_16m = (mem_below_4g.saturating_sub(16 * MIB) / BLOCK).min(0xffff) as u16;
    put(0x34, &above_16m.to_le_bytes());
    let above_4g = (mem_above_4g / BLOCK).min(0xff_ffff) as u32;
    put(0x5b, &above_4g.to_le_bytes()[..3]);

    let sum: u16 = ram[0x10..=0x2d].iter().map(|&b| u16::from(b)).sum();
    ram[0x2e..=0x2f].copy_from_slice(&sum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ODD_OFFSETS, SIZES};
    use std::process::Command;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// 2024-02-29 13:45:07 UTC, a Thursday.
    const LEAP_DAY_AFTERNOON: i64 = 1_709_214_307;

    /// A device on a clock the test moves.
    fn at(time: i64) -> (CmosDevice, Arc<AtomicI64>) {
        let now = Arc::new(AtomicI64::new(time));
        let clock = now.clone();
        let dev = CmosDevice::with_clock(
            512 * MIB,
            0,
            Box::new(move || clock.load(Ordering::Relaxed)),
        );
        (dev, now)
    }

    fn get(d: &mut CmosDevice, reg: u8) -> u8 {
        d.write(INDEX_PORT, &[reg]);
        let mut b = [0];
        d.read(DATA_PORT, &mut b);
        b[0]
    }

    fn set(d: &mut CmosDevice, reg: u8, value: u8) {
        d.write(INDEX_PORT, &[reg]);
        d.write(DATA_PORT, &[value]);
    }

    /// (century, year, month, day, hour, minute, second) as the guest reads them.
    fn clock_regs(d: &mut CmosDevice) -> [u8; 7] {
        [CENTURY, YEAR, MONTH, DAY, HOURS, MINUTES, SECONDS].map(|r| get(d, r))
    }

    /// What `date -u` says for `fmt`, at `@secs` or now.
    fn date_u(at: Option<i64>, fmt: &str) -> String {
        let mut cmd = Command::new("date");
        cmd.arg("-u");
        if let Some(secs) = at {
            cmd.arg("-d").arg(format!("@{secs}"));
        }
        let out = cmd.arg(format!("+{fmt}")).output().expect("run date(1)");
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    #[test]
    fn reads_the_hosts_date_and_time() {
        let mut d = CmosDevice::new(512 * MIB, 0);
        // Retry if a minute boundary passes between date(1) and the device.
        for _ in 0..3 {
            let before = date_u(None, "%Y %m %d %H %M");
            let regs = clock_regs(&mut d);
            let after = date_u(None, "%Y %m %d %H %M");
            if before != after {
                continue;
            }
            let [cc, yy, mo, dd, hh, mi, ss] = regs;
            let got = format!("{cc:02x}{yy:02x} {mo:02x} {dd:02x} {hh:02x} {mi:02x}");
            assert_eq!(got, before, "BCD registers against date -u");
            assert!(decode(ss, 0) < 60);
            return;
        }
        panic!("the minute kept changing");
    }

    #[test]
    fn host_clock_matches_system_time() {
        let sys = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let ours = host_unix_seconds();
        assert!((ours - sys).abs() <= 1);
    }

    #[test]
    fn calendar_agrees_with_date_1() {
        let mut times = vec![
            0,
            -1,
            -86_400 * 365,
            951_782_399,
            951_782_400,
            951_868_800,
            LEAP_DAY_AFTERNOON,
            4_107_542_399,
            4_107_542_400,
            2_147_483_647,
            2_147_483_648,
            253_402_300_799,
        ];
        // And a spread of ordinary times.
        times.extend((0..20).map(|i| 1_000_000_007 + i * 123_456_789));
        for t in times {
            let want = date_u(Some(t), "%Y %m %d %H %M %S %u");
            let r = RtcTime::from_unix(t);
            let weekday_monday_1 = (r.weekday + 5) % 7 + 1; // date's %u: Monday = 1.
            let got = format!(
                "{:04} {:02} {:02} {:02} {:02} {:02} {}",
                r.year, r.month, r.day, r.hour, r.minute, r.second, weekday_monday_1
            );
            assert_eq!(got, want, "@{t}");
            assert_eq!(r.to_unix(), t);
        }
    }

    #[test]
    fn bcd_24_hour_by_default() {
        let (mut d, _) = at(LEAP_DAY_AFTERNOON);
        assert_eq!(get(&mut d, REG_B), 0x02);
        assert_eq!(
            clock_regs(&mut d),
            [0x20, 0x24, 0x02, 0x29, 0x13, 0x45, 0x07]
        );
        assert_eq!(get(&mut d, WEEKDAY), 5, "Thursday, Sunday = 1");
    }

    #[test]
    fn binary_mode() {
        let (mut d, _) = at(LEAP_DAY_AFTERNOON);
        set(&mut d, REG_B, B_24H | B_BINARY);
        assert_eq!(clock_regs(&mut d), [20, 24, 2, 29, 13, 45, 7]);
    }

    #[test]
    fn twelve_hour_mode() {
        let midnight = LEAP_DAY_AFTERNOON - (13 * 3600 + 45 * 60 + 7);
        let (mut d, now) = at(midnight);
        set(&mut d, REG_B, 0); // BCD, 12-hour
        let cases = [
            (0, 0x12),                   // 12 AM
            (3600, 0x01),                // 1 AM
            (11 * 3600, 0x11),           // 11 AM
            (12 * 3600, 0x12 | HOUR_PM), // 12 PM
            (13 * 3600, 0x01 | HOUR_PM), // 1 PM
            (23 * 3600, 0x11 | HOUR_PM), // 11 PM
        ];
        for (since_midnight, want) in cases {
            now.store(midnight + since_midnight, Ordering::Relaxed);
            assert_eq!(get(&mut d, HOURS), want, "{since_midnight}");
        }
        set(&mut d, REG_B, B_BINARY);
        now.store(midnight + 22 * 3600, Ordering::Relaxed);
        assert_eq!(get(&mut d, HOURS), 10 | HOUR_PM);
    }

    #[test]
    fn setting_the_clock_holds_then_runs_from_the_new_time() {
        let (mut d, now) = at(LEAP_DAY_AFTERNOON);
        set(&mut d, REG_B, B_SET | B_24H);
        // Held: host time moves, registers do not.
        now.fetch_add(30, Ordering::Relaxed);
        assert_eq!(get(&mut d, SECONDS), 0x07);
        for (reg, v) in [
            (CENTURY, 0x20),
            (YEAR, 0x31),
            (MONTH, 0x12),
            (DAY, 0x31),
            (HOURS, 0x23),
            (MINUTES, 0x59),
            (SECONDS, 0x58),
        ] {
            set(&mut d, reg, v);
        }
        set(&mut d, WEEKDAY, 0x03);
        now.fetch_add(100, Ordering::Relaxed);
        assert_eq!(
            clock_regs(&mut d),
            [0x20, 0x31, 0x12, 0x31, 0x23, 0x59, 0x58]
        );
        assert_eq!(get(&mut d, WEEKDAY), 0x03, "as written while held");
        set(&mut d, REG_B, B_24H);
        // Runs on: three seconds later it is the new year.
        now.fetch_add(3, Ordering::Relaxed);
        assert_eq!(
            clock_regs(&mut d),
            [0x20, 0x32, 0x01, 0x01, 0x00, 0x00, 0x01]
        );
        assert_eq!(get(&mut d, WEEKDAY), 5, "2032-01-01 is a Thursday");
    }

    #[test]
    fn setting_twelve_hour_binary() {
        let (mut d, _) = at(LEAP_DAY_AFTERNOON);
        set(&mut d, REG_B, B_SET | B_BINARY);
        set(&mut d, HOURS, 12); // 12 AM
        set(&mut d, REG_B, B_BINARY | B_24H);
        assert_eq!(get(&mut d, HOURS), 0);
        set(&mut d, REG_B, B_SET | B_BINARY);
        set(&mut d, HOURS, 12 | HOUR_PM);
        set(&mut d, REG_B, B_BINARY | B_24H);
        assert_eq!(get(&mut d, HOURS), 12);
    }

    #[test]
    fn a_time_write_without_set_moves_the_clock() {
        let (mut d, now) = at(LEAP_DAY_AFTERNOON);
        set(&mut d, YEAR, 0x25);
        assert_eq!(
            clock_regs(&mut d),
            [0x20, 0x25, 0x03, 0x01, 0x13, 0x45, 0x07],
            "no Feb 29 in 2025"
        );
        now.fetch_add(60, Ordering::Relaxed);
        assert_eq!(get(&mut d, MINUTES), 0x46);
        assert_eq!(d.save().offset_secs, 366 * SECS_PER_DAY);
    }

    #[test]
    fn garbage_time_values_are_clamped() {
        let (mut d, _) = at(LEAP_DAY_AFTERNOON);
        set(&mut d, REG_B, B_SET | B_24H);
        for (reg, v, want) in [
            (SECONDS, 0xff, 0x59),
            (MINUTES, 0x7a, 0x59),
            (HOURS, 0x99, 0x23),
            (DAY, 0x00, 0x01),
            (MONTH, 0x13, 0x12),
            (YEAR, 0xfa, 0x99),
            (CENTURY, 0xee, 0x99),
            (WEEKDAY, 0x00, 0x01),
        ] {
            set(&mut d, reg, v);
            assert_eq!(get(&mut d, reg), want, "register {reg:#x}");
        }
        set(&mut d, REG_B, B_24H);
        let _ = clock_regs(&mut d);
    }

    #[test]
    fn status_registers() {
        let (mut d, _) = at(0);
        assert_eq!(get(&mut d, REG_A), 0x26);
        set(&mut d, REG_A, 0xa6);
        assert_eq!(get(&mut d, REG_A), 0x26, "UIP is read-only and clear");
        assert_eq!(get(&mut d, REG_C), 0);
        assert_eq!(get(&mut d, REG_D), 0x80);
        set(&mut d, REG_C, 0xff);
        set(&mut d, REG_D, 0x00);
        assert_eq!(get(&mut d, REG_C), 0);
        assert_eq!(get(&mut d, REG_D), 0x80);
    }

    #[test]
    fn nmi_mask_bit_is_ignored_and_index_reads_ff() {
        let (mut d, _) = at(0);
        set(&mut d, 0x40, 0x5a);
        d.write(INDEX_PORT, &[0x80 | 0x40]);
        let mut b = [0];
        d.read(DATA_PORT, &mut b);
        assert_eq!(b, [0x5a]);
        d.read(INDEX_PORT, &mut b);
        assert_eq!(b, [0xff]);
    }

    #[test]
    fn ram_holds_what_is_written() {
        let (mut d, _) = at(0);
        let plain: Vec<u8> = (0x0e..0x80u8).filter(|&r| r != CENTURY).collect();
        for &r in &plain {
            set(&mut d, r, r ^ 0xa5);
        }
        for &r in &plain {
            assert_eq!(get(&mut d, r), r ^ 0xa5);
        }
        // Alarm registers sit between the time registers and are plain RAM.
        for r in [0x01, 0x03, 0x05] {
            set(&mut d, r, 0x33);
            assert_eq!(get(&mut d, r), 0x33);
        }
    }

    #[test]
    fn word_access_sets_index_then_data() {
        let (mut d, _) = at(0);
        d.write(INDEX_PORT, &[0x50, 0x77]);
        assert_eq!(get(&mut d, 0x50), 0x77);
        d.write(INDEX_PORT, &[0x50]);
        let mut w = [0; 4];
        d.read(INDEX_PORT, &mut w);
        assert_eq!(w, [0xff, 0x77, 0xff, 0xff]);
    }

    fn mem_bytes(below: u64, above: u64) -> CmosState {
        CmosDevice::with_clock(below, above, Box::new(|| 0)).save()
    }

    fn le(ram: &[u8], lo: usize, n: usize) -> u64 {
        ram[lo..lo + n]
            .iter()
            .rev()
            .fold(0, |acc, &b| acc << 8 | u64::from(b))
    }

    #[test]
    fn memory_size_bytes() {
        let s = mem_bytes(32 * MIB, 0);
        assert_eq!(le(&s.ram, 0x15, 2), 640);
        assert_eq!(le(&s.ram, 0x17, 2), 31 * 1024);
        assert_eq!(le(&s.ram, 0x30, 2), 31 * 1024);
        assert_eq!(le(&s.ram, 0x34, 2), 16 * 16);
        assert_eq!(le(&s.ram, 0x5b, 3), 0);

        let s = mem_bytes(512 * MIB, 0);
        assert_eq!(le(&s.ram, 0x17, 2), 0xffff, "64 MiB and up caps");
        assert_eq!(le(&s.ram, 0x34, 2), (512 - 16) * 16);

        let s = mem_bytes(3 * GIB, 5 * GIB);
        assert_eq!(le(&s.ram, 0x17, 2), 0xffff, "capped");
        assert_eq!(le(&s.ram, 0x30, 2), 0xffff);
        assert_eq!(le(&s.ram, 0x34, 2), (3 * 1024 - 16) * 16);
        assert_eq!(le(&s.ram, 0x5b, 3), 5 * 1024 * 16);

        let s = mem_bytes(0, u64::MAX);
        assert_eq!(le(&s.ram, 0x17, 2), 0);
        assert_eq!(le(&s.ram, 0x34, 2), 0);
        assert_eq!(le(&s.ram, 0x5b, 3), 0xff_ffff, "capped");
        assert_eq!(s.ram[0x5e], 0, "no spill past 0x5d");
    }

    #[test]
    fn checksum_covers_0x10_to_0x2d() {
        let s = mem_bytes(2 * GIB, 0);
        let sum: u64 = s.ram[0x10..=0x2d].iter().map(|&b| u64::from(b)).sum();
        assert_eq!(u64::from(s.ram[0x2e]) << 8 | u64::from(s.ram[0x2f]), sum);
        assert_ne!(sum, 0);
    }

    #[test]
    fn save_restore_keeps_ram_and_clock_offset() {
        let (mut d, now) = at(LEAP_DAY_AFTERNOON);
        set(&mut d, 0x60, 0x42);
        set(&mut d, YEAR, 0x28);
        set(&mut d, REG_B, B_24H | B_BINARY);
        d.write(INDEX_PORT, &[MONTH]);
        let state = d.save();

        let (mut d2, now2) = at(LEAP_DAY_AFTERNOON + 1000);
        d2.restore(&state).unwrap();
        assert_eq!(d2.save(), state);
        let mut b = [0];
        d2.read(DATA_PORT, &mut b);
        assert_eq!(b, [2], "index kept: month, in binary");
        now.fetch_add(1000, Ordering::Relaxed);
        assert_eq!(
            clock_regs(&mut d),
            clock_regs(&mut d2),
            "same offset from the host"
        );
        now2.fetch_add(1, Ordering::Relaxed);
        assert_eq!(get(&mut d2, 0x60), 0x42);
        assert_eq!(get(&mut d2, YEAR), 28);
    }

    #[test]
    fn save_restore_while_the_clock_is_held() {
        let (mut d, _) = at(LEAP_DAY_AFTERNOON);
        set(&mut d, REG_B, B_SET | B_24H);
        set(&mut d, MINUTES, 0x01);
        let state = d.save();
        assert!(state.held.is_some());
        let (mut d2, now2) = at(0);
        d2.restore(&state).unwrap();
        now2.store(LEAP_DAY_AFTERNOON + 50, Ordering::Relaxed);
        assert_eq!(get(&mut d2, MINUTES), 0x01);
        set(&mut d2, REG_B, B_24H);
        assert_eq!(
            clock_regs(&mut d2),
            [0x20, 0x24, 0x02, 0x29, 0x13, 0x01, 0x07]
        );
    }

    #[test]
    fn restore_refuses_wrong_ram_size_and_survives_extremes() {
        let (mut d, _) = at(0);
        let mut state = d.save();
        state.ram.pop();
        assert_eq!(d.restore(&state), Err(StateError::CmosRamSize(127)));
        state.ram = vec![0xff; 128];
        state.index = 0xff;
        for offset in [i64::MAX, i64::MIN] {
            state.offset_secs = offset;
            d.restore(&state).unwrap();
            let _ = clock_regs(&mut d);
            for reg in [SECONDS, YEAR, CENTURY] {
                set(&mut d, reg, 0x12);
            }
        }
    }

    #[test]
    fn host_clock_extremes_do_not_panic() {
        for t in [i64::MAX, i64::MIN, -1] {
            let (mut d, _) = at(t);
            let _ = clock_regs(&mut d);
            set(&mut d, YEAR, 0x99);
            set(&mut d, REG_B, B_SET);
            set(&mut d, REG_B, 0);
            let _ = clock_regs(&mut d);
        }
    }

    #[test]
    fn every_register_every_value_any_size() {
        let (mut d, _) = at(LEAP_DAY_AFTERNOON);
        for reg in 0..=0xffu8 {
            for v in 0..=0xffu8 {
                d.write(INDEX_PORT, &[reg, v]);
                let mut b = [0];
                d.read(DATA_PORT, &mut b);
            }
        }
        for &offset in ODD_OFFSETS {
            for &size in SIZES {
                d.write(offset, &vec![0x8b; size]);
                let mut data = vec![0; size];
                d.read(offset, &mut data);
                if offset >= 2 {
                    assert!(data.iter().all(|&b| b == 0xff));
                }
            }
        }
    }
}
