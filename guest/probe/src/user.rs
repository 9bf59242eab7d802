//! The CPL3 workloads: a ping, port-I/O exit timing, a compute loop, and a memory test.
//! All of them run through `trap::user_call` and report through memory they are handed.

use crate::cpu::outb;
use crate::kvmclock;
use crate::trap::user_call;

/// Value the ping returns for argument `x`.
fn ping_reply(x: u64) -> u64 {
    x.rotate_left(13) ^ 0x5eed_f00d_cafe_d00d
}

/// Arguments and result of `boot_user`.
#[repr(C)]
struct BootCheck {
    dsdt: u64,
    cookie: u64,
    s5: u64,
}

extern "sysv64" fn boot_user(arg: u64) -> u64 {
    // SAFETY: `arg` is the address of a live `BootCheck` on the kernel stack (identity mapped,
    // user accessible) that the kernel does not touch until this call returns.
    let b = unsafe { &mut *(arg as *mut BootCheck) };
    b.s5 = if b.dsdt != 0 {
        crate::acpi::find_s5(b.dsdt)
    } else {
        0xff00
    };
    ping_reply(b.cookie)
}

/// Goes to CPL3 and back once: returns whether that worked (`user=ok`) and the DSDT's `_S5_`
/// SLP_TYP (scanned at CPL3; at CPL0 if user mode failed).
pub fn boot_check(dsdt: u64) -> (bool, Option<u8>) {
    let mut b = BootCheck {
        dsdt,
        cookie: 0x1234_5678_9abc_def0,
        s5: 0xff00,
    };
    let ok = matches!(user_call(boot_user, &mut b as *mut BootCheck as u64), Ok(v) if v == ping_reply(b.cookie));
    if !ok && dsdt != 0 {
        b.s5 = crate::acpi::find_s5(dsdt);
    }
    (ok, (b.s5 <= 0xff).then_some(b.s5 as u8))
}

extern "sysv64" fn pio_loop(n: u64) -> u64 {
    let t0 = kvmclock::now_ns();
    for _ in 0..n {
        outb(0x80, 0);
    }
    kvmclock::now_ns() - t0
}

/// `n` writes to port 0x80 from CPL0 (`pio_cpl=0`): on hosts that emulate CPL0 but trap user
/// port I/O as #GP (PVM) this measures the exit itself more closely.
pub fn pio_kernel(n: u64) -> u64 {
    pio_loop(n)
}

/// `n` writes to port 0x80 from CPL3; returns the nanoseconds they took.
pub fn pio(n: u64) -> Option<u64> {
    user_call(pio_loop, n).ok()
}

/// Arguments and results of `work_loop`, shared with CPL3 through the identity map.
#[repr(C)]
pub struct Work {
    /// Rounds to run.
    pub rounds: u64,
    /// Buffer address (1 MiB of RAM).
    pub buf: u64,
    /// Result: checksum.
    pub sum: u64,
    /// Result: nanoseconds.
    pub ns: u64,
}

/// Size of the work buffer.
pub const WORK_BYTES: u64 = 1 << 20;

extern "sysv64" fn work_loop(arg: u64) -> u64 {
    // SAFETY: `arg` is the address of a live `Work` on the kernel stack (identity mapped, user
    // accessible), and the kernel does not touch it until this call returns.
    let w = unsafe { &mut *(arg as *mut Work) };
    let n = (WORK_BYTES / 8) as usize;
    // SAFETY: the kernel hands over `buf` as 1 MiB of otherwise unused RAM, 8-byte aligned.
    let buf = unsafe { core::slice::from_raw_parts_mut(w.buf as *mut u64, n) };
    let t0 = kvmclock::now_ns();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for v in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *v = x;
    }
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for r in 0..w.rounds {
        h ^= r;
        for &v in buf.iter() {
            h = (h ^ v).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    w.ns = kvmclock::now_ns() - t0;
    w.sum = h;
    0
}

/// Runs `work.rounds` rounds at CPL3; fills `sum` and `ns`.
pub fn work(w: &mut Work) -> bool {
    user_call(work_loop, w as *mut Work as u64).is_ok()
}

/// Most RAM ranges the memory test walks.
pub const MAX_RANGES: usize = 16;

/// Arguments of `memtest_loop`.
#[repr(C)]
pub struct MemTest {
    /// RAM ranges `[start, end)` to test, in order.
    pub ranges: [(u64, u64); MAX_RANGES],
    /// Number of valid ranges.
    pub n: usize,
    /// Bytes to test.
    pub bytes: u64,
}

fn pattern(a: u64) -> u64 {
    (a ^ 0xa5a5_5a5a_0f0f_f0f0).rotate_left((a >> 3) as u32 & 63)
}

/// Writes then verifies `bytes` over the ranges; returns u64::MAX when all matched, else the
/// first bad address (or the end of RAM when there is not enough of it).
extern "sysv64" fn memtest_loop(arg: u64) -> u64 {
    // SAFETY: `arg` is the address of a live `MemTest` the kernel does not touch meanwhile.
    let m = unsafe { &*(arg as *const MemTest) };
    for pass in 0..2 {
        let mut left = m.bytes;
        let mut last_end = 0;
        for &(s, e) in &m.ranges[..m.n] {
            let mut a = s;
            while a < e && left > 0 {
                let p = a as *mut u64;
                if pass == 0 {
                    // SAFETY: [s, e) is RAM above the probe image that nothing else uses, and it
                    // is identity mapped (the kernel clipped the ranges to the mapped end).
                    unsafe { p.write_volatile(pattern(a)) };
                } else {
                    // SAFETY: as above.
                    if unsafe { p.read_volatile() } != pattern(a) {
                        return a;
                    }
                }
                a += 8;
                left -= 8;
            }
            last_end = e;
        }
        if left > 0 {
            return last_end;
        }
    }
    u64::MAX
}

/// Result of the memory test: Ok, or the first bad address.
pub fn memtest(m: &MemTest) -> Result<(), u64> {
    match user_call(memtest_loop, m as *const MemTest as u64) {
        Ok(u64::MAX) => Ok(()),
        Ok(a) => Err(a),
        Err(f) => Err(f.cr2),
    }
}
