//! virtio-vsock (device type 19, virtio 1.2 section 5.10) with a host side of unix sockets
//! ([`muxer::Muxer`], Firecracker's scheme). Queue 0 carries packets to the guest, queue 1
//! packets from it, queue 2 events (none are sent). Stream sockets only.
//!
//! A tx chain is one packet: the 44-byte header and its payload in the readable buffers (in
//! one descriptor or several). A packet whose header is short, whose `len` exceeds what the
//! chain carries or 64 KiB, or whose chain has writable buffers, is dropped and counted; a
//! chain outside guest memory or looping is a structural error: DEVICE_NEEDS_RESET. An rx
//! chain gets one packet: header plus as much payload as fits its writable buffers.
//!
//! Each pass moves at most [`BATCH`] packets per direction; more work wakes the device again
//! through an eventfd in its own epoll set, which also holds the muxer's sockets.

pub mod muxer;
pub mod packet;

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::ring::{self, add_used, next_chain, notify, pop_chain};
use crate::{
    device_type, features, DeviceError, DeviceState, GuestMemory, Interrupt, SavedQueue,
    VirtioDevice,
};
use muxer::{Muxer, MAX_PAYLOAD};
use packet::{Header, HDR_LEN};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Packets to the guest.
pub const RX: u16 = 0;
/// Packets from the guest.
pub const TX: u16 = 1;
/// Events to the guest.
pub const EVENT: u16 = 2;
/// Most packets per direction in one pass.
pub const BATCH: usize = 256;

/// Packet counters (for status and tests).
#[derive(Debug, Default)]
pub struct VsockCounters {
    /// Packets from the guest handled.
    pub tx_packets: AtomicU64,
    /// Packets from the guest dropped as malformed.
    pub tx_dropped: AtomicU64,
    /// Packets given to the guest.
    pub rx_packets: AtomicU64,
}

/// Saved state of virtio-vsock: where its queues stand (connections are not saved: the host
/// sockets cannot be).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// Queue progress: rx, tx, event.
    pub queues: Vec<SavedQueue>,
}

struct Active {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    event: Queue,
    irq: Arc<dyn Interrupt>,
}

const TOKEN_MUXER: u64 = 0;
const TOKEN_WAKE: u64 = 1;

/// The virtio-vsock device.
pub struct Vsock {
    cid: u64,
    muxer: Muxer,
    epoll: Epoll,
    wake: EventFd,
    acked: u64,
    active: Option<Active>,
    /// The muxer's sockets are in the epoll set (only while a driver runs: until then host
    /// clients wait in the listen backlog instead of waking the event loop).
    watching: bool,
    counters: Arc<VsockCounters>,
    buf: Vec<u8>,
}

impl Vsock {
    /// A device for guest context id `cid` whose host side listens at `uds`.
    pub fn new(cid: u64, uds: &Path) -> std::io::Result<Self> {
        let muxer = Muxer::new(uds, cid)?;
        let epoll = Epoll::new()?;
        let wake = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        )?;
        Ok(Self {
            cid,
            muxer,
            epoll,
            wake,
            acked: 0,
            active: None,
            watching: false,
            counters: Arc::new(VsockCounters::default()),
            buf: Vec::with_capacity(HDR_LEN + MAX_PAYLOAD),
        })
    }

    /// The device's counters.
    pub fn counters(&self) -> Arc<VsockCounters> {
        self.counters.clone()
    }

    fn indirect(&self) -> bool {
        self.acked & features::RING_INDIRECT_DESC != 0
    }

    /// Handles the guest's packets; returns whether more may be waiting.
    fn pump_tx(&mut self) -> Result<bool, DeviceError> {
        let indirect = self.indirect();
        let Some(a) = self.active.as_mut() else {
            return Ok(false);
        };
        if !a.tx.ready() {
            return Ok(false);
        }
        let mut used = 0;
        let mut more = true;
        for _ in 0..BATCH {
            let Some(chain) = next_chain(&mut a.tx, &a.mem, TX, indirect)? else {
                more = false;
                break;
            };
            self.buf.clear();
            let fits = ring::read_from(
                &a.mem,
                &chain.segs,
                &mut self.buf,
                HDR_LEN + MAX_PAYLOAD,
                TX,
            )?;
            let hdr = Header::parse(&self.buf);
            match hdr {
                Some(h)
                    if fits
                        && chain.writable() == 0
                        && h.len as usize <= self.buf.len() - HDR_LEN =>
                {
                    let payload = &self.buf[HDR_LEN..HDR_LEN + h.len as usize];
                    self.muxer.from_guest(&h, payload);
                    self.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            add_used(&mut a.tx, &a.mem, TX, chain.head, 0)?;
            used += 1;
        }
        if used > 0 {
            notify(&mut a.tx, &a.mem, a.irq.as_ref(), TX)?;
        }
        Ok(more)
    }

    /// Gives the guest what the host side has; returns whether more may be waiting.
    fn pump_rx(&mut self) -> Result<bool, DeviceError> {
        let indirect = self.indirect();
        let Some(a) = self.active.as_mut() else {
            return Ok(false);
        };
        if !a.rx.ready() {
            return Ok(false);
        }
        let mut used = 0;
        let mut more = false;
        for i in 0..=BATCH {
            if !self.muxer.has_work() {
                break;
            }
            if i == BATCH {
                more = true;
                break;
            }
            let before = a.rx.next_avail();
            let Some(chain) = pop_chain(&mut a.rx, &a.mem, RX, indirect)? else {
                // No buffers: an rx kick brings us back (or they arrived meanwhile).
                if a.rx
                    .enable_notification(&a.mem)
                    .map_err(|e| ring::ring_err(RX, e))?
                {
                    continue;
                }
                break;
            };
            let cap = chain.writable();
            if cap < HDR_LEN {
                // Too small for a header: returned unused.
                add_used(&mut a.rx, &a.mem, RX, chain.head, 0)?;
                used += 1;
                continue;
            }
            let Some(h) = self.muxer.next_for_guest(cap - HDR_LEN, &mut self.buf) else {
                a.rx.set_next_avail(before);
                break;
            };
            ring::write_to(&a.mem, &chain.segs, 0, &h.bytes(), RX)?;
            ring::write_to(&a.mem, &chain.segs, HDR_LEN, &self.buf, RX)?;
            add_used(
                &mut a.rx,
                &a.mem,
                RX,
                chain.head,
                (HDR_LEN + self.buf.len()) as u32,
            )?;
            self.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
            used += 1;
        }
        if used > 0 {
            notify(&mut a.rx, &a.mem, a.irq.as_ref(), RX)?;
        }
        Ok(more)
    }

    fn pump(&mut self, tx: bool) -> Result<(), DeviceError> {
        let mut more = false;
        if tx {
            more |= self.pump_tx()?;
        }
        more |= self.pump_rx()?;
        if more {
            let _ = self.wake.write(1);
        }
        Ok(())
    }

    fn guard(&mut self, r: Result<(), DeviceError>) -> Result<(), DeviceError> {
        if r.is_err() {
            // Stopped until reset: the guest's connections are gone.
            self.stop();
        }
        r
    }

    /// Starts or stops waiting on the muxer's sockets.
    fn watch(&mut self, on: bool) -> Result<(), DeviceError> {
        if on == self.watching {
            return Ok(());
        }
        let fd = self.muxer.fd();
        let r = if on {
            let ev = EpollEvent::new(EventSet::IN, TOKEN_MUXER);
            self.epoll.ctl(ControlOperation::Add, fd, ev)
        } else {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        };
        r.map_err(|e| DeviceError::Host(format!("epoll: {e}")))?;
        self.watching = on;
        Ok(())
    }

    /// No driver: forget the connections and keep the host fd quiet.
    fn stop(&mut self) {
        self.muxer.reset();
        let _ = self.watch(false);
        let _ = self.wake.read();
        self.active = None;
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn config_size(&self) -> usize {
        8
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.cid.to_le_bytes();
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
        let mut it = queues.into_iter();
        let (Some(rx), Some(tx), Some(event)) = (it.next(), it.next(), it.next()) else {
            return Err(DeviceError::Activate("virtio-vsock needs 3 queues".into()));
        };
        self.active = Some(Active {
            mem,
            rx,
            tx,
            event,
            irq,
        });
        self.watch(true)
    }

    fn queue_notified(&mut self, queue: u16) -> Result<(), DeviceError> {
        if self.active.is_none() {
            return Ok(());
        }
        let r = match queue {
            TX => self.pump(true),
            RX => self.pump(false),
            _ => Ok(()),
        };
        self.guard(r)
    }

    fn reset(&mut self) {
        self.stop();
        self.acked = 0;
    }

    fn save(&self) -> DeviceState {
        DeviceState::Vsock(VsockState {
            queues: self
                .active
                .as_ref()
                .map(|a| [&a.rx, &a.tx, &a.event].map(SavedQueue::of).to_vec())
                .unwrap_or_default(),
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::Vsock(s) = state else {
            return Err(DeviceError::Restore("not a virtio-vsock state".into()));
        };
        if let Some(a) = self.active.as_mut() {
            for (q, saved) in [&mut a.rx, &mut a.tx, &mut a.event]
                .into_iter()
                .zip(&s.queues)
            {
                q.set_next_avail(saved.next_avail);
                q.set_next_used(saved.next_used);
            }
        }
        Ok(())
    }

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn host_ready(&mut self) -> Result<(), DeviceError> {
        let woken = self.wake.read().is_ok();
        self.muxer.process_events();
        if self.active.is_none() {
            return Ok(());
        }
        let r = self.pump(woken);
        self.guard(r)
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
