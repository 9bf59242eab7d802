//! COM1 output, one `key=value` line at a time. No UART set-up: the VMMs we run under accept
//! bytes on THR at any time, and polling LSR would double the number of exits.

use crate::cpu::outb;
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;

static LOCK: AtomicBool = AtomicBool::new(false);

/// One output line: holds the serial lock and ends the line with `\n` when dropped.
pub struct Line(());

impl Line {
    /// Starts a line (waits for other CPUs' lines to end).
    pub fn new() -> Line {
        while LOCK.swap(true, Ordering::Acquire) {
            crate::cpu::pause();
        }
        Line(())
    }

    /// Appends a string.
    pub fn s(&mut self, s: &str) -> &mut Self {
        self.b(s.as_bytes())
    }

    /// Appends raw bytes.
    pub fn b(&mut self, s: &[u8]) -> &mut Self {
        raw(s);
        self
    }

    /// Appends an unsigned decimal number.
    pub fn dec(&mut self, v: u64) -> &mut Self {
        let mut buf = [0u8; 20];
        raw(fmt_dec(v, &mut buf));
        self
    }

    /// Appends bytes: printable ASCII as is, anything else (and the backslash) as `\xNN`.
    pub fn escaped(&mut self, s: &[u8]) -> &mut Self {
        for &c in s {
            if (0x20..0x7f).contains(&c) && c != b'\\' {
                outb(COM1, c);
            } else {
                raw(&[
                    b'\\',
                    b'x',
                    b"0123456789abcdef"[(c >> 4) as usize],
                    b"0123456789abcdef"[(c & 15) as usize],
                ]);
            }
        }
        self
    }

    /// Appends `0x` and a lower-case hexadecimal number.
    pub fn hex(&mut self, v: u64) -> &mut Self {
        let mut buf = [0u8; 18];
        raw(fmt_hex(v, &mut buf));
        self
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        outb(COM1, b'\n');
        LOCK.store(false, Ordering::Release);
    }
}

/// Most bytes `input=` reads.
pub const INPUT_MAX: usize = 256;

/// Reads up to `buf.len()` bytes from COM1 (polling LSR.DR), giving up after `timeout_ns` of
/// kvmclock (or a fixed number of polls without it). Returns how many arrived.
pub fn read_input(buf: &mut [u8], timeout_ns: u64) -> usize {
    let clock = crate::kvmclock::enabled();
    let deadline = crate::kvmclock::now_ns().saturating_add(timeout_ns);
    let mut polls = 0u64;
    let mut n = 0;
    while n < buf.len() {
        if crate::cpu::inb(COM1 + 5) & 1 != 0 {
            buf[n] = crate::cpu::inb(COM1);
            n += 1;
            continue;
        }
        polls += 1;
        let expired = if clock {
            crate::kvmclock::now_ns() > deadline
        } else {
            polls > 500_000
        };
        if expired {
            break;
        }
    }
    n
}

/// Writes bytes without taking the lock (fault paths).
pub fn raw(s: &[u8]) {
    for &c in s {
        outb(COM1, c);
    }
}

/// Formats `v` in decimal into the end of `buf`.
pub fn fmt_dec(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Formats `v` as `0x` + hexadecimal into the end of `buf`.
pub fn fmt_hex(mut v: u64, buf: &mut [u8; 18]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[(v & 15) as usize];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    buf[i - 1] = b'x';
    buf[i - 2] = b'0';
    &buf[i - 2..]
}
