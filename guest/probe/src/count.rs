//! `count=N`: a long-running workload for snapshot and migration tests. At CPL3 it keeps a
//! round counter and writes one 64-bit word per round into a 4 MiB region (a different page
//! each round), and every 10 ms of kvmclock prints
//! `count=<tick> rounds=<r> clock=<ns> sum=0x<FNV-1a 64 of the region>` until tick N, then
//! `count_done=<N>`. The region's content after round r is a function of r alone (see
//! README.md), so a host can check that a restored VM's memory is what it was.

use crate::kvmclock;
use crate::serial::Line;
use crate::trap::user_call;

/// Pages in the region.
pub const PAGES: u64 = 1024;
/// 64-bit words per page.
pub const WORDS: u64 = 512;
/// Size of the region in bytes.
pub const REGION_BYTES: u64 = PAGES * WORDS * 8;
/// Guest nanoseconds between two reports.
const TICK_NS: u64 = 10_000_000;

/// The value written in round `r`.
pub fn value(r: u64) -> u64 {
    let mut x = r.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Arguments of `count_loop`, shared with CPL3 through the identity map.
#[repr(C)]
struct Count {
    ticks: u64,
    region: u64,
}

fn checksum(region: &[u64]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &v in region {
        h = (h ^ v).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

extern "sysv64" fn count_loop(arg: u64) -> u64 {
    // SAFETY: `arg` is the address of a live `Count` on the kernel stack (identity mapped, user
    // accessible) that the kernel does not touch until this call returns.
    let c = unsafe { &*(arg as *const Count) };
    let n = (REGION_BYTES / 8) as usize;
    // SAFETY: the kernel hands over `region` as REGION_BYTES of otherwise unused RAM, 8-byte
    // aligned and identity mapped.
    let region = unsafe { core::slice::from_raw_parts_mut(c.region as *mut u64, n) };
    region.fill(0);
    let mut rounds = 0u64;
    let mut next = kvmclock::now_ns() + TICK_NS;
    for tick in 1..=c.ticks {
        loop {
            for _ in 0..1024 {
                let k = rounds % (PAGES * WORDS);
                rounds += 1;
                let at = (k % PAGES) * WORDS + k / PAGES;
                // SAFETY: `at` < PAGES * WORDS, the region's length in words.
                unsafe {
                    core::ptr::write_volatile(region.as_mut_ptr().add(at as usize), value(rounds))
                };
            }
            if kvmclock::now_ns() >= next {
                break;
            }
        }
        let now = kvmclock::now_ns();
        next = now + TICK_NS;
        Line::new()
            .s("count=")
            .dec(tick)
            .s(" rounds=")
            .dec(rounds)
            .s(" clock=")
            .dec(now)
            .s(" sum=")
            .hex(checksum(region));
    }
    0
}

/// Runs `ticks` reports' worth of the workload over the RAM at `region` (REGION_BYTES).
pub fn run(ticks: u64, region: Option<u64>) {
    let Some(region) = region.filter(|_| kvmclock::enabled()) else {
        Line::new().s("count=unavailable");
        return;
    };
    let c = Count { ticks, region };
    if user_call(count_loop, &c as *const Count as u64).is_ok() {
        Line::new().s("count_done=").dec(ticks);
    }
}
