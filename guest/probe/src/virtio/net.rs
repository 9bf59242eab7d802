//! virtio-net (type 1): queue 0 receives, queue 1 transmits. Every buffer is one descriptor
//! carrying the 12-byte virtio-net header and the frame; buffer `i` of a queue belongs to
//! descriptor `i`, so a used entry names its buffer directly.
//!
//! `net=on` answers ARP requests and ICMP echo requests for `net_ip`. `net=bench` sends
//! `net_tx_frames` test frames (format in README.md) as fast as the ring allows, then counts
//! what arrives.

use super::queue::{rd, wr, Queue};
use super::{settle_irqs, wait_used, Virtio};
use crate::devices::{Ctx, NetMode};
use crate::dma::slice;
use crate::kvmclock::now_ns;
use crate::serial::Line;

const F_MAC: u64 = 1 << 5;
/// virtio_net_hdr with num_buffers (always present with VERSION_1).
const HDR: usize = 12;
/// Bytes per buffer (header + a 1514-byte frame, rounded).
const BUF: u64 = 2048;
/// Descriptors per queue.
const QSIZE: u16 = 256;
/// EtherType of the bench frames (IEEE 802 local experimental 1).
pub const BENCH_ETHERTYPE: u16 = 0x88b5;

struct Net {
    v: Virtio,
    rx: Queue,
    tx: Queue,
    rxbuf: u64,
    txbuf: u64,
    mac: [u8; 6],
    rx_frames: u64,
    tx_frames: u64,
}

impl Net {
    /// Gives the device an empty receive buffer (the one tied to the next free descriptor).
    fn post_rx(&mut self) -> bool {
        let Some(d) = self.rx.next_head() else {
            return false;
        };
        self.rx
            .push(&[wr(self.rxbuf + d as u64 * BUF, BUF as u32)])
            .is_some()
    }

    /// Takes back the transmit buffers the device is done with.
    fn reclaim_tx(&mut self) {
        while self.tx.pop().is_some() {}
    }

    /// A transmit buffer to build a frame in (after the header), reclaiming if none is free.
    fn tx_slot(&mut self) -> Option<(u16, &'static mut [u8])> {
        if self.tx.num_free == 0 {
            self.reclaim_tx();
        }
        let d = self.tx.next_head()?;
        let b = slice(self.txbuf + d as u64 * BUF, BUF as usize);
        b[..HDR].fill(0);
        Some((d, &mut b[HDR..]))
    }

    /// Queues the frame of `len` bytes built in descriptor `d`'s buffer (not yet kicked).
    fn send(&mut self, d: u16, len: usize) {
        if self
            .tx
            .push(&[rd(self.txbuf + d as u64 * BUF, (HDR + len) as u32)])
            .is_some()
        {
            self.tx_frames += 1;
        }
    }
}

fn csum(data: &[u8]) -> u16 {
    let mut s = 0u32;
    for c in data.chunks(2) {
        s += (c[0] as u32) << 8 | *c.get(1).unwrap_or(&0) as u32;
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// What a received frame asks for.
enum Answer {
    None,
    Arp,
    Icmp,
}

/// Builds the answer to frame `f` (ARP request or ICMP echo request for `ip`) into `out`;
/// returns its kind and length.
fn answer(f: &[u8], mac: &[u8; 6], ip: &[u8; 4], out: &mut [u8]) -> (Answer, usize) {
    if f.len() < 42 {
        return (Answer::None, 0);
    }
    match be16(f, 12) {
        0x0806
            if be16(f, 14) == 1
                && be16(f, 16) == 0x0800
                && f[18] == 6
                && f[19] == 4
                && be16(f, 20) == 1
                && f[38..42] == ip[..] =>
        {
            out[..42].copy_from_slice(&f[..42]);
            out[0..6].copy_from_slice(&f[22..28]);
            out[6..12].copy_from_slice(mac);
            out[21] = 2;
            out[22..28].copy_from_slice(mac);
            out[28..32].copy_from_slice(ip);
            out[32..38].copy_from_slice(&f[22..28]);
            out[38..42].copy_from_slice(&f[28..32]);
            out[42..60].fill(0);
            (Answer::Arp, 60)
        }
        0x0800 => {
            let ihl = ((f[14] & 0xf) as usize) * 4;
            let total = be16(f, 16) as usize;
            if f[14] >> 4 != 4
                || ihl < 20
                || total < ihl + 8
                || 14 + total > f.len()
                || f[23] != 1
                || f[30..34] != ip[..]
            {
                return (Answer::None, 0);
            }
            if f[14 + ihl] != 8 || be16(f, 20) & 0x3fff != 0 {
                return (Answer::None, 0);
            }
            let n = 14 + total;
            out[..n].copy_from_slice(&f[..n]);
            out[0..6].copy_from_slice(&f[6..12]);
            out[6..12].copy_from_slice(mac);
            out[26..30].copy_from_slice(ip);
            out[30..34].copy_from_slice(&f[26..30]);
            out[22] = 64;
            out[24..26].fill(0);
            let c = csum(&out[14..14 + ihl]);
            out[24..26].copy_from_slice(&c.to_be_bytes());
            let icmp = 14 + ihl;
            out[icmp] = 0;
            out[icmp + 2..icmp + 4].fill(0);
            let c = csum(&out[icmp..n]);
            out[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
            (Answer::Icmp, n.max(60))
        }
        _ => (Answer::None, 0),
    }
}

fn mac_line<'a>(l: &'a mut Line, mac: &[u8; 6]) -> &'a mut Line {
    for (i, &b) in mac.iter().enumerate() {
        if i > 0 {
            l.s(":");
        }
        l.b(&[
            b"0123456789abcdef"[(b >> 4) as usize],
            b"0123456789abcdef"[(b & 15) as usize],
        ]);
    }
    l
}

fn per_sec(n: u64, ns: u64) -> u64 {
    if ns == 0 {
        0
    } else {
        (n as u128 * 1_000_000_000 / ns as u128) as u64
    }
}

/// `net=on|bench` on the `net_dev`-th virtio-net device.
pub fn run(c: &mut Ctx, mode: NetMode) {
    let o = c.opts;
    let Some(v) = c.open("net", 1, o.net_dev, F_MAC) else {
        return;
    };
    let rx = v.queue(&mut c.dma, 0, QSIZE);
    let tx = v.queue(&mut c.dma, 1, QSIZE);
    let (Some(rx), Some(tx)) = (rx, tx) else {
        super::missing("net", true);
        return v.reset();
    };
    let (Some(rxbuf), Some(txbuf)) = (
        c.dma.alloc(rx.size as u64 * BUF, 4096),
        c.dma.alloc(tx.size as u64 * BUF, 4096),
    ) else {
        super::missing("net", true);
        return v.reset();
    };
    let mut mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    if v.features & F_MAC != 0 {
        for (i, m) in mac.iter_mut().enumerate() {
            *m = v.cfg8(i as u64);
        }
    }
    let mut n = Net {
        v,
        rx,
        tx,
        rxbuf,
        txbuf,
        mac,
        rx_frames: 0,
        tx_frames: 0,
    };
    while n.post_rx() {}
    n.v.driver_ok();
    n.rx.kick();
    {
        let mut l = Line::new();
        l.s("net_ready=");
        mac_line(&mut l, &mac);
    }
    match mode {
        NetMode::On => responder(&mut n, &o),
        NetMode::Bench => bench(&mut n, &o),
    }
    settle_irqs(&n.v);
    Line::new().s("net_irqs=").dec(n.v.irqs() as u64);
    n.v.reset();
}

fn responder(n: &mut Net, o: &crate::devices::DevOpts) {
    let deadline = now_ns().saturating_add(o.net_secs.saturating_mul(1_000_000_000));
    let (mut arp, mut icmp) = (0u64, 0u64);
    while now_ns() < deadline && (o.net_frames == 0 || arp + icmp < o.net_frames) {
        if !wait_used(&n.rx, 20_000, deadline.saturating_sub(now_ns())) {
            break;
        }
        while let Some((d, len)) = n.rx.pop() {
            n.rx_frames += 1;
            let f =
                &slice(n.rxbuf + d as u64 * BUF, BUF as usize)[..(len as usize).min(BUF as usize)];
            if f.len() > HDR {
                let mac = n.mac;
                if let Some((t, out)) = n.tx_slot() {
                    match answer(&f[HDR..], &mac, &o.net_ip, out) {
                        (Answer::Arp, l) => {
                            arp += 1;
                            n.send(t, l);
                        }
                        (Answer::Icmp, l) => {
                            icmp += 1;
                            n.send(t, l);
                        }
                        (Answer::None, _) => {}
                    }
                }
            }
            n.post_rx();
        }
        n.tx.kick();
        n.rx.kick();
        n.reclaim_tx();
    }
    let mut l = Line::new();
    l.s("net_mac=");
    mac_line(&mut l, &n.mac);
    l.s(" net_rx=")
        .dec(n.rx_frames)
        .s(" net_tx=")
        .dec(n.tx_frames)
        .s(" net_arp=")
        .dec(arp)
        .s(" net_icmp=")
        .dec(icmp);
}

fn bench(n: &mut Net, o: &crate::devices::DevOpts) {
    // Transmit: broadcast frames of `net_frame_len` bytes, as fast as descriptors come back.
    let len = o.net_frame_len as usize;
    let mac = n.mac;
    let t0 = now_ns();
    let mut sent = 0u64;
    while sent < o.net_tx_frames {
        let Some((d, f)) = n.tx_slot() else {
            n.tx.kick();
            if !wait_used(&n.tx, 1_000_000, 5_000_000_000) {
                break;
            }
            continue;
        };
        f[0..6].fill(0xff);
        f[6..12].copy_from_slice(&mac);
        f[12..14].copy_from_slice(&BENCH_ETHERTYPE.to_be_bytes());
        f[14..18].copy_from_slice(b"FVPB");
        f[18..22].copy_from_slice(&(sent as u32).to_be_bytes());
        for (i, b) in f[22..len].iter_mut().enumerate() {
            *b = i as u8;
        }
        n.send(d, len);
        sent += 1;
        if n.tx.num_free == 0 || sent == o.net_tx_frames {
            n.tx.kick();
        }
    }
    while n.tx.num_free < n.tx.size && wait_used(&n.tx, 1_000_000, 1_000_000_000) {
        n.reclaim_tx();
    }
    let tns = now_ns() - t0;
    Line::new()
        .s("net_tx_frames=")
        .dec(sent)
        .s(" net_tx_fps=")
        .dec(per_sec(sent, tns))
        .s(" net_tx_mbps=")
        .dec(per_sec(sent * len as u64, tns) / 1_000_000);

    // Receive: count frames and bytes for `net_secs` (or `net_frames` frames); the rate runs
    // from the first frame to the last.
    Line::new().s("net_rx=listening");
    let deadline = now_ns().saturating_add(o.net_secs.saturating_mul(1_000_000_000));
    let (mut frames, mut bytes, mut first, mut last, mut reflected) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    while now_ns() < deadline && (o.net_frames == 0 || frames < o.net_frames) {
        if !wait_used(&n.rx, 200_000, deadline.saturating_sub(now_ns())) {
            break;
        }
        let t = now_ns();
        if first == 0 {
            first = t;
        }
        last = t;
        while let Some((d, l)) = n.rx.pop() {
            frames += 1;
            bytes += (l as u64).saturating_sub(HDR as u64);
            if o.net_reflect {
                let f = &slice(n.rxbuf + d as u64 * BUF, BUF as usize)
                    [HDR..(l as usize).clamp(HDR, BUF as usize)];
                if f.len() >= 60 && be16(f, 12) == BENCH_ETHERTYPE {
                    if let Some((t, out)) = n.tx_slot() {
                        out[..f.len()].copy_from_slice(f);
                        out[0..6].copy_from_slice(&f[6..12]);
                        out[6..12].copy_from_slice(&mac);
                        n.send(t, f.len());
                        reflected += 1;
                    }
                }
            }
            n.post_rx();
        }
        n.rx.kick();
        n.tx.kick();
    }
    n.reclaim_tx();
    n.rx_frames = frames;
    let ns = last - first;
    Line::new()
        .s("net_rx_frames=")
        .dec(frames)
        .s(" net_rx_bytes=")
        .dec(bytes)
        .s(" net_rx_fps=")
        .dec(per_sec(frames, ns))
        .s(" net_rx_mbps=")
        .dec(per_sec(bytes, ns) / 1_000_000);
    if o.net_reflect {
        Line::new().s("net_reflected=").dec(reflected);
    }
}
