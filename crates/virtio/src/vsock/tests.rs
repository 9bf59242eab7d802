//! virtio-vsock with real unix sockets in a temporary directory: host-initiated and
//! guest-initiated connections, data both ways with credit, shutdown, refusals, and the
//! hostile-descriptor cases.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use super::packet::{op, shutdown, HOST_CID, TYPE_STREAM};
use super::*;
use crate::chain::{ChainError, DESC_F_NEXT};
use crate::test_rig::{readable, Rig, BUF};

const CID: u64 = 3;
/// Where rx buffers go (8 KiB apart), and where tx packets are built.
const RXB: u64 = BUF;
const TXB: u64 = BUF + 0x10_0000;

struct T {
    dev: Vsock,
    rig: Rig,
    dir: PathBuf,
    uds: PathBuf,
    rx_seen: u16,
    tx_slot: u64,
}

impl Drop for T {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup() -> T {
    setup_with(false)
}

fn setup_with(event_idx: bool) -> T {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ferro-vsock-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");
    let mut dev = Vsock::new(CID, &uds).unwrap();
    let rig = Rig::new(3, 64);
    dev.ack_features(features::VERSION_1);
    dev.activate(rig.mem.clone(), rig.queues(event_idx), rig.irq())
        .unwrap();
    let mut t = T {
        dev,
        rig,
        dir,
        uds,
        rx_seen: 0,
        tx_slot: 0,
    };
    t.post_rx(8);
    t
}

impl T {
    fn post_rx(&mut self, n: u64) {
        for _ in 0..n {
            let slot = u64::from(self.rig.qs[0].avail_idx % 64);
            self.rig.post(0, &[(RXB + slot * 0x2000, 0x2000, true)]);
        }
    }

    /// Lets the device run until it is quiet (bounded).
    fn settle(&mut self) {
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(2));
            if !readable(self.dev.host_fd().unwrap()) {
                continue;
            }
            self.dev.host_ready().unwrap();
        }
    }

    /// Packets the device gave the guest since the last call: (header, payload).
    fn rx(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while self.rx_seen != self.rig.used_idx(0) {
            let (id, len) = self.rig.used(0, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            // Chains are single descriptors: the head index is the descriptor.
            let addr = self.rig.mem_desc_addr(0, id as u16);
            let bytes = self.rig.read(addr, len as usize);
            let h = Header::parse(&bytes).unwrap();
            out.push((h, bytes[HDR_LEN..].to_vec()));
            self.post_rx(1);
        }
        if !out.is_empty() {
            self.dev.queue_notified(RX).unwrap();
        }
        out
    }

    /// The guest sends a packet (header and payload in separate descriptors).
    fn tx(&mut self, h: Header, payload: &[u8]) -> Result<(), DeviceError> {
        let at = TXB + (self.tx_slot % 32) * 0x1_1000;
        self.tx_slot += 1;
        self.rig.write(at, &h.bytes());
        if payload.is_empty() {
            self.rig.post(1, &[(at, HDR_LEN as u32, false)]);
        } else {
            self.rig.write(at + 0x100, payload);
            self.rig.post(
                1,
                &[
                    (at, HDR_LEN as u32, false),
                    (at + 0x100, payload.len() as u32, false),
                ],
            );
        }
        self.dev.queue_notified(TX)
    }

    fn guest(&self, src_port: u32, dst_port: u32, op: u16) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }
}

impl Rig {
    fn mem_desc_addr(&self, q: usize, i: u16) -> u64 {
        use vm_memory::{Bytes, GuestAddress};
        self.mem
            .read_obj(GuestAddress(self.qs[q].desc + u64::from(i) * 16))
            .unwrap()
    }
}

/// Host connects and the guest (listening on 1234) accepts; returns the client and the key.
fn host_connect(t: &mut T, port: u32) -> (UnixStream, u32) {
    let mut c = UnixStream::connect(&t.uds).unwrap();
    c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    t.settle();
    let p = t.rx();
    assert_eq!(p.len(), 1, "{p:?}");
    let (h, _) = p[0];
    assert_eq!(
        (h.op, h.dst_port, h.dst_cid, h.src_cid),
        (op::REQUEST, port, CID, HOST_CID)
    );
    let host_port = h.src_port;
    t.tx(t.guest(port, host_port, op::RESPONSE), &[]).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut line = String::new();
    BufReader::new(c.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, format!("OK {host_port}\n"));
    (c, host_port)
}

#[test]
fn config_is_the_guest_cid() {
    let t = setup();
    let mut b = [0u8; 8];
    t.dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), CID);
    let mut far = [0xffu8; 2];
    t.dev.read_config(7, &mut far);
    assert_eq!(far, [0, 0]);
}

#[test]
fn host_connects_and_bytes_flow_both_ways() {
    let mut t = setup();
    let (mut c, hp) = host_connect(&mut t, 1234);
    c.write_all(b"ping!").unwrap();
    t.settle();
    let p = t.rx();
    assert_eq!(p.len(), 1);
    assert_eq!((p[0].0.op, p[0].0.len), (op::RW, 5));
    assert_eq!(p[0].1, b"ping!");
    // The guest echoes it back.
    let mut h = t.guest(1234, hp, op::RW);
    h.len = 5;
    h.fwd_cnt = 5;
    t.tx(h, b"ping!").unwrap();
    let mut back = [0u8; 5];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping!");
    // The host closes: the guest hears SHUTDOWN, and the connection is gone.
    drop(c);
    t.settle();
    let p = t.rx();
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0.op, op::SHUTDOWN);
    assert_eq!(p[0].0.flags, shutdown::SEND | shutdown::RCV);
    assert_eq!(t.dev.muxer.connections(), 0);
}

#[test]
fn guest_refusal_closes_the_host_client() {
    let mut t = setup();
    let mut c = UnixStream::connect(&t.uds).unwrap();
    c.write_all(b"CONNECT 9\n").unwrap();
    t.settle();
    let p = t.rx();
    let hp = p[0].0.src_port;
    t.tx(t.guest(9, hp, op::RST), &[]).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut s = String::new();
    assert_eq!(c.read_to_string(&mut s).unwrap(), 0, "EOF, no OK: {s}");
}

#[test]
fn bad_connect_lines_are_dropped() {
    let mut t = setup();
    let mut c = UnixStream::connect(&t.uds).unwrap();
    c.write_all(&[b'x'; 100]).unwrap();
    let mut d = UnixStream::connect(&t.uds).unwrap();
    d.write_all(b"CONNECT nope\n").unwrap();
    t.settle();
    assert!(t.rx().is_empty());
    for s in [&mut c, &mut d] {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut v = Vec::new();
        assert_eq!(s.read_to_end(&mut v).unwrap(), 0);
    }
}

#[test]
fn guest_connects_to_a_host_listener() {
    let mut t = setup();
    let mut path = t.uds.clone().into_os_string();
    path.push("_5000");
    let l = UnixListener::bind(&path).unwrap();
    t.tx(t.guest(49152, 5000, op::REQUEST), &[]).unwrap();
    let p = t.rx();
    assert_eq!(p.len(), 1);
    assert_eq!(
        (p[0].0.op, p[0].0.src_port, p[0].0.dst_port),
        (op::RESPONSE, 5000, 49152)
    );
    let (mut s, _) = l.accept().unwrap();
    let mut h = t.guest(49152, 5000, op::RW);
    h.len = 5;
    t.tx(h, b"hello").unwrap();
    let mut got = [0u8; 5];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    s.write_all(b"re:hello").unwrap();
    t.settle();
    let p = t.rx();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].1, b"re:hello");
    // Guest shuts down both directions: RST back, host socket closed.
    let mut h = t.guest(49152, 5000, op::SHUTDOWN);
    h.flags = shutdown::SEND | shutdown::RCV;
    t.tx(h, &[]).unwrap();
    assert_eq!(t.rx()[0].0.op, op::RST);
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(s.read(&mut got).unwrap(), 0);
}

#[test]
fn guest_connect_without_listener_is_reset() {
    let mut t = setup();
    t.tx(t.guest(49152, 7777, op::REQUEST), &[]).unwrap();
    let p = t.rx();
    assert_eq!(p[0].0.op, op::RST);
    // Packets for unknown connections get RST too; RSTs get nothing.
    t.tx(t.guest(1, 2, op::RW), &[]).unwrap();
    assert_eq!(t.rx()[0].0.op, op::RST);
    t.tx(t.guest(1, 2, op::RST), &[]).unwrap();
    assert!(t.rx().is_empty());
}

#[test]
fn data_waits_for_credit() {
    let mut t = setup();
    let mut path = t.uds.clone().into_os_string();
    path.push("_6000");
    let l = UnixListener::bind(&path).unwrap();
    let mut req = t.guest(50000, 6000, op::REQUEST);
    req.buf_alloc = 10;
    t.tx(req, &[]).unwrap();
    t.rx();
    let (mut s, _) = l.accept().unwrap();
    s.write_all(&[7u8; 100]).unwrap();
    t.settle();
    let p = t.rx();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].1.len(), 10, "no more than the guest's buf_alloc");
    t.settle();
    assert!(t.rx().is_empty(), "no credit left");
    // The guest consumed them and grants more.
    let mut up = t.guest(50000, 6000, op::CREDIT_UPDATE);
    up.buf_alloc = 1000;
    up.fwd_cnt = 10;
    t.tx(up, &[]).unwrap();
    t.settle();
    let total: usize = t.rx().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(total, 90);
    // A credit request is answered.
    t.tx(t.guest(50000, 6000, op::CREDIT_REQUEST), &[]).unwrap();
    let p = t.rx();
    assert_eq!(p[0].0.op, op::CREDIT_UPDATE);
    assert_eq!(p[0].0.buf_alloc, muxer::BUF_ALLOC);
}

#[test]
fn malformed_packets_are_dropped_and_counted() {
    let mut t = setup();
    // Shorter than a header.
    t.rig.write(TXB, &[0u8; 20]);
    t.rig.post(1, &[(TXB, 20, false)]);
    // len claims more than the chain carries.
    let mut h = t.guest(1, 2, op::RW);
    h.len = 1000;
    t.rig.write(TXB + 0x1000, &h.bytes());
    t.rig.post(1, &[(TXB + 0x1000, HDR_LEN as u32 + 10, false)]);
    // A writable buffer in a tx chain.
    t.rig
        .post(1, &[(TXB + 0x1000, HDR_LEN as u32, false), (TXB, 64, true)]);
    t.dev.queue_notified(TX).unwrap();
    assert_eq!(t.rig.used_idx(1), 3);
    assert_eq!(t.dev.counters().tx_dropped.load(Ordering::Relaxed), 3);
    assert!(t.rx().is_empty());
}

#[test]
fn hostile_descriptors_need_a_reset() {
    let mut t = setup();
    t.rig.post(1, &[(0x3f_fff0, 0x100, false)]);
    let r = t.dev.queue_notified(TX);
    assert!(matches!(
        r,
        Err(DeviceError::Chain {
            queue: 1,
            source: ChainError::BufferOutsideMemory { .. }
        })
    ));
    let mut t = setup();
    t.rig.desc(1, 0, TXB, 64, DESC_F_NEXT, 0);
    t.rig.publish(1, 0);
    assert!(matches!(
        t.dev.queue_notified(TX),
        Err(DeviceError::Chain {
            source: ChainError::TooLong(_),
            ..
        })
    ));
    // An absurd length.
    let mut t = setup();
    t.rig.post(1, &[(TXB, u32::MAX, false)]);
    assert!(matches!(
        t.dev.queue_notified(TX),
        Err(DeviceError::Chain {
            source: ChainError::BufferOutsideMemory { .. },
            ..
        })
    ));
    assert!(!readable(t.dev.host_fd().unwrap()), "stopped and quiet");
    let mut t = setup();
    t.rig.set_avail_idx(1, 500);
    assert!(matches!(
        t.dev.queue_notified(TX),
        Err(DeviceError::Ring { queue: 1, .. })
    ));
    // A bad rx chain is met when a packet is due.
    let mut t = setup();
    t.rig.set_avail_idx(0, 8);
    t.rig.desc(
        0,
        0,
        RXB,
        0x2000,
        crate::chain::DESC_F_WRITE | DESC_F_NEXT,
        200,
    );
    let r = t.tx(t.guest(49152, 7777, op::REQUEST), &[]);
    assert!(matches!(
        r,
        Err(DeviceError::Chain {
            queue: 0,
            source: ChainError::IndexOutOfRange { index: 200, .. }
        })
    ));
}

#[test]
fn without_a_driver_host_clients_wait_quietly() {
    let mut t = setup();
    t.dev.reset();
    let mut c = UnixStream::connect(&t.uds).unwrap();
    c.write_all(b"CONNECT 1234\n").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        !readable(t.dev.host_fd().unwrap()),
        "an inactive device does not wake the event loop"
    );
    // The driver comes back: the waiting client's REQUEST goes out.
    t.rig = Rig::new(3, 64);
    t.rx_seen = 0;
    t.dev.ack_features(features::VERSION_1);
    t.dev
        .activate(t.rig.mem.clone(), t.rig.queues(false), t.rig.irq())
        .unwrap();
    t.post_rx(4);
    t.settle();
    let p = t.rx();
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0.op, op::REQUEST);
}

#[test]
fn event_idx_keeps_the_driver_kicking() {
    use vm_memory::{Bytes, GuestAddress};
    let mut t = setup_with(true);
    t.tx(t.guest(1, 2, op::RST), &[]).unwrap();
    t.tx(t.guest(1, 2, op::RST), &[]).unwrap();
    // avail_event, after the used ring's 64 entries: kick me when entry 2 is published.
    let at = t.rig.qs[1].used + 4 + 8 * 64;
    let ev: u16 = t.rig.mem.read_obj(GuestAddress(at)).unwrap();
    assert_eq!(ev, 2);
}

#[test]
fn state_round_trips() {
    let t = setup();
    let s = t.dev.save();
    let back: DeviceState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert_eq!(back, s);
}
