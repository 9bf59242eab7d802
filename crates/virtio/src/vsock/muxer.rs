//! The host side of virtio-vsock: unix sockets, Firecracker's scheme.
//!
//! - Host to guest: a host program connects to the unix socket at `uds` and writes
//!   `CONNECT <port>\n`; the muxer sends the guest a REQUEST from a fresh host port, and when
//!   the guest accepts, answers the program `OK <hostport>\n`; from then on the stream's bytes
//!   are the connection's. A refused connection (guest RST) closes the program's socket.
//! - Guest to host: a guest REQUEST to (CID 2, port P) connects to the unix socket `uds_P`;
//!   success answers RESPONSE, failure RST.
//!
//! Credit (virtio 1.2 section 5.10.6.3): the muxer never sends the guest more than the guest's
//! `buf_alloc - (tx_cnt - fwd_cnt)`, and announces [`BUF_ALLOC`] of its own, buffering what the
//! host socket does not take at once (never more than that), so a guest respecting credit
//! cannot make it buffer without bound. All sockets are non-blocking in an edge-triggered
//! epoll set; a connection with data but no credit, or no receive buffer, simply waits.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::{op, shutdown, Header, HOST_CID, TYPE_STREAM};

/// Receive buffer the host side announces per connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Most connections (and half-open host clients) at once.
pub const MAX_CONNS: usize = 1024;
/// Longest `CONNECT <port>\n` line.
const MAX_LINE: usize = 64;
/// First port given to host-initiated connections.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Most bytes per data packet.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// How long a host program may take to send its CONNECT line.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Epoll token of the listener.
const LISTENER: u64 = 0;

type Key = (u32, u32);

/// A host program that connected and has not finished its CONNECT line.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

/// One connection: `local` is the host-side port, `peer` the guest's.
struct Conn {
    stream: UnixStream,
    token: u64,
    /// The guest accepted (or we accepted the guest).
    established: bool,
    /// The host socket may have bytes to read.
    readable: bool,
    /// Bytes from the guest the host socket did not take yet.
    to_host: Vec<u8>,
    /// Bytes the host program sent after its CONNECT line, before OK.
    early: Vec<u8>,
    /// Leading bytes of `to_host` that are ours (the OK line), not the guest's.
    own: usize,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest, ever (wrapping).
    tx_cnt: u32,
    /// Bytes handed to the host socket, ever (wrapping).
    fwd_cnt: u32,
    /// `fwd_cnt` last announced to the guest.
    fwd_reported: u32,
    /// The guest will send no more: shut the host socket's write side once drained.
    guest_done_sending: bool,
}

impl Conn {
    fn credit(&self) -> usize {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight) as usize
    }
}

/// The connections and sockets behind one vsock device.
pub struct Muxer {
    uds: PathBuf,
    cid: u64,
    listener: UnixListener,
    epoll: Epoll,
    pending: HashMap<u64, Pending>,
    conns: HashMap<Key, Conn>,
    by_token: HashMap<u64, Key>,
    next_token: u64,
    next_port: u32,
    /// Control packets for the guest, in order.
    ctrl: VecDeque<Header>,
    /// Where to resume the round-robin over connections with data.
    cursor: usize,
}

impl Muxer {
    /// Listens at `uds` (replacing a stale socket file) for a guest with context id `cid`.
    pub fn new(uds: &Path, cid: u64) -> std::io::Result<Self> {
        if std::fs::symlink_metadata(uds).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            std::fs::remove_file(uds)?;
        }
        let listener = UnixListener::bind(uds)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, LISTENER),
        )?;
        Ok(Self {
            uds: uds.to_path_buf(),
            cid,
            listener,
            epoll,
            pending: HashMap::new(),
            conns: HashMap::new(),
            by_token: HashMap::new(),
            next_token: LISTENER + 1,
            next_port: FIRST_HOST_PORT,
            ctrl: VecDeque::new(),
            cursor: 0,
        })
    }

    /// The epoll set to wait on.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.epoll.as_raw_fd()
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn watch(&mut self, fd: i32) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        let ev = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
        // A socket we cannot watch stays silent; its peer sees no progress.
        let _ = self
            .epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(ev, t));
        t
    }

    fn header(&self, key: Key, op: u16) -> Header {
        let c = self.conns.get(&key);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: c.map_or(0, |c| c.fwd_cnt),
        }
    }

    fn send_ctrl(&mut self, key: Key, op: u16, flags: u32) {
        let mut h = self.header(key, op);
        h.flags = flags;
        if let Some(c) = self.conns.get_mut(&key) {
            c.fwd_reported = c.fwd_cnt;
        }
        self.ctrl.push_back(h);
    }

    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.by_token.remove(&c.token);
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Drops every connection (device reset): the guest forgot them.
    pub fn reset(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        self.ctrl.clear();
    }

    /// Takes what the sockets have to say (called when [`Muxer::fd`] is readable). Host
    /// programs that have not sent their CONNECT line within `CONNECT_TIMEOUT` are dropped.
    pub fn process_events(&mut self) {
        let epoll = &self.epoll;
        self.pending.retain(|_, p| {
            let keep = p.since.elapsed() < CONNECT_TIMEOUT;
            if !keep {
                let _ = epoll.ctl(
                    ControlOperation::Delete,
                    p.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            keep
        });
        let mut events = [EpollEvent::default(); 64];
        let Ok(n) = self.epoll.wait(0, &mut events) else {
            return;
        };
        for ev in &events[..n] {
            let t = ev.data();
            if t == LISTENER {
                self.accept();
            } else if self.pending.contains_key(&t) {
                self.read_connect_line(t);
            } else if let Some(&key) = self.by_token.get(&t) {
                let set = ev.event_set();
                if let Some(c) = self.conns.get_mut(&key) {
                    if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                        c.readable = true;
                    }
                }
                if set.contains(EventSet::OUT) {
                    self.flush_to_host(key);
                }
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if self.pending.len() + self.conns.len() >= MAX_CONNS
                        || s.set_nonblocking(true).is_err()
                    {
                        continue;
                    }
                    let t = self.watch(s.as_raw_fd());
                    self.pending.insert(
                        t,
                        Pending {
                            stream: s,
                            line: Vec::new(),
                            since: Instant::now(),
                        },
                    );
                    self.read_connect_line(t);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    fn read_connect_line(&mut self, t: u64) {
        let Some(p) = self.pending.get_mut(&t) else {
            return;
        };
        let mut buf = [0u8; MAX_LINE];
        let done = loop {
            match p.stream.read(&mut buf) {
                Ok(0) => break Err(()),
                Ok(n) => {
                    p.line.extend_from_slice(&buf[..n]);
                    if p.line.contains(&b'\n') {
                        break Ok(());
                    }
                    if p.line.len() > MAX_LINE {
                        break Err(());
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => break Err(()),
            }
        };
        let Some(p) = self.pending.remove(&t) else {
            return;
        };
        let port = done.ok().and_then(|_| parse_connect(&p.line));
        let Some((port, early)) = port else {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                p.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            return;
        };
        let mut local = self.next_port;
        while self.conns.keys().any(|k| k.0 == local) {
            local = local.wrapping_add(1).max(FIRST_HOST_PORT);
        }
        self.next_port = local.wrapping_add(1).max(FIRST_HOST_PORT);
        let key = (local, port);
        self.by_token.insert(t, key);
        self.conns.insert(
            key,
            Conn {
                stream: p.stream,
                token: t,
                established: false,
                readable: false,
                to_host: Vec::new(),
                early: early.to_vec(),
                own: 0,
                peer_buf_alloc: 0,
                peer_fwd_cnt: 0,
                tx_cnt: 0,
                fwd_cnt: 0,
                fwd_reported: 0,
                guest_done_sending: false,
            },
        );
        self.send_ctrl(key, op::REQUEST, 0);
    }

    /// A packet from the guest (header checked by the caller: ours to handle).
    pub fn from_guest(&mut self, h: &Header, payload: &[u8]) {
        let key = (h.dst_port, h.src_port);
        if h.dst_cid != HOST_CID || h.src_cid != self.cid || h.type_ != TYPE_STREAM {
            if h.op != op::RST {
                self.rst_unknown(h);
            }
            return;
        }
        if h.op == op::REQUEST {
            self.guest_connect(h);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if h.op != op::RST {
                self.rst_unknown(h);
            }
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            op::RESPONSE if !c.established => {
                c.established = true;
                let mut ok = format!("OK {}\n", key.0).into_bytes();
                c.own = ok.len();
                ok.append(&mut c.to_host);
                c.to_host = ok;
                c.readable = !c.early.is_empty() || c.readable;
                self.flush_to_host(key);
            }
            op::RW if c.established => {
                if c.to_host.len() - c.own + payload.len() > BUF_ALLOC as usize {
                    // The guest ignored our credit.
                    self.send_ctrl(key, op::RST, 0);
                    self.remove(key);
                    return;
                }
                c.to_host.extend_from_slice(payload);
                self.flush_to_host(key);
            }
            op::CREDIT_REQUEST => self.send_ctrl(key, op::CREDIT_UPDATE, 0),
            op::SHUTDOWN => {
                if h.flags & (shutdown::SEND | shutdown::RCV) == (shutdown::SEND | shutdown::RCV) {
                    self.send_ctrl(key, op::RST, 0);
                    self.remove(key);
                } else if h.flags & shutdown::SEND != 0 {
                    c.guest_done_sending = true;
                    self.flush_to_host(key);
                }
            }
            op::RST => self.remove(key),
            op::CREDIT_UPDATE | op::RW | op::RESPONSE => {}
            _ => {
                self.send_ctrl(key, op::RST, 0);
                self.remove(key);
            }
        }
    }

    fn rst_unknown(&mut self, h: &Header) {
        self.ctrl.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Header::default()
        });
    }

    fn guest_connect(&mut self, h: &Header) {
        let key = (h.dst_port, h.src_port);
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNS {
            self.rst_unknown(h);
            return;
        }
        let mut path = self.uds.clone().into_os_string();
        path.push(format!("_{}", h.dst_port));
        let stream = match UnixStream::connect(&path) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => {
                self.rst_unknown(h);
                return;
            }
        };
        let t = self.watch(stream.as_raw_fd());
        self.by_token.insert(t, key);
        self.conns.insert(
            key,
            Conn {
                stream,
                token: t,
                established: true,
                readable: true,
                to_host: Vec::new(),
                early: Vec::new(),
                own: 0,
                peer_buf_alloc: h.buf_alloc,
                peer_fwd_cnt: h.fwd_cnt,
                tx_cnt: 0,
                fwd_cnt: 0,
                fwd_reported: 0,
                guest_done_sending: false,
            },
        );
        self.send_ctrl(key, op::RESPONSE, 0);
    }

    /// Writes what the host socket takes; announces the credit it frees.
    fn flush_to_host(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let mut failed = false;
        while !c.to_host.is_empty() {
            match c.stream.write(&c.to_host) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(n) => {
                    c.to_host.drain(..n);
                    // The OK line is ours: only the guest's bytes count as forwarded.
                    let own = n.min(c.own);
                    c.own -= own;
                    c.fwd_cnt = c.fwd_cnt.wrapping_add((n - own) as u32);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.send_ctrl(key, op::RST, 0);
            self.remove(key);
            return;
        }
        if c.to_host.is_empty() && c.guest_done_sending {
            let _ = c.stream.shutdown(Shutdown::Write);
        }
        if c.fwd_cnt.wrapping_sub(c.fwd_reported) >= BUF_ALLOC / 4 {
            self.send_ctrl(key, op::CREDIT_UPDATE, 0);
        }
    }

    /// Whether a packet for the guest may be ready (control, or data with credit).
    pub fn has_work(&self) -> bool {
        !self.ctrl.is_empty()
            || self
                .conns
                .values()
                .any(|c| c.established && (c.readable || !c.early.is_empty()) && c.credit() > 0)
    }

    /// The next packet for the guest, its payload (at most `room` bytes) in `buf`; `None` when
    /// there is nothing to send.
    pub fn next_for_guest(&mut self, room: usize, buf: &mut Vec<u8>) -> Option<Header> {
        buf.clear();
        if let Some(h) = self.ctrl.pop_front() {
            return Some(h);
        }
        let mut keys: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.established && (c.readable || !c.early.is_empty()) && c.credit() > 0)
            .map(|(k, _)| *k)
            .collect();
        keys.sort_unstable();
        let n = keys.len();
        for i in 0..n {
            let key = keys[(self.cursor + i) % n];
            if let Some(h) = self.read_data(key, room, buf) {
                self.cursor = (self.cursor + i + 1) % n.max(1);
                return Some(h);
            }
            if let Some(h) = self.ctrl.pop_front() {
                return Some(h);
            }
        }
        None
    }

    fn read_data(&mut self, key: Key, room: usize, buf: &mut Vec<u8>) -> Option<Header> {
        let c = self.conns.get_mut(&key)?;
        let want = room.min(c.credit()).min(MAX_PAYLOAD);
        if want == 0 {
            return None;
        }
        if !c.early.is_empty() {
            let n = want.min(c.early.len());
            buf.extend(c.early.drain(..n));
        } else {
            buf.resize(want, 0);
            loop {
                match c.stream.read(buf) {
                    Ok(0) => {
                        buf.clear();
                        // The host program is done: tell the guest, forget the connection.
                        self.send_ctrl(key, op::SHUTDOWN, shutdown::SEND | shutdown::RCV);
                        self.remove(key);
                        return None;
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        buf.clear();
                        c.readable = false;
                        return None;
                    }
                    Err(_) => {
                        buf.clear();
                        self.send_ctrl(key, op::RST, 0);
                        self.remove(key);
                        return None;
                    }
                }
            }
        }
        let c = self.conns.get_mut(&key)?;
        c.tx_cnt = c.tx_cnt.wrapping_add(buf.len() as u32);
        c.fwd_reported = c.fwd_cnt;
        let mut h = self.header(key, op::RW);
        h.len = buf.len() as u32;
        Some(h)
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

/// Parses `CONNECT <port>\n`; returns the port and the bytes after the newline.
fn parse_connect(line: &[u8]) -> Option<(u32, &[u8])> {
    let nl = line.iter().position(|&b| b == b'\n')?;
    let text = std::str::from_utf8(&line[..nl]).ok()?;
    let port = text.trim_end_matches('\r').strip_prefix("CONNECT ")?;
    Some((port.trim().parse().ok()?, &line[nl + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52\n"), Some((52, &b""[..])));
        assert_eq!(parse_connect(b"CONNECT 7\r\nabc"), Some((7, &b"abc"[..])));
        assert_eq!(parse_connect(b"CONNECT x\n"), None);
        assert_eq!(parse_connect(b"connect 5\n"), None);
        assert_eq!(parse_connect(b"CONNECT 5"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999\n"), None);
    }
}
