//! virtio-net (device type 1, virtio 1.2 section 5.1) on a host [`Backend`] — a tap
//! ([`tap::Tap`]) in the VMM, a datagram socket pair in tests. Queue 0 receives, queue 1
//! transmits; no control queue, one queue pair.
//!
//! Every frame carries the 12-byte VERSION_1 header (`flags, gso_type, hdr_len, gso_size,
//! csum_start, csum_offset, num_buffers`), which the tap speaks too, so headers pass through
//! unchanged in both directions; only `num_buffers` is the device's to fill.
//!
//! Receive: the device waits on the backend's fd through its own epoll set
//! ([`VirtioDevice::host_fd`]). It reads one frame into a host buffer, then copies it into one
//! chain (or, with MRG_RXBUF, as many chains as it needs). When the driver has posted too few
//! buffers the frame stays pending, the backend leaves the epoll set and the device waits for
//! an rx kick: the tap then queues (and at its limit drops) instead of the VMM spinning.
//! Transmit: on a kick, each chain's readable buffers are gathered and written to the backend.
//! A tx chain that is well-formed but makes no frame (device-writable buffers, shorter than the
//! header, longer than 64 KiB) is dropped and counted; a chain outside guest memory, looping
//! and the like is a structural error: DEVICE_NEEDS_RESET.
//!
//! Every pass is bounded ([`BATCH`] frames); a device with more work left wakes itself through
//! an eventfd in its epoll set, so one busy NIC cannot starve the event loop.

pub mod tap;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::ring::{self, add_used, notify, pop_chain, Chain};
use crate::{
    device_type, features, DeviceError, DeviceState, GuestMemory, Interrupt, SavedQueue,
    VirtioDevice,
};

/// Size of the virtio-net header with VERSION_1 (`struct virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue.
pub const RX: u16 = 0;
/// The transmit queue.
pub const TX: u16 = 1;
/// Largest frame with its header: a 64 KiB GSO packet plus Ethernet and VLAN headers.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65550;
/// Smallest transmitted frame: the header and an Ethernet header.
const MIN_TX: usize = VNET_HDR_LEN + 14;
/// Most frames moved per direction in one pass.
pub const BATCH: usize = 256;

/// Feature bits (virtio 1.2 section 5.1.3).
pub mod feature {
    /// The device takes partial checksums.
    pub const CSUM: u64 = 1 << 0;
    /// The driver takes partial checksums.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// The device has a MAC address in its configuration.
    pub const MAC: u64 = 1 << 5;
    /// The driver takes TSO over IPv4.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// The driver takes TSO over IPv6.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// The driver takes UFO.
    pub const GUEST_UFO: u64 = 1 << 10;
    /// The device takes TSO over IPv4.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// The device takes TSO over IPv6.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// The device takes UFO.
    pub const HOST_UFO: u64 = 1 << 14;
    /// Receive buffers may be merged.
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// The configuration has a link status.
    pub const STATUS: u64 = 1 << 16;
}

/// `status` in the configuration: link up.
const LINK_UP: u16 = 1;
/// Size of the configuration: mac, status, max_virtqueue_pairs.
const CONFIG_SIZE: usize = 10;

/// What a NIC's host side is: frames in and out, one per call, each with its 12-byte header.
pub trait Backend: Send {
    /// Reads one frame (`WouldBlock` when none is waiting).
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Sends one frame.
    fn send(&mut self, buf: &[u8]) -> std::io::Result<usize>;
    /// Which offloads (`tap::offload` flags) the backend may hand us.
    fn set_offload(&self, flags: u32) -> std::io::Result<()>;
    /// The fd that is readable when a frame is waiting.
    fn raw_fd(&self) -> RawFd;
}

/// Frame counters of one NIC (read by the VMM for status).
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames given to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes given to the guest (without headers).
    pub rx_bytes: AtomicU64,
    /// Frames from the host dropped: no buffer large enough without MRG_RXBUF.
    pub rx_dropped: AtomicU64,
    /// Frames the guest sent to the host.
    pub tx_frames: AtomicU64,
    /// Bytes the guest sent (without headers).
    pub tx_bytes: AtomicU64,
    /// Guest frames dropped: malformed chains, or the host refused them.
    pub tx_dropped: AtomicU64,
}

/// Saved state of virtio-net: where its queues stand, when active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The receive queue's progress.
    pub rx: Option<SavedQueue>,
    /// The transmit queue's progress.
    pub tx: Option<SavedQueue>,
}

struct Active {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    irq: Arc<dyn Interrupt>,
}

/// A RARP "reverse request" from `mac` to everyone, behind a zeroed virtio-net header: the frame
/// QEMU's announce-self sends after a migration, so bridges learn the port of `mac`.
pub fn rarp_announce(mac: [u8; 6]) -> [u8; VNET_HDR_LEN + 60] {
    let mut f = [0u8; VNET_HDR_LEN + 60];
    let e = &mut f[VNET_HDR_LEN..];
    e[0..6].fill(0xff);
    e[6..12].copy_from_slice(&mac);
    e[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // RARP
    e[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    e[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    e[18] = 6;
    e[19] = 4;
    e[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    e[22..28].copy_from_slice(&mac); // sender hardware address; sender IP 0
    e[32..38].copy_from_slice(&mac); // target hardware address; target IP 0
    f
}

/// Epoll tokens of the device's own set.
const TOKEN_BACKEND: u64 = 0;
const TOKEN_WAKE: u64 = 1;

/// The virtio-net device.
pub struct Net {
    backend: Box<dyn Backend>,
    mac: [u8; 6],
    /// Offload flags the backend accepted when probed.
    offloads: u32,
    acked: u64,
    offload_error: Option<String>,
    epoll: Epoll,
    wake: EventFd,
    listening: bool,
    active: Option<Active>,
    counters: Arc<NetCounters>,
    rx_buf: Vec<u8>,
    /// Length of a frame in `rx_buf` that is waiting for buffers.
    pending: Option<usize>,
    tx_buf: Vec<u8>,
}

/// The offload flags to try, best first: everything, no UFO, checksums only, none.
const OFFLOAD_TRIES: [u32; 4] = [
    tap::offload::CSUM | tap::offload::TSO4 | tap::offload::TSO6 | tap::offload::UFO,
    tap::offload::CSUM | tap::offload::TSO4 | tap::offload::TSO6,
    tap::offload::CSUM,
    0,
];

impl Net {
    /// A NIC with address `mac` on `backend`. Offloads are offered as far as the backend
    /// accepts them.
    pub fn new(backend: Box<dyn Backend>, mac: [u8; 6]) -> std::io::Result<Self> {
        let offloads = OFFLOAD_TRIES
            .into_iter()
            .find(|&f| backend.set_offload(f).is_ok())
            .unwrap_or(0);
        backend.set_offload(0)?;
        let epoll = Epoll::new()?;
        let wake = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        )?;
        Ok(Self {
            backend,
            mac,
            offloads,
            acked: 0,
            offload_error: None,
            epoll,
            wake,
            listening: false,
            active: None,
            counters: Arc::new(NetCounters::default()),
            rx_buf: vec![0; MAX_FRAME],
            pending: None,
            tx_buf: Vec::with_capacity(MAX_FRAME),
        })
    }

    /// The NIC's counters.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    fn has(&self, f: u64) -> bool {
        self.acked & f != 0
    }

    /// Starts or stops waiting for frames from the backend.
    fn listen(&mut self, on: bool) -> Result<(), DeviceError> {
        if on == self.listening {
            return Ok(());
        }
        let fd = self.backend.raw_fd();
        let r = if on {
            let ev = EpollEvent::new(EventSet::IN, TOKEN_BACKEND);
            self.epoll.ctl(ControlOperation::Add, fd, ev)
        } else {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        };
        r.map_err(|e| DeviceError::Host(format!("epoll: {e}")))?;
        self.listening = on;
        Ok(())
    }

    /// Stops all host-side work after an error (until the driver resets the device).
    fn stop(&mut self) {
        let _ = self.listen(false);
        let _ = self.wake.read();
        self.pending = None;
    }

    /// Moves frames from the backend to the guest; returns whether more may be waiting.
    fn receive(&mut self) -> Result<bool, DeviceError> {
        let indirect = self.has(features::RING_INDIRECT_DESC);
        let mrg = self.has(feature::MRG_RXBUF);
        let csum = self.has(feature::GUEST_CSUM);
        let Some(a) = self.active.as_mut() else {
            return Ok(false);
        };
        if !a.rx.ready() {
            self.pending = None;
            return Ok(false);
        }
        let mut used = 0usize;
        let mut more = true;
        for _ in 0..BATCH {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_buf) {
                    Ok(n) if n >= VNET_HDR_LEN => n,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        more = false;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(DeviceError::Host(format!("receive: {e}"))),
                },
            };
            let frame = &mut self.rx_buf[..len];
            if !csum {
                frame[0] = 0;
            }
            match deliver(a, frame, mrg, indirect)? {
                Delivery::Done(n) => {
                    used += n;
                    self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .rx_bytes
                        .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                }
                Delivery::TooBig => {
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Delivery::NoBuffers => {
                    self.pending = Some(len);
                    break;
                }
            }
        }
        if used > 0 {
            notify(&mut a.rx, &a.mem, a.irq.as_ref(), RX)?;
        }
        if self.pending.is_some() {
            // Wait for the driver: an rx kick resumes us. If buffers arrived meanwhile,
            // enable_notification says so and we go on at once.
            let again =
                a.rx.enable_notification(&a.mem)
                    .map_err(|e| ring::ring_err(RX, e))?;
            if !again {
                self.listen(false)?;
                return Ok(false);
            }
            return Ok(true);
        }
        Ok(more)
    }

    /// Sends the guest's frames; returns whether more may be waiting.
    fn transmit(&mut self) -> Result<bool, DeviceError> {
        let indirect = self.has(features::RING_INDIRECT_DESC);
        let Some(a) = self.active.as_mut() else {
            return Ok(false);
        };
        if !a.tx.ready() {
            return Ok(false);
        }
        let mut used = 0;
        let mut more = true;
        a.tx.disable_notification(&a.mem)
            .map_err(|e| ring::ring_err(TX, e))?;
        for _ in 0..BATCH {
            let Some(chain) = pop_chain(&mut a.tx, &a.mem, TX, indirect)? else {
                let again =
                    a.tx.enable_notification(&a.mem)
                        .map_err(|e| ring::ring_err(TX, e))?;
                if again {
                    continue;
                }
                more = false;
                break;
            };
            send_one(
                a,
                &chain,
                &mut self.tx_buf,
                self.backend.as_mut(),
                &self.counters,
            )?;
            add_used(&mut a.tx, &a.mem, TX, chain.head, 0)?;
            used += 1;
        }
        if used > 0 {
            notify(&mut a.tx, &a.mem, a.irq.as_ref(), TX)?;
        }
        Ok(more)
    }

    /// One pass of work in both directions; schedules another when work is left.
    fn pump(&mut self, tx: bool, rx: bool) -> Result<(), DeviceError> {
        let mut more = false;
        if tx {
            more |= self.transmit()?;
        }
        if rx && self.listening {
            more |= self.receive()?;
        }
        if more {
            // The counter cannot overflow in practice; a failed write leaves it readable.
            let _ = self.wake.write(1);
        }
        Ok(())
    }

    /// Buffers arrived: stop the kicks, take the pending frame, listen again.
    fn rx_kicked(&mut self) -> Result<(), DeviceError> {
        if let Some(a) = self.active.as_mut() {
            a.rx.disable_notification(&a.mem)
                .map_err(|e| ring::ring_err(RX, e))?;
        }
        self.listen(true)?;
        self.pump(false, true)
    }

    fn guard(&mut self, r: Result<(), DeviceError>) -> Result<(), DeviceError> {
        if r.is_err() {
            self.stop();
        }
        r
    }
}

/// The outcome of offering one frame to the receive queue.
enum Delivery {
    /// Delivered in this many chains.
    Done(usize),
    /// No chain can hold it (without MRG_RXBUF): dropped, chains untouched.
    TooBig,
    /// Too few chains posted: nothing taken.
    NoBuffers,
}

/// Copies `frame` (header included) into the receive queue.
fn deliver(
    a: &mut Active,
    frame: &mut [u8],
    mrg: bool,
    indirect: bool,
) -> Result<Delivery, DeviceError> {
    let start = a.rx.next_avail();
    let mut chains: Vec<(Chain, usize)> = Vec::new();
    let mut room = 0usize;
    while room < frame.len() {
        let Some(c) = pop_chain(&mut a.rx, &a.mem, RX, indirect)? else {
            a.rx.set_next_avail(start);
            return Ok(Delivery::NoBuffers);
        };
        let cap = c.writable();
        if !mrg {
            if cap < frame.len() {
                a.rx.set_next_avail(start);
                return Ok(Delivery::TooBig);
            }
        } else if cap < VNET_HDR_LEN && chains.is_empty() {
            // The header must fit in the first chain; a chain too small for it is skipped.
            add_used(&mut a.rx, &a.mem, RX, c.head, 0)?;
            continue;
        }
        let take = cap.min(frame.len() - room);
        room += take;
        chains.push((c, take));
    }
    let n = chains.len();
    frame[10..12].copy_from_slice(&(n as u16).to_le_bytes());
    let mut at = 0;
    for (c, take) in &chains {
        ring::write_to(&a.mem, &c.segs, 0, &frame[at..at + take], RX)?;
        at += take;
    }
    for (c, take) in chains {
        add_used(&mut a.rx, &a.mem, RX, c.head, take as u32)?;
    }
    Ok(Delivery::Done(n))
}

/// Gathers one tx chain and sends it; malformed frames are dropped and counted.
fn send_one(
    a: &Active,
    chain: &Chain,
    buf: &mut Vec<u8>,
    backend: &mut dyn Backend,
    counters: &NetCounters,
) -> Result<(), DeviceError> {
    let drop = || {
        counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
    };
    if chain.writable() > 0 || chain.readable() < MIN_TX || chain.readable() > MAX_FRAME {
        drop();
        return Ok(());
    }
    buf.clear();
    ring::read_from(&a.mem, &chain.segs, buf, MAX_FRAME, TX)?;
    match backend.send(buf) {
        Ok(_) => {
            counters.tx_frames.fetch_add(1, Ordering::Relaxed);
            counters
                .tx_bytes
                .fetch_add((buf.len() - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        }
        // The host side is full or gone: the frame is lost, as on a wire.
        Err(_) => drop(),
    }
    Ok(())
}

/// tap offload flags for the GUEST_* features in `acked`.
fn offload_flags(acked: u64) -> u32 {
    if acked & feature::GUEST_CSUM == 0 {
        return 0;
    }
    let mut f = tap::offload::CSUM;
    for (bit, flag) in [
        (feature::GUEST_TSO4, tap::offload::TSO4),
        (feature::GUEST_TSO6, tap::offload::TSO6),
        (feature::GUEST_UFO, tap::offload::UFO),
    ] {
        if acked & bit != 0 {
            f |= flag;
        }
    }
    f
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = feature::MAC | feature::STATUS | feature::MRG_RXBUF;
        let o = self.offloads;
        if o & tap::offload::CSUM != 0 {
            f |= feature::CSUM | feature::GUEST_CSUM;
            for (flag, bits) in [
                (tap::offload::TSO4, feature::HOST_TSO4 | feature::GUEST_TSO4),
                (tap::offload::TSO6, feature::HOST_TSO6 | feature::GUEST_TSO6),
                (tap::offload::UFO, feature::HOST_UFO | feature::GUEST_UFO),
            ] {
                if o & flag != 0 {
                    f |= bits;
                }
            }
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
        self.offload_error = self
            .backend
            .set_offload(offload_flags(features))
            .err()
            .map(|e| format!("TUNSETOFFLOAD: {e}"));
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; CONFIG_SIZE];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(usize::try_from(o).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        irq: Arc<dyn Interrupt>,
    ) -> Result<(), DeviceError> {
        if let Some(e) = self.offload_error.take() {
            return Err(DeviceError::Host(e));
        }
        let mut it = queues.into_iter();
        let (Some(rx), Some(tx)) = (it.next(), it.next()) else {
            return Err(DeviceError::Activate("virtio-net needs 2 queues".into()));
        };
        self.active = Some(Active { mem, rx, tx, irq });
        self.pending = None;
        self.listen(true)
    }

    fn queue_notified(&mut self, queue: u16) -> Result<(), DeviceError> {
        if self.active.is_none() {
            return Ok(());
        }
        let r = match queue {
            RX => self.rx_kicked(),
            TX => self.pump(true, false),
            _ => Ok(()),
        };
        self.guard(r)
    }

    fn reset(&mut self) {
        self.stop();
        self.active = None;
        self.acked = 0;
        let _ = self.backend.set_offload(0);
    }

    fn save(&self) -> DeviceState {
        let a = self.active.as_ref();
        DeviceState::Net(NetState {
            rx: a.map(|a| SavedQueue::of(&a.rx)),
            tx: a.map(|a| SavedQueue::of(&a.tx)),
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::Net(s) = state else {
            return Err(DeviceError::Restore("not a virtio-net state".into()));
        };
        // A restored guest may be on another host or another bridge port than where it was
        // saved: tell the network where its MAC is now, or switches keep sending its frames to
        // the old port until the guest happens to transmit. Best effort, like QEMU's
        // announce-self: a backend that refuses the frame changes nothing.
        let _ = self.backend.send(&rarp_announce(self.mac));
        if let Some(a) = self.active.as_mut() {
            for (q, saved) in [(&mut a.rx, s.rx), (&mut a.tx, s.tx)] {
                if let Some(saved) = saved {
                    q.set_next_avail(saved.next_avail);
                    q.set_next_used(saved.next_used);
                }
            }
        }
        Ok(())
    }

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn host_ready(&mut self) -> Result<(), DeviceError> {
        let woken = self.wake.read().is_ok();
        let r = self.pump(woken, true);
        self.guard(r)
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
