//! The CMOS real-time clock.

use crate::cpu::{inb, outb};

/// Date and time read from the RTC.
pub struct DateTime {
    /// Full year.
    pub year: u32,
    /// 1..12.
    pub month: u8,
    /// 1..31.
    pub day: u8,
    /// 0..23.
    pub hour: u8,
    /// 0..59.
    pub min: u8,
    /// 0..59.
    pub sec: u8,
}

fn cmos(reg: u8) -> u8 {
    outb(0x70, reg);
    inb(0x71)
}

fn bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0xf)
}

fn raw() -> [u8; 7] {
    [
        cmos(0x00),
        cmos(0x02),
        cmos(0x04),
        cmos(0x07),
        cmos(0x08),
        cmos(0x09),
        cmos(0x32),
    ]
}

/// Reads the RTC: waits for UIP to clear, reads until two reads agree, honours register B.
pub fn read() -> DateTime {
    let mut prev = [0xffu8; 7];
    let mut r = prev;
    for _ in 0..8 {
        let mut n = 0;
        while cmos(0x0a) & 0x80 != 0 && n < 100_000 {
            n += 1;
        }
        r = raw();
        if r == prev {
            break;
        }
        prev = r;
    }
    let b = cmos(0x0b);
    let binary = b & 0x04 != 0;
    let h24 = b & 0x02 != 0;
    let conv = |v: u8| if binary { v } else { bcd(v) };
    let pm = r[2] & 0x80 != 0;
    let mut hour = conv(r[2] & 0x7f);
    if !h24 {
        hour %= 12;
        if pm {
            hour += 12;
        }
    }
    let century = if r[6] != 0 { conv(r[6]) as u32 } else { 20 };
    DateTime {
        year: century * 100 + conv(r[5]) as u32,
        month: conv(r[4]),
        day: conv(r[3]),
        hour,
        min: conv(r[1]),
        sec: conv(r[0]),
    }
}
