//! virtio-vsock (type 19): queue 0 receives, 1 transmits, 2 carries events. Packets are a
//! 44-byte header and an optional payload, always in two descriptors (header, data) — the
//! layout every device implementation accepts. One stream connection at a time.
//!
//! Credit: the probe advertises `BUF_ALLOC` bytes and counts a byte as forwarded once it has
//! been echoed (or printed), so a peer can never have more unechoed bytes outstanding than the
//! probe can hold; it sends only what the peer's credit allows.

use super::queue::{rd, wr, Queue};
use super::{idle, settle_irqs, Virtio};
use crate::devices::{Ctx, VsockMode};
use crate::dma::slice;
use crate::kvmclock::now_ns;
use crate::serial::Line;

const HDR: u64 = 44;
const DATA: u64 = 4096;
const RX_SLOTS: usize = 32;
const TX_SLOTS: usize = 32;
const BUF_ALLOC: u32 = 64 * 1024;
const HOST_CID: u64 = 2;

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const TYPE_STREAM: u16 = 1;

/// A packet header (the fields the probe uses).
#[derive(Clone, Copy, Default)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

fn get(b: &[u8], at: usize, n: usize) -> u64 {
    let mut v = [0u8; 8];
    v[..n].copy_from_slice(&b[at..at + n]);
    u64::from_le_bytes(v)
}

impl Hdr {
    fn read(b: &[u8]) -> Hdr {
        Hdr {
            src_cid: get(b, 0, 8),
            dst_cid: get(b, 8, 8),
            src_port: get(b, 16, 4) as u32,
            dst_port: get(b, 20, 4) as u32,
            len: get(b, 24, 4) as u32,
            op: get(b, 30, 2) as u16,
            flags: get(b, 32, 4) as u32,
            buf_alloc: get(b, 36, 4) as u32,
            fwd_cnt: get(b, 40, 4) as u32,
        }
    }

    fn write(&self, b: &mut [u8]) {
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
    }
}

/// Connection state.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Connecting,
    Open,
    Closed,
    Reset,
}

struct Vsock {
    v: Virtio,
    rx: Queue,
    tx: Queue,
    /// Slot memory: 64 bytes of header then DATA bytes, per slot.
    rxmem: u64,
    txmem: u64,
    rx_slot_of: [u8; 256],
    tx_slot_of: [u8; 256],
    tx_free: [u8; TX_SLOTS],
    tx_nfree: usize,
    cid: u64,
    local_port: u32,
    peer_port: u32,
    state: State,
    /// Bytes received and forwarded (echoed/printed), bytes sent; peer's credit fields.
    rx_cnt: u32,
    fwd_cnt: u32,
    tx_cnt: u32,
    peer_alloc: u32,
    peer_fwd: u32,
    /// Bytes received and not yet echoed (echo mode), or the reply (connect mode).
    pending: u64,
    npending: usize,
}

const SLOT: u64 = 64 + DATA;

impl Vsock {
    fn post_rx(&mut self, slot: usize) {
        let a = self.rxmem + slot as u64 * SLOT;
        if let Some(h) = self.rx.push(&[wr(a, HDR as u32), wr(a + 64, DATA as u32)]) {
            self.rx_slot_of[h as usize] = slot as u8;
        }
    }

    fn reclaim_tx(&mut self) {
        while let Some((h, _)) = self.tx.pop() {
            self.tx_free[self.tx_nfree] = self.tx_slot_of[h as usize];
            self.tx_nfree += 1;
        }
    }

    /// Sends one packet (op, payload) on the connection. False when no slot frees up.
    fn send(&mut self, op: u16, flags: u32, data: &[u8]) -> bool {
        let t0 = now_ns();
        while self.tx_nfree == 0 {
            self.reclaim_tx();
            if self.tx_nfree == 0 {
                if now_ns() - t0 > 1_000_000_000 {
                    return false;
                }
                idle();
            }
        }
        self.tx_nfree -= 1;
        let slot = self.tx_free[self.tx_nfree] as usize;
        let a = self.txmem + slot as u64 * SLOT;
        let n = data.len().min(DATA as usize);
        let h = Hdr {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: n as u32,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        };
        h.write(slice(a, HDR as usize));
        slice(a + 64, n).copy_from_slice(&data[..n]);
        let head = if n > 0 {
            self.tx.push(&[rd(a, HDR as u32), rd(a + 64, n as u32)])
        } else {
            self.tx.push(&[rd(a, HDR as u32)])
        };
        if let Some(hd) = head {
            self.tx_slot_of[hd as usize] = slot as u8;
        }
        self.tx.kick();
        if op == OP_RW {
            self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
        }
        true
    }

    /// Echoes pending bytes as far as the peer's credit allows.
    fn flush_echo(&mut self) {
        while self.npending > 0 && self.state == State::Open {
            let credit =
                self.peer_alloc
                    .wrapping_sub(self.tx_cnt.wrapping_sub(self.peer_fwd)) as usize;
            let n = self.npending.min(credit).min(DATA as usize);
            if n == 0 {
                return;
            }
            let d = slice(self.pending, n);
            if !self.send(OP_RW, 0, d) {
                return;
            }
            slice(self.pending, self.npending).copy_within(n.., 0);
            self.npending -= n;
            self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        }
    }

    /// Handles one received packet.
    fn handle(&mut self, h: &Hdr, data: &[u8], mode: VsockMode, port: u32) {
        let ours =
            h.src_cid == HOST_CID && h.dst_port == self.local_port && h.src_port == self.peer_port;
        match h.op {
            OP_REQUEST
                if mode == VsockMode::Echo && self.state == State::Idle && h.dst_port == port =>
            {
                self.peer_port = h.src_port;
                self.peer_alloc = h.buf_alloc;
                self.peer_fwd = h.fwd_cnt;
                self.state = State::Open;
                self.send(OP_RESPONSE, 0, &[]);
                Line::new()
                    .s("vsock_accept=")
                    .dec(h.src_cid)
                    .s(":")
                    .dec(h.src_port as u64);
            }
            OP_RESPONSE if ours && self.state == State::Connecting => {
                self.peer_alloc = h.buf_alloc;
                self.peer_fwd = h.fwd_cnt;
                self.state = State::Open;
            }
            // Not our connection: refuse it (a reset is never answered).
            _ if !ours && h.op != OP_RST => {
                let (pp, lp) = (self.peer_port, self.local_port);
                self.peer_port = h.src_port;
                self.local_port = h.dst_port;
                self.send(OP_RST, 0, &[]);
                self.peer_port = pp;
                self.local_port = lp;
            }
            _ if !ours => {}
            OP_RW => {
                self.peer_alloc = h.buf_alloc;
                self.peer_fwd = h.fwd_cnt;
                let n = data.len().min(BUF_ALLOC as usize - self.npending);
                slice(self.pending + self.npending as u64, n).copy_from_slice(&data[..n]);
                self.npending += n;
                self.rx_cnt = self.rx_cnt.wrapping_add(data.len() as u32);
            }
            OP_CREDIT_UPDATE => {
                self.peer_alloc = h.buf_alloc;
                self.peer_fwd = h.fwd_cnt;
            }
            OP_CREDIT_REQUEST => {
                self.send(OP_CREDIT_UPDATE, 0, &[]);
            }
            OP_SHUTDOWN => {
                self.send(OP_RST, 0, &[]);
                self.state = State::Closed;
            }
            OP_RST => {
                self.state = if self.state == State::Connecting {
                    State::Reset
                } else {
                    State::Closed
                };
            }
            _ => {}
        }
    }

    /// Processes every received packet; false when nothing arrived.
    fn poll(&mut self, mode: VsockMode, port: u32) -> bool {
        let mut any = false;
        while let Some((head, len)) = self.rx.pop() {
            any = true;
            let slot = self.rx_slot_of[head as usize] as usize % RX_SLOTS;
            let a = self.rxmem + slot as u64 * SLOT;
            let h = Hdr::read(slice(a, HDR as usize));
            let n = (h.len as u64)
                .min(DATA)
                .min((len as u64).saturating_sub(HDR)) as usize;
            self.handle(&h, slice(a + 64, n), mode, port);
            self.post_rx(slot);
        }
        self.rx.kick();
        self.reclaim_tx();
        any
    }
}

/// `vsock=echo|connect` with `vsock_port`, for `vsock_secs` at most.
pub fn run(c: &mut Ctx, mode: VsockMode) {
    let o = c.opts;
    let Some(v) = c.open("vsock", 19, 0, 0) else {
        return;
    };
    let (rx, tx, ev) = (
        v.queue(&mut c.dma, 0, 64),
        v.queue(&mut c.dma, 1, 64),
        v.queue(&mut c.dma, 2, 8),
    );
    let (rxmem, txmem, pending, evbuf) = (
        c.dma.alloc(RX_SLOTS as u64 * SLOT, 4096),
        c.dma.alloc(TX_SLOTS as u64 * SLOT, 4096),
        c.dma.alloc(BUF_ALLOC as u64, 4096),
        c.dma.alloc(64, 64),
    );
    let (Some(rx), Some(tx), Some(mut ev), Some(rxmem), Some(txmem), Some(pending), Some(evbuf)) =
        (rx, tx, ev, rxmem, txmem, pending, evbuf)
    else {
        super::missing("vsock", true);
        return v.reset();
    };
    let cid = v.cfg64(0);
    let mut s = Vsock {
        v,
        rx,
        tx,
        rxmem,
        txmem,
        rx_slot_of: [0; 256],
        tx_slot_of: [0; 256],
        tx_free: [0; TX_SLOTS],
        tx_nfree: TX_SLOTS,
        cid,
        local_port: o.vsock_port,
        peer_port: o.vsock_port,
        state: State::Idle,
        rx_cnt: 0,
        fwd_cnt: 0,
        tx_cnt: 0,
        peer_alloc: 0,
        peer_fwd: 0,
        pending,
        npending: 0,
    };
    for (i, f) in s.tx_free.iter_mut().enumerate() {
        *f = i as u8;
    }
    for i in 0..RX_SLOTS.min(s.rx.size as usize / 2) {
        s.post_rx(i);
    }
    for i in 0..4 {
        ev.push(&[wr(evbuf + 8 * i, 8)]);
    }
    s.v.driver_ok();
    s.rx.kick();
    ev.kick();
    Line::new().s("vsock_cid=").dec(cid);
    let deadline = now_ns().saturating_add(o.vsock_secs.saturating_mul(1_000_000_000));
    let mut reply_at = 0u64;
    match mode {
        VsockMode::Echo => {
            s.local_port = o.vsock_port;
            s.peer_port = 0;
            Line::new().s("vsock_listen=").dec(o.vsock_port as u64);
        }
        VsockMode::Connect => {
            s.local_port = 49152 + (now_ns() % 16384) as u32;
            s.peer_port = o.vsock_port;
            s.state = State::Connecting;
            s.send(OP_REQUEST, 0, &[]);
        }
    }
    while now_ns() < deadline && !matches!(s.state, State::Closed | State::Reset) {
        if !s.poll(mode, o.vsock_port) {
            idle();
        }
        if mode == VsockMode::Echo {
            s.flush_echo();
        } else if s.state == State::Open {
            if s.tx_cnt == 0 && s.npending == 0 {
                let msg = o.vsock_msg;
                let credit = s.peer_alloc.wrapping_sub(s.tx_cnt.wrapping_sub(s.peer_fwd)) as usize;
                if credit >= msg.len() {
                    s.send(OP_RW, 0, msg);
                }
            }
            // The reply: whatever arrives within 100 ms of its first bytes.
            if s.npending > 0 && reply_at == 0 {
                reply_at = now_ns();
            }
            if reply_at != 0 && now_ns() - reply_at > 100_000_000 {
                Line::new()
                    .s("vsock_reply=")
                    .escaped(slice(s.pending, s.npending.min(1024)));
                s.fwd_cnt = s.fwd_cnt.wrapping_add(s.npending as u32);
                s.npending = 0;
                s.send(OP_SHUTDOWN, 3, &[]);
                s.state = State::Closed;
                // Give the host a moment to answer with RST; ignore what it says.
                let t = now_ns();
                while now_ns() - t < 200_000_000 && !s.poll(mode, o.vsock_port) {
                    idle();
                }
            }
        }
    }
    let result = match (mode, s.state) {
        (VsockMode::Echo, State::Closed) => "ok",
        (VsockMode::Connect, State::Closed) if reply_at != 0 => "ok",
        (_, State::Reset) => "refused",
        (_, State::Idle | State::Connecting) => "timeout",
        _ => "incomplete",
    };
    settle_irqs(&s.v);
    Line::new()
        .s("vsock=")
        .s(result)
        .s(" vsock_rx_bytes=")
        .dec(s.rx_cnt as u64)
        .s(" vsock_tx_bytes=")
        .dec(s.tx_cnt as u64);
    Line::new().s("vsock_irqs=").dec(s.v.irqs() as u64);
    s.v.reset();
}
