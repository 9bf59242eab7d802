//! virtio-blk (type 2): one request queue; requests are a 16-byte header (type, reserved,
//! sector), the data, and a status byte. Up to 16 requests in flight, 64 KiB each.

use super::queue::{rd, wr, Buf, Queue};
use super::{settle_irqs, wait_used_polled, Virtio};
use crate::devices::{BlkMode, Ctx};
use crate::dma::slice;
use crate::kvmclock::now_ns;
use crate::mmio::{r8, w32, w64, w8};
use crate::serial::Line;

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// VIRTIO_BLK_S_OK, _IOERR, _UNSUPP; 0xff: no answer.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_TIMEOUT: u8 = 0xff;

/// Most requests in flight, and the largest request (sectors).
const SLOTS: usize = 16;
const MAX_SECTORS: u64 = 128;

struct Blk {
    v: Virtio,
    q: Queue,
    /// 32 bytes per slot: header at 0, status byte at 16.
    hdr: u64,
    /// 64 KiB of data per slot.
    data: u64,
    slot_of: [u8; 256],
    /// Per slot: first sector and sector count of the request it carries.
    req: [(u64, u64); SLOTS],
    spin_ns: u64,
}

/// Word `w` (0..63) of sector `s` of the test pattern for `seed` (see README.md).
pub fn pattern(seed: u64, s: u64, w: u64) -> u64 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (s.wrapping_mul(64) + w);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Blk {
    fn issue(&mut self, slot: usize, typ: u32, sector: u64, data: Option<Buf>) -> bool {
        let h = self.hdr + 32 * slot as u64;
        w32(h, typ);
        w32(h + 4, 0);
        w64(h + 8, sector);
        w8(h + 16, S_TIMEOUT);
        let st = wr(h + 16, 1);
        let head = match data {
            Some(d) => self.q.push(&[rd(h, 16), d, st]),
            None => self.q.push(&[rd(h, 16), st]),
        };
        match head {
            Some(hd) => {
                self.slot_of[hd as usize] = slot as u8;
                true
            }
            None => false,
        }
    }

    /// Pops one completion: (slot, status).
    fn complete(&mut self) -> Option<(usize, u8)> {
        let (head, _) = self.q.pop()?;
        let slot = self.slot_of[head as usize] as usize % SLOTS;
        Some((slot, r8(self.hdr + 32 * slot as u64 + 16)))
    }

    /// One request, waited for: its status.
    fn sync(&mut self, typ: u32, sector: u64, data: Option<Buf>) -> u8 {
        if !self.issue(0, typ, sector, data) {
            return S_TIMEOUT;
        }
        self.q.kick();
        let done = wait_used_polled(&self.q, self.spin_ns, 10_000_000_000);
        self.q.quiet(false);
        if !done {
            return S_TIMEOUT;
        }
        self.complete().map_or(S_TIMEOUT, |(_, s)| s)
    }

    fn slot_buf(&self, slot: usize) -> u64 {
        self.data + (slot as u64) * MAX_SECTORS * 512
    }

    /// Streams requests of type `typ` (IN or OUT) over `count` chunks of `chunk` sectors,
    /// `qd` in flight. The chunk start comes from `at(i)`; `fill` prepares a write buffer,
    /// `check` looks at read data and may return a bad sector. Returns the first bad sector
    /// (`Err(Ok(s))`) or a failed status (`Err(Err(status))`).
    #[allow(clippy::too_many_arguments)] // one call shape for five different streams
    fn stream(
        &mut self,
        typ: u32,
        count: u64,
        chunk: u64,
        qd: usize,
        at: &mut dyn FnMut(u64) -> u64,
        fill: &dyn Fn(&mut [u8], u64),
        check: &dyn Fn(&[u8], u64) -> Option<u64>,
    ) -> Result<(), Result<u64, u8>> {
        let (mut next, mut inflight) = (0u64, 0usize);
        let mut free = [0u8; SLOTS];
        let mut nfree = qd.min(SLOTS);
        for (i, f) in free.iter_mut().enumerate() {
            *f = i as u8;
        }
        let mut result = Ok(());
        while (next < count && result.is_ok()) || inflight > 0 {
            while inflight < qd && next < count && nfree > 0 && result.is_ok() {
                nfree -= 1;
                let slot = free[nfree] as usize;
                let sector = at(next);
                let len = (chunk * 512) as usize;
                let buf = self.slot_buf(slot);
                if typ == T_OUT {
                    fill(slice(buf, len), sector);
                }
                self.req[slot] = (sector, chunk);
                let d = if typ == T_OUT {
                    rd(buf, len as u32)
                } else {
                    wr(buf, len as u32)
                };
                if !self.issue(slot, typ, sector, Some(d)) {
                    return Err(Err(S_TIMEOUT));
                }
                next += 1;
                inflight += 1;
            }
            self.q.kick();
            if !wait_used_polled(&self.q, self.spin_ns, 10_000_000_000) {
                self.q.quiet(false);
                return Err(Err(S_TIMEOUT));
            }
            while let Some((slot, st)) = self.complete() {
                inflight -= 1;
                free[nfree] = slot as u8;
                nfree += 1;
                let (sector, n) = self.req[slot];
                if st != S_OK {
                    result = Err(Err(st));
                } else if typ == T_IN {
                    if let Some(bad) = check(slice(self.slot_buf(slot), (n * 512) as usize), sector)
                    {
                        result = match result {
                            Err(Ok(b)) if b < bad => Err(Ok(b)),
                            Err(Err(e)) => Err(Err(e)),
                            _ => Err(Ok(bad)),
                        };
                    }
                }
            }
        }
        self.q.quiet(false);
        result
    }
}

fn fill_pattern(seed: u64) -> impl Fn(&mut [u8], u64) {
    move |buf: &mut [u8], sector: u64| {
        for (i, c) in buf.chunks_exact_mut(8).enumerate() {
            let i = i as u64;
            c.copy_from_slice(&pattern(seed, sector + i / 64, i % 64).to_le_bytes());
        }
    }
}

fn check_pattern(seed: u64) -> impl Fn(&[u8], u64) -> Option<u64> {
    move |buf: &[u8], sector: u64| {
        for (i, c) in buf.chunks_exact(8).enumerate() {
            let i = i as u64;
            if c != pattern(seed, sector + i / 64, i % 64).to_le_bytes() {
                return Some(sector + i / 64);
            }
        }
        None
    }
}

fn status_word(s: u8) -> &'static str {
    match s {
        S_OK => "ok",
        S_IOERR => "ioerr",
        2 => "unsupported",
        _ => "timeout",
    }
}

fn mbps(bytes: u64, ns: u64) -> u64 {
    if ns == 0 {
        0
    } else {
        (bytes as u128 * 1000 / ns as u128) as u64
    }
}

/// `blk=read|write|verify|bench` on the `blk_dev`-th virtio-blk device.
pub fn run(c: &mut Ctx, mode: BlkMode) {
    let o = c.opts;
    Line::new()
        .s("blk_devices=")
        .dec(super::count(c.funcs(), 2) as u64);
    let Some(v) = c.open("blk", 2, o.blk_dev, F_RO | F_FLUSH) else {
        return;
    };
    let (q, hdr, data) = (
        v.queue(&mut c.dma, 0, 128),
        c.dma.alloc(32 * SLOTS as u64, 64),
        c.dma.alloc(SLOTS as u64 * MAX_SECTORS * 512, 4096),
    );
    let (Some(q), Some(hdr), Some(data)) = (q, hdr, data) else {
        super::missing("blk", true);
        return v.reset();
    };
    v.driver_ok();
    let mut b = Blk {
        v,
        q,
        hdr,
        data,
        slot_of: [0; 256],
        req: [(0, 0); SLOTS],
        spin_ns: 50_000,
    };
    let capacity = b.v.cfg64(0);
    let ro = b.v.features & F_RO != 0;
    let id = b.data;
    let st = b.sync(T_GET_ID, 0, Some(wr(id, 20)));
    let serial = slice(id, 20);
    let n = if st == S_OK {
        serial.iter().position(|&c| c == 0).unwrap_or(20)
    } else {
        0
    };
    Line::new()
        .s("blk_capacity=")
        .dec(capacity)
        .s(" blk_ro=")
        .dec(ro as u64)
        .s(" blk_serial=")
        .escaped(&serial[..n]);

    let sectors = o.blk_sectors.min(capacity);
    let seed = o.blk_seed;
    let qd = o.blk_qd as usize;
    // Chunk i covers sectors [i*128, min((i+1)*128, sectors)); a short tail goes on its own.
    let tail = sectors % MAX_SECTORS;
    let whole = sectors / MAX_SECTORS;
    let none_fill = |_: &mut [u8], _: u64| {};
    let none_check = |_: &[u8], _: u64| None;
    let run_pattern = |b: &mut Blk, typ: u32| -> Result<(), Result<u64, u8>> {
        let f = fill_pattern(seed);
        let k = check_pattern(seed);
        if whole > 0 {
            b.stream(
                typ,
                whole,
                MAX_SECTORS,
                qd,
                &mut |i| i * MAX_SECTORS,
                &f,
                &k,
            )?;
        }
        if tail > 0 {
            b.stream(typ, 1, tail, 1, &mut |_| whole * MAX_SECTORS, &f, &k)?;
        }
        Ok(())
    };
    match mode {
        BlkMode::Write => {
            let w = run_pattern(&mut b, T_OUT);
            Line::new().s("blk_write=").s(match w {
                Ok(()) => "ok",
                Err(Err(s)) => status_word(s),
                Err(Ok(_)) => "fail",
            });
            if w.is_ok() {
                flush(&mut b);
                verify(run_pattern(&mut b, T_IN));
            }
        }
        BlkMode::Verify => verify(run_pattern(&mut b, T_IN)),
        BlkMode::Read => {
            let sum = core::cell::Cell::new(0xcbf2_9ce4_8422_2325u64);
            let add = |buf: &[u8], _: u64| {
                let mut h = sum.get();
                for &x in buf {
                    h = (h ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3);
                }
                sum.set(h);
                None
            };
            // Queue depth 1 keeps the checksum in sector order.
            let mut r = Ok(());
            if whole > 0 {
                r = b.stream(
                    T_IN,
                    whole,
                    MAX_SECTORS,
                    1,
                    &mut |i| i * MAX_SECTORS,
                    &none_fill,
                    &add,
                );
            }
            if r.is_ok() && tail > 0 {
                r = b.stream(
                    T_IN,
                    1,
                    tail,
                    1,
                    &mut |_| whole * MAX_SECTORS,
                    &none_fill,
                    &add,
                );
            }
            match r {
                Ok(()) => Line::new().s("blk_read=ok blk_read_sum=").hex(sum.get()),
                Err(Err(s)) => Line::new().s("blk_read=").s(status_word(s)),
                Err(Ok(_)) => Line::new().s("blk_read=fail"),
            };
        }
        BlkMode::Bench => {
            b.spin_ns = o.blk_spin_us * 1000;
            let chunks = (o.blk_mib * 16).min(capacity / MAX_SECTORS).max(1);
            let bytes = chunks * MAX_SECTORS * 512;
            let t0 = now_ns();
            let w = b.stream(
                T_OUT,
                chunks,
                MAX_SECTORS,
                qd,
                &mut |i| i * MAX_SECTORS,
                &none_fill,
                &none_check,
            );
            let tw = now_ns() - t0;
            if w.is_ok() {
                flush(&mut b);
            } else {
                Line::new().s("blk_write=").s(match w {
                    Err(Err(s)) => status_word(s),
                    _ => "fail",
                });
            }
            let t0 = now_ns();
            let r = b.stream(
                T_IN,
                chunks,
                MAX_SECTORS,
                qd,
                &mut |i| i * MAX_SECTORS,
                &none_fill,
                &none_check,
            );
            let tr = now_ns() - t0;
            let pages = (capacity / 8).max(1);
            let mut x = 0x2545_f491_4f6c_dd1du64 ^ seed;
            let mut rnd = |_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % pages) * 8
            };
            let t0 = now_ns();
            let rr = b.stream(T_IN, o.blk_rand, 8, qd, &mut rnd, &none_fill, &none_check);
            let tn = now_ns() - t0;
            let iops = if tn == 0 {
                0
            } else {
                (o.blk_rand as u128 * 1_000_000_000 / tn as u128) as u64
            };
            Line::new()
                .s("blk_seq_write_mbps=")
                .dec(if w.is_ok() { mbps(bytes, tw) } else { 0 })
                .s(" blk_seq_read_mbps=")
                .dec(if r.is_ok() { mbps(bytes, tr) } else { 0 })
                .s(" blk_rand_read_iops=")
                .dec(if rr.is_ok() { iops } else { 0 });
            Line::new()
                .s("blk_bench_bytes=")
                .dec(bytes)
                .s(" blk_bench_rand=")
                .dec(o.blk_rand)
                .s(" blk_bench_qd=")
                .dec(qd as u64);
        }
    }
    settle_irqs(&b.v);
    Line::new().s("blk_irqs=").dec(b.v.irqs() as u64);
    {
        use super::queue::{KICKS, KICKS_SKIPPED, KICK_NS};
        use core::sync::atomic::Ordering::Relaxed;
        Line::new()
            .s("blk_kicks=")
            .dec(KICKS.load(Relaxed))
            .s(" blk_kick_us=")
            .dec(KICK_NS.load(Relaxed) / 1000)
            .s(" blk_kicks_skipped=")
            .dec(KICKS_SKIPPED.load(Relaxed));
    }
    b.v.reset();
}

fn flush(b: &mut Blk) {
    let s = if b.v.features & F_FLUSH == 0 {
        2
    } else {
        b.sync(T_FLUSH, 0, None)
    };
    Line::new().s("blk_flush=").s(status_word(s));
}

fn verify(r: Result<(), Result<u64, u8>>) {
    let mut l = Line::new();
    l.s("blk_verify=");
    match r {
        Ok(()) => l.s("ok"),
        Err(Ok(s)) => l.s("fail:").dec(s),
        Err(Err(s)) => l.s(status_word(s)),
    };
}
