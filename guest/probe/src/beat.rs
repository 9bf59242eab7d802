//! `beat=N`: a heartbeat for live-migration and snapshot benchmarks. At CPL3 it prints `hb=<seq>`
//! (seq from 1) every `beat_us` microseconds of kvmclock (default 1000), N times (every 100th
//! line with ` dirtied=<pages so far> clock=<kvmclock ns>` when dirtying), then
//! `beat_done=<N> dirtied=<pages> beat_ns=<ns>`. A host that timestamps the lines sees the
//! guest's pauses (a migration's downtime) as gaps in the stream. After a pause the next beat
//! comes at once and the period starts again from there (no burst of late beats).
//!
//! With `dirty_mibs=R` it also dirties R MiB of 4 KiB pages per second of kvmclock (one 64-bit
//! word per page, the pages of a `dirty_mib=M` MiB region of free RAM in turn, default 128),
//! spread over each period (a late beat's period counts for its real length, up to two
//! periods); a period's quota that could not be written before the next beat is dropped, not
//! caught up later. With `beat_fill=on` it first writes a non-zero word into
//! every page of that region (so a migration has that much memory that is not zero to send).

use crate::kvmclock;
use crate::serial::Line;
use crate::trap::user_call;

const PAGE: u64 = 4096;

/// Arguments and results of `beat_loop`, shared with CPL3 through the identity map.
#[repr(C)]
struct Beat {
    beats: u64,
    period_ns: u64,
    /// Pages to dirty per second.
    pages_per_sec: u64,
    region: u64,
    region_pages: u64,
    /// Non-zero: fill every page of the region before the first beat.
    fill: u64,
    /// Out: pages written.
    dirtied: u64,
    /// Out: kvmclock ns from the first to the last beat.
    ns: u64,
}

extern "sysv64" fn beat_loop(arg: u64) -> u64 {
    // SAFETY: `arg` is the address of a live `Beat` on the kernel stack (identity mapped, user
    // accessible) that the kernel does not touch until this call returns.
    let b = unsafe { &mut *(arg as *mut Beat) };
    if b.fill != 0 {
        for p in 0..b.region_pages {
            // SAFETY: page `p` of the region handed over by the kernel (see below).
            unsafe { core::ptr::write_volatile((b.region + p * PAGE) as *mut u64, !p) };
        }
    }
    let start = kvmclock::now_ns();
    let mut next = start + b.period_ns;
    let mut seq = 1u64;
    let mut page = 0u64;
    let mut dirtied = 0u64;
    // Pages still to write in this period, and the remainder (in page-nanoseconds) carried.
    let mut quota = 0u64;
    let mut carry = 0u64;
    let mut last = start;
    while seq <= b.beats {
        let now = kvmclock::now_ns();
        if now >= next {
            let mut l = Line::new();
            l.s("hb=").dec(seq);
            if seq.is_multiple_of(100) && b.pages_per_sec > 0 {
                l.s(" dirtied=").dec(dirtied).s(" clock=").dec(now);
            }
            drop(l);
            seq += 1;
            next += b.period_ns;
            if next <= now {
                next = now + b.period_ns;
            }
            if b.pages_per_sec > 0 {
                // The time since the last beat (late beats owe more), at most two periods (a
                // pause of the guest is not caught up).
                let since = (now - last).min(2 * b.period_ns);
                let owed = b.pages_per_sec * since + carry;
                quota = owed / 1_000_000_000;
                carry = owed % 1_000_000_000;
                last = now;
            }
            continue;
        }
        let mut n = 0;
        while quota > 0 && n < 8 {
            let word = (dirtied / b.region_pages) % (PAGE / 8);
            let at = b.region + page * PAGE + word * 8;
            // SAFETY: `at` lies in the region of `region_pages` pages of otherwise unused RAM the
            // kernel handed over (identity mapped, user accessible), 8-byte aligned.
            unsafe { core::ptr::write_volatile(at as *mut u64, dirtied) };
            page += 1;
            if page == b.region_pages {
                page = 0;
            }
            dirtied += 1;
            quota -= 1;
            n += 1;
        }
    }
    b.dirtied = dirtied;
    b.ns = kvmclock::now_ns() - start;
    0
}

fn num(cmd: &[u8], key: &[u8]) -> Option<u64> {
    cmd.split(|&c| c == b' ' || c == b'\t' || c == b'\n')
        .find_map(|tok| tok.strip_prefix(key)?.strip_prefix(b"="))
        .and_then(crate::parse_num)
}

/// Runs the heartbeat if the command line asks for it; `free` are the RAM ranges above the image.
pub fn run(cmd: &[u8], free: &crate::user::MemTest) {
    let Some(beats) = num(cmd, b"beat") else {
        return;
    };
    if !kvmclock::enabled() {
        Line::new().s("beat=unavailable");
        return;
    }
    let period_ns = num(cmd, b"beat_us").unwrap_or(1000).max(1) * 1000;
    let rate = num(cmd, b"dirty_mibs").unwrap_or(0);
    let fill = cmd.split(|&c| c == b' ').any(|t| t == b"beat_fill=on");
    let bytes = num(cmd, b"dirty_mib").unwrap_or(128).max(1) << 20;
    let region = free.ranges[..free.n].iter().find_map(|r| {
        let s = (r.0 + PAGE - 1) & !(PAGE - 1);
        (r.1 > s && r.1 - s >= bytes).then_some(s)
    });
    let (region, region_pages) = match region {
        Some(r) if rate > 0 || fill => (r, bytes / PAGE),
        Some(_) => (0, 0),
        None => {
            Line::new().s("beat_dirty=no_room");
            (0, 0)
        }
    };
    let mut b = Beat {
        beats,
        period_ns,
        pages_per_sec: rate * (1 << 20) / PAGE,
        region,
        region_pages,
        fill: fill as u64,
        dirtied: 0,
        ns: 0,
    };
    if user_call(beat_loop, &mut b as *mut Beat as u64).is_ok() {
        Line::new()
            .s("beat_done=")
            .dec(beats)
            .s(" dirtied=")
            .dec(b.dirtied)
            .s(" beat_ns=")
            .dec(b.ns);
    }
}
