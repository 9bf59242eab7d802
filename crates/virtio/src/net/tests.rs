//! virtio-net on a datagram socket pair (one datagram = one frame, like a tap): both data
//! paths, merged receive buffers, flow control when the guest posts no buffers, offload
//! negotiation, and every hostile-descriptor case.

use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;

use super::*;
use crate::chain::{ChainError, DESC_F_NEXT};
use crate::test_rig::{readable, Rig, BUF};

/// A socket-pair backend that records TUNSETOFFLOAD calls and accepts only `accept` flags.
struct Pair {
    sock: UnixDatagram,
    accept: u32,
    offloads: Arc<Mutex<Vec<u32>>>,
}

impl Backend for Pair {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.recv(buf)
    }
    fn send(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sock.send(buf)
    }
    fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        if flags & !self.accept != 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.offloads.lock().unwrap().push(flags);
        Ok(())
    }
    fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];
const ALL: u32 = OFFLOAD_TRIES[0];

struct T {
    net: Net,
    host: UnixDatagram,
    rig: Rig,
    offloads: Arc<Mutex<Vec<u32>>>,
}

fn setup_with(accept: u32, acked: u64) -> T {
    let (a, host) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    host.set_nonblocking(true).unwrap();
    let offloads = Arc::new(Mutex::new(Vec::new()));
    let mut net = Net::new(
        Box::new(Pair {
            sock: a,
            accept,
            offloads: offloads.clone(),
        }),
        MAC,
    )
    .unwrap();
    let rig = Rig::new(2, 16);
    net.ack_features(acked);
    net.activate(rig.mem.clone(), rig.queues(false), rig.irq())
        .unwrap();
    T {
        net,
        host,
        rig,
        offloads,
    }
}

fn setup() -> T {
    setup_with(ALL, features::VERSION_1)
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_add(seed)));
    f
}

fn healthy_tx(t: &mut T) {
    let f = frame(60, 9);
    t.rig.write(BUF + 0x8000, &f);
    let before = t.rig.used_idx(1);
    t.rig.post(1, &[(BUF + 0x8000, f.len() as u32, false)]);
    t.net.queue_notified(TX).unwrap();
    assert_eq!(t.rig.used_idx(1), before.wrapping_add(1));
    let mut got = [0u8; 200];
    let n = t.host.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &f[..]);
}

#[test]
fn features_follow_the_offloads_the_backend_accepts() {
    let t = setup();
    let f = t.net.features();
    for bit in [
        feature::MAC,
        feature::STATUS,
        feature::MRG_RXBUF,
        feature::CSUM,
        feature::GUEST_CSUM,
        feature::HOST_TSO4,
        feature::GUEST_TSO6,
        feature::HOST_UFO,
    ] {
        assert_ne!(f & bit, 0, "{bit:#x}");
    }
    let t = setup_with(tap::offload::CSUM, features::VERSION_1);
    let f = t.net.features();
    assert_ne!(f & feature::GUEST_CSUM, 0);
    assert_eq!(f & (feature::GUEST_TSO4 | feature::HOST_TSO4), 0);
    let t = setup_with(0, features::VERSION_1);
    assert_eq!(t.net.features() & (feature::CSUM | feature::GUEST_CSUM), 0);
}

#[test]
fn acked_guest_offloads_reach_the_backend() {
    let t = setup_with(
        ALL,
        features::VERSION_1 | feature::GUEST_CSUM | feature::GUEST_TSO4,
    );
    let last = *t.offloads.lock().unwrap().last().unwrap();
    assert_eq!(last, tap::offload::CSUM | tap::offload::TSO4);
    // TSO without checksum offload is meaningless: nothing.
    let t = setup_with(ALL, features::VERSION_1 | feature::GUEST_TSO4);
    assert_eq!(*t.offloads.lock().unwrap().last().unwrap(), 0);
}

#[test]
fn config_has_the_mac_and_link_up() {
    let t = setup();
    let mut c = [0u8; 10];
    t.net.read_config(0, &mut c);
    assert_eq!(&c[..6], &MAC);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1);
    let mut far = [0xffu8; 4];
    t.net.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
}

#[test]
fn transmits_frames_in_one_or_several_buffers() {
    let mut t = setup();
    healthy_tx(&mut t);
    assert_eq!(t.rig.irq.take(), vec!["queue 1"]);
    // Header and frame split over three descriptors.
    let f = frame(100, 3);
    t.rig.write(BUF, &f[..VNET_HDR_LEN]);
    t.rig.write(BUF + 0x100, &f[VNET_HDR_LEN..50]);
    t.rig.write(BUF + 0x200, &f[50..]);
    t.rig.post(
        1,
        &[
            (BUF, VNET_HDR_LEN as u32, false),
            (BUF + 0x100, 50 - VNET_HDR_LEN as u32, false),
            (BUF + 0x200, (f.len() - 50) as u32, false),
        ],
    );
    t.net.queue_notified(TX).unwrap();
    let mut got = [0u8; 200];
    let n = t.host.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &f[..]);
    let c = t.net.counters();
    assert_eq!(c.tx_frames.load(Ordering::Relaxed), 2);
    assert_eq!(c.tx_bytes.load(Ordering::Relaxed), 160);
}

#[test]
fn receives_a_frame_into_one_buffer() {
    let mut t = setup();
    let head = t.rig.post(0, &[(BUF, 2048, true)]);
    t.net.queue_notified(RX).unwrap();
    let f = frame(1000, 7);
    t.host.send(&f).unwrap();
    assert!(readable(t.net.host_fd().unwrap()));
    t.net.host_ready().unwrap();
    assert_eq!(t.rig.used(0, 0), (u32::from(head), f.len() as u32));
    let got = t.rig.read(BUF, f.len());
    assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(t.rig.irq.take(), vec!["queue 0"]);
    assert!(!readable(t.net.host_fd().unwrap()), "nothing left to do");
}

#[test]
fn without_buffers_the_frame_waits_and_the_backend_is_not_polled() {
    let mut t = setup();
    let f = frame(200, 1);
    t.host.send(&f).unwrap();
    t.host.send(&frame(300, 2)).unwrap();
    t.net.host_ready().unwrap();
    assert_eq!(t.rig.used_idx(0), 0);
    assert!(
        !readable(t.net.host_fd().unwrap()),
        "the device stops listening while it has no buffers"
    );
    t.rig.post(0, &[(BUF, 2048, true)]);
    t.rig.post(0, &[(BUF + 0x1000, 2048, true)]);
    t.net.queue_notified(RX).unwrap();
    while readable(t.net.host_fd().unwrap()) {
        t.net.host_ready().unwrap();
    }
    assert_eq!(t.rig.used_idx(0), 2);
    assert_eq!(t.rig.used(0, 0).1 as usize, f.len());
    assert_eq!(t.rig.used(0, 1).1 as usize, 300 + VNET_HDR_LEN);
    assert_eq!(t.net.counters().rx_frames.load(Ordering::Relaxed), 2);
}

#[test]
fn merged_receive_buffers_carry_a_big_frame() {
    let mut t = setup_with(ALL, features::VERSION_1 | feature::MRG_RXBUF);
    for i in 0..4 {
        t.rig.post(0, &[(BUF + i * 0x1000, 1500, true)]);
    }
    t.net.queue_notified(RX).unwrap();
    let f = frame(4000, 5);
    t.host.send(&f).unwrap();
    t.net.host_ready().unwrap();
    assert_eq!(t.rig.used_idx(0), 3);
    let lens: Vec<u32> = (0..3).map(|i| t.rig.used(0, i).1).collect();
    assert_eq!(lens, vec![1500, 1500, (f.len() - 3000) as u32]);
    let first = t.rig.read(BUF, 12);
    assert_eq!(u16::from_le_bytes([first[10], first[11]]), 3);
    let mut all = t.rig.read(BUF, 1500);
    all.extend(t.rig.read(BUF + 0x1000, 1500));
    all.extend(t.rig.read(BUF + 0x2000, f.len() - 3000));
    assert_eq!(&all[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
}

#[test]
fn a_frame_too_big_for_a_buffer_is_dropped_without_merging() {
    let mut t = setup();
    t.rig.post(0, &[(BUF, 128, true)]);
    t.net.queue_notified(RX).unwrap();
    t.host.send(&frame(1000, 1)).unwrap();
    t.host.send(&frame(50, 1)).unwrap();
    t.net.host_ready().unwrap();
    assert_eq!(t.rig.used_idx(0), 1, "the small frame took the buffer");
    assert_eq!(t.rig.used(0, 0).1, 62);
    assert_eq!(t.net.counters().rx_dropped.load(Ordering::Relaxed), 1);
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    let mut t = setup();
    // A device-writable buffer in a tx chain.
    t.rig
        .post(1, &[(BUF, 100, false), (BUF + 0x100, 100, true)]);
    // Shorter than header + Ethernet header.
    t.rig.post(1, &[(BUF, 20, false)]);
    // Longer than any frame (inside guest memory).
    t.rig.post(1, &[(BUF, MAX_FRAME as u32 + 1, false)]);
    t.net.queue_notified(TX).unwrap();
    assert_eq!(t.rig.used_idx(1), 3, "every chain is returned");
    assert_eq!(t.net.counters().tx_dropped.load(Ordering::Relaxed), 3);
    assert!(t.host.recv(&mut [0u8; 64]).is_err(), "nothing was sent");
    healthy_tx(&mut t);
}

fn broken(t: &mut T, q: u16, r: Result<(), DeviceError>) {
    assert!(r.is_err(), "queue {q}: {r:?}");
    assert!(
        !readable(t.net.host_fd().unwrap()),
        "stopped after an error"
    );
    // A reset and a fresh activation bring it back.
    t.net.reset();
    t.rig = Rig::new(2, 16);
    t.net.ack_features(features::VERSION_1);
    t.net
        .activate(t.rig.mem.clone(), t.rig.queues(false), t.rig.irq())
        .unwrap();
    healthy_tx(t);
}

#[test]
fn hostile_tx_descriptors_need_a_reset() {
    let mut t = setup();
    // Outside guest memory.
    t.rig.post(1, &[(0x3f_ff00, 0x1000, false)]);
    let r = t.net.queue_notified(TX);
    assert!(matches!(
        r,
        Err(DeviceError::Chain {
            queue: 1,
            source: ChainError::BufferOutsideMemory { .. }
        })
    ));
    broken(&mut t, TX, r);
    // A loop.
    t.rig.desc(1, 0, BUF, 64, DESC_F_NEXT, 1);
    t.rig.desc(1, 1, BUF, 64, DESC_F_NEXT, 0);
    t.rig.publish(1, 0);
    let r = t.net.queue_notified(TX);
    assert!(matches!(
        r,
        Err(DeviceError::Chain {
            source: ChainError::TooLong(_),
            ..
        })
    ));
    broken(&mut t, TX, r);
    // Head index past the ring.
    t.rig.publish(1, 99);
    let r = t.net.queue_notified(TX);
    broken(&mut t, TX, r);
    // Available index far ahead.
    t.rig.set_avail_idx(1, 1000);
    let r = t.net.queue_notified(TX);
    assert!(matches!(r, Err(DeviceError::Ring { queue: 1, .. })));
    broken(&mut t, TX, r);
    // Absurd length.
    t.rig.post(1, &[(BUF, u32::MAX, false)]);
    let r = t.net.queue_notified(TX);
    broken(&mut t, TX, r);
}

#[test]
fn hostile_rx_descriptors_need_a_reset() {
    let mut t = setup();
    t.rig.desc(
        0,
        0,
        BUF,
        2048,
        crate::chain::DESC_F_WRITE | DESC_F_NEXT,
        77,
    );
    t.rig.publish(0, 0);
    t.host.send(&frame(64, 0)).unwrap();
    let r = t.net.host_ready();
    assert!(matches!(
        r,
        Err(DeviceError::Chain {
            queue: 0,
            source: ChainError::IndexOutOfRange { index: 77, .. }
        })
    ));
    broken(&mut t, RX, r);
    // An indirect table without INDIRECT_DESC.
    t.rig.desc(0, 0, BUF, 32, crate::chain::DESC_F_INDIRECT, 0);
    t.rig.publish(0, 0);
    t.host.send(&frame(64, 0)).unwrap();
    let r = t.net.host_ready();
    broken(&mut t, RX, r);
}

#[test]
fn state_round_trips() {
    let mut t = setup();
    healthy_tx(&mut t);
    let s = t.net.save();
    let DeviceState::Net(n) = &s else {
        panic!("{s:?}")
    };
    assert_eq!(n.tx.unwrap().next_avail, 1);
    let j = serde_json::to_string(&s).unwrap();
    let back: DeviceState = serde_json::from_str(&j).unwrap();
    assert_eq!(back, s);
    t.net.restore(&back).unwrap();
}

#[test]
fn a_restored_nic_announces_its_mac() {
    let mut t = setup();
    let s = t.net.save();
    t.net.restore(&s).unwrap();
    let mut buf = [0u8; 2048];
    let n = t.host.recv(&mut buf).expect("a frame on the backend");
    assert_eq!(n, VNET_HDR_LEN + 60);
    let e = &buf[VNET_HDR_LEN..n];
    assert_eq!(&e[0..6], &[0xff; 6], "to everyone");
    assert_eq!(&e[6..12], &MAC, "from the guest's MAC");
    assert_eq!(&e[12..14], &[0x80, 0x35], "RARP");
    assert_eq!(&e[20..22], &[0, 3], "reverse request");
    assert_eq!(&e[22..28], &MAC);
    assert_eq!(&e[32..38], &MAC);
}
