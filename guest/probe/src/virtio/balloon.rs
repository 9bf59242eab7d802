//! virtio-balloon (type 5): queue 0 inflates, queue 1 deflates, queue 2 carries statistics
//! (with VIRTIO_BALLOON_F_STATS_VQ). The balloon's pages are 4 KiB frames of the free RAM above
//! the probe's DMA area, handed out from the top of memory down: page `i` of the balloon is
//! always the same frame, so the balloon needs no list of its own.

use super::queue::{rd, Queue};
use super::{idle, settle_irqs, wait_used, Virtio};
use crate::devices::Ctx;
use crate::kvmclock::now_ns;
use crate::mmio::w16;
use crate::serial::Line;

const F_STATS_VQ: u64 = 1 << 1;
/// PFNs per inflate/deflate request (one 4 KiB buffer).
const CHUNK: u64 = 1024;
/// Statistics sent: tags MEMFREE (4), MEMTOT (5), AVAIL (6); 10 bytes each.
const STAT_TAGS: [u16; 3] = [4, 5, 6];

struct Balloon<'a> {
    v: Virtio,
    inflate: Queue,
    deflate: Queue,
    stats: Option<Queue>,
    pfns: u64,
    stat_buf: u64,
    spare: &'a [(u64, u64)],
    /// Pages in the balloon, and the most it can hold.
    pages: u64,
    max: u64,
    ram: u64,
}

impl Balloon<'_> {
    /// Frame number of balloon page `i` (counted from the top of the spare RAM).
    fn pfn(&self, mut i: u64) -> u64 {
        for &(s, e) in self.spare.iter().rev() {
            let (lo, hi) = (s.div_ceil(4096), e / 4096);
            let n = hi.saturating_sub(lo);
            if i < n {
                return hi - 1 - i;
            }
            i -= n;
        }
        0
    }

    /// Sends balloon pages `[from, from + n)` on `q` (inflate or deflate), CHUNK at a time.
    fn send(&mut self, deflate: bool, from: u64, n: u64) -> bool {
        let mut done = 0;
        while done < n {
            let k = (n - done).min(CHUNK);
            let buf = crate::dma::slice(self.pfns, (k * 4) as usize);
            for (j, c) in buf.chunks_exact_mut(4).enumerate() {
                c.copy_from_slice(&(self.pfn(from + done + j as u64) as u32).to_le_bytes());
            }
            let q = if deflate {
                &mut self.deflate
            } else {
                &mut self.inflate
            };
            if q.push(&[rd(self.pfns, (k * 4) as u32)]).is_none() {
                return false;
            }
            q.kick();
            if !wait_used(q, 50_000, 5_000_000_000) {
                return false;
            }
            q.pop();
            done += k;
        }
        true
    }

    /// Fills the statistics buffer and hands it to the device.
    fn post_stats(&mut self) -> bool {
        let Some(q) = self.stats.as_mut() else {
            return false;
        };
        let total = self.ram;
        let spare: u64 = self.spare.iter().map(|&(s, e)| e - s).sum();
        let free = spare.saturating_sub(self.pages * 4096);
        for (i, &tag) in STAT_TAGS.iter().enumerate() {
            let at = self.stat_buf + 10 * i as u64;
            let val = if tag == 5 { total } else { free };
            w16(at, tag);
            // Entries are packed (10 bytes): write the value as bytes.
            for (b, x) in val.to_le_bytes().iter().enumerate() {
                crate::mmio::w8(at + 2 + b as u64, *x);
            }
        }
        let ok = q
            .push(&[rd(self.stat_buf, 10 * STAT_TAGS.len() as u32)])
            .is_some();
        q.kick();
        ok
    }
}

/// `balloon=on`: follows the device's target (config `num_pages`) for `balloon_secs` seconds,
/// inflating and deflating, and answers statistics requests.
pub fn run(c: &mut Ctx) {
    let secs = c.opts.balloon_secs;
    let limit = c.opts.balloon_changes;
    let Some(v) = c.open("balloon", 5, 0, F_STATS_VQ) else {
        return;
    };
    let inflate = v.queue(&mut c.dma, 0, 64);
    let deflate = v.queue(&mut c.dma, 1, 64);
    let stats = if v.features & F_STATS_VQ != 0 {
        v.queue(&mut c.dma, 2, 64)
    } else {
        None
    };
    let (Some(inflate), Some(deflate), Some(pfns), Some(stat_buf)) = (
        inflate,
        deflate,
        c.dma.alloc(CHUNK * 4, 4096),
        c.dma.alloc(64, 64),
    ) else {
        super::missing("balloon", true);
        return v.reset();
    };
    let spare = &c.spare[..c.nspare];
    let max: u64 = spare
        .iter()
        .map(|&(s, e)| (e / 4096).saturating_sub(s.div_ceil(4096)))
        .sum();
    let mut b = Balloon {
        v,
        inflate,
        deflate,
        stats,
        pfns,
        stat_buf,
        spare,
        pages: 0,
        max,
        ram: c.ram,
    };
    b.v.driver_ok();
    let mut nstats = 0u64;
    if b.post_stats() {
        nstats += 1;
    }
    let (mut inflated, mut deflated) = (0u64, 0u64);
    let deadline = now_ns().saturating_add(secs.saturating_mul(1_000_000_000));
    let mut seen_target = u64::MAX;
    let mut changes = 0u64;
    while now_ns() < deadline && (limit == 0 || changes < limit) {
        let target = (b.v.cfg32(0) as u64).min(b.max);
        if target != seen_target {
            seen_target = target;
            Line::new().s("balloon_target=").dec(b.v.cfg32(0) as u64);
        }
        if target > b.pages {
            let n = target - b.pages;
            if !b.send(false, b.pages, n) {
                break;
            }
            b.pages += n;
            inflated += n;
            changes += 1;
            b.v.cfg_w32(4, b.pages as u32);
            Line::new().s("balloon_actual=").dec(b.pages);
        } else if target < b.pages {
            let n = b.pages - target;
            if !b.send(true, target, n) {
                break;
            }
            b.pages = target;
            deflated += n;
            changes += 1;
            b.v.cfg_w32(4, b.pages as u32);
            Line::new().s("balloon_actual=").dec(b.pages);
        }
        if let Some(q) = b.stats.as_mut() {
            if q.pop().is_some() && b.post_stats() {
                nstats += 1;
            }
        }
        idle();
    }
    settle_irqs(&b.v);
    Line::new()
        .s("balloon_inflated=")
        .dec(inflated)
        .s(" balloon_deflated=")
        .dec(deflated)
        .s(" balloon_stats=")
        .dec(nstats)
        .s(" balloon_irqs=")
        .dec(b.v.irqs() as u64);
    b.v.reset();
}
