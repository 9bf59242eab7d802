//! virtio-balloon (device type 5, virtio 1.2 section 5.5): queue 0 inflates, queue 1
//! deflates, queue 2 carries statistics (VIRTIO_BALLOON_F_STATS_VQ). DEFLATE_ON_OOM is offered:
//! the guest may take pages back under memory pressure.
//!
//! The VMM sets the target (`num_pages`, 4 KiB pages) through a [`BalloonHandle`] from any
//! thread; the device raises a configuration interrupt and the driver inflates or deflates.
//! Inflated pages are given back to the host through the injected [`PageReclaim`] (the VMM
//! uses `madvise(MADV_DONTNEED)` on the guest-memory mapping, so its RSS drops); a deflated
//! page needs nothing: the guest's next touch faults a zero page back in.
//!
//! The statistics buffer is kept by the device after the driver fills it; the device hands it
//! back (asking for fresh numbers) whenever [`BalloonHandle::request_stats`] or a target
//! change asks. PFNs outside guest memory are ignored and counted, never acted on.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend as _};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::ring::{self, add_used, next_chain, notify};
use crate::{
    device_type, features, DeviceError, DeviceState, GuestMemory, Interrupt, SavedQueue,
    VirtioDevice,
};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Inflate queue.
pub const INFLATE: u16 = 0;
/// Deflate queue.
pub const DEFLATE: u16 = 1;
/// Statistics queue.
pub const STATS: u16 = 2;
/// Balloon page size.
pub const PAGE: u64 = 4096;
/// Most chains per queue in one pass.
const BATCH: usize = 256;

/// Feature bits.
pub mod feature {
    /// A statistics queue.
    pub const STATS_VQ: u64 = 1 << 1;
    /// The guest may deflate when it runs out of memory.
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
}

/// Gives guest pages back to the host.
pub trait PageReclaim: Send + Sync {
    /// The guest gave up `len` bytes at `addr` (inside guest memory, page-aligned).
    fn discard(&self, addr: GuestAddress, len: u64) -> std::io::Result<()>;
}

/// The guest's last statistics (tag -> value, virtio 1.2 section 5.5.6.3).
pub type BalloonStats = BTreeMap<u16, u64>;

struct Shared {
    target: AtomicU32,
    actual: AtomicU32,
    inflated: AtomicU64,
    deflated: AtomicU64,
    bad_pfns: AtomicU64,
    stats: Mutex<BalloonStats>,
    irq: Mutex<Option<Arc<dyn Interrupt>>>,
    /// Asks the device (on its event loop) to return the statistics buffer.
    kick: EventFd,
}

/// The VMM's side of a balloon: set the target, read what the guest did.
#[derive(Clone)]
pub struct BalloonHandle(Arc<Shared>);

impl BalloonHandle {
    /// Asks the guest to hold `pages` 4 KiB pages in the balloon.
    pub fn set_target(&self, pages: u32) {
        self.0.target.store(pages, Ordering::Release);
        if let Some(irq) = self
            .0
            .irq
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            irq.signal_config();
        }
        self.request_stats();
    }

    /// The target in pages.
    pub fn target(&self) -> u32 {
        self.0.target.load(Ordering::Acquire)
    }

    /// Pages the guest says the balloon holds (`actual`).
    pub fn actual(&self) -> u32 {
        self.0.actual.load(Ordering::Acquire)
    }

    /// Pages inflated and deflated so far, and PFNs ignored as outside guest memory.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.0.inflated.load(Ordering::Relaxed),
            self.0.deflated.load(Ordering::Relaxed),
            self.0.bad_pfns.load(Ordering::Relaxed),
        )
    }

    /// The guest's last statistics.
    pub fn stats(&self) -> BalloonStats {
        self.0
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks the guest for fresh statistics (they arrive in [`BalloonHandle::stats`]).
    pub fn request_stats(&self) {
        // Only while a driver runs (under the lock that deactivation takes), so the kick
        // never stays pending on an inactive device.
        let irq = self.0.irq.lock().unwrap_or_else(|e| e.into_inner());
        if irq.is_some() {
            let _ = self.0.kick.write(1);
        }
    }
}

/// Saved state of virtio-balloon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// Target in pages.
    pub target: u32,
    /// `actual` as the driver last wrote it.
    pub actual: u32,
    /// Queue progress: inflate, deflate, stats.
    pub queues: Vec<SavedQueue>,
}

struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    irq: Arc<dyn Interrupt>,
    /// The statistics chain the device holds.
    stats_head: Option<u16>,
}

/// The virtio-balloon device.
pub struct Balloon {
    shared: Arc<Shared>,
    reclaim: Arc<dyn PageReclaim>,
    acked: u64,
    active: Option<Active>,
}

impl Balloon {
    /// A balloon with an initial target of `target` pages.
    pub fn new(target: u32, reclaim: Arc<dyn PageReclaim>) -> std::io::Result<Self> {
        Ok(Self {
            shared: Arc::new(Shared {
                target: AtomicU32::new(target),
                actual: AtomicU32::new(0),
                inflated: AtomicU64::new(0),
                deflated: AtomicU64::new(0),
                bad_pfns: AtomicU64::new(0),
                stats: Mutex::new(BalloonStats::new()),
                irq: Mutex::new(None),
                kick: EventFd::new(EFD_NONBLOCK)?,
            }),
            reclaim,
            acked: 0,
            active: None,
        })
    }

    /// The handle the VMM keeps.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle(self.shared.clone())
    }

    /// Takes the chains of queue `q`: inflate/deflate PFN lists, or the statistics buffer.
    fn drain(&mut self, q: u16) -> Result<(), DeviceError> {
        let indirect = self.acked & features::RING_INDIRECT_DESC != 0;
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        let Some(queue) = a.queues.get_mut(usize::from(q)) else {
            return Ok(());
        };
        if !queue.ready() {
            return Ok(());
        }
        let mut used = 0;
        let mut buf = Vec::new();
        for _ in 0..BATCH {
            let Some(chain) = next_chain(queue, &a.mem, q, indirect)? else {
                break;
            };
            buf.clear();
            // A PFN list is at most a queue's worth of pages per descriptor in practice;
            // anything longer is read up to 1 MiB and the rest ignored.
            ring::read_from(&a.mem, &chain.segs, &mut buf, 1 << 20, q)?;
            if q == STATS {
                let mut s = BalloonStats::new();
                for e in buf.chunks_exact(10) {
                    let tag = u16::from_le_bytes([e[0], e[1]]);
                    let mut v = [0u8; 8];
                    v.copy_from_slice(&e[2..10]);
                    s.insert(tag, u64::from_le_bytes(v));
                }
                *self.shared.stats.lock().unwrap_or_else(|e| e.into_inner()) = s;
                if let Some(old) = a.stats_head.replace(chain.head) {
                    // A second buffer while we hold one: give the old one back.
                    add_used(queue, &a.mem, q, old, 0)?;
                    used += 1;
                }
                continue;
            }
            let pfns = buf
                .chunks_exact(4)
                .map(|p| u32::from_le_bytes([p[0], p[1], p[2], p[3]]));
            if q == INFLATE {
                discard_runs(&a.mem, pfns, self.reclaim.as_ref(), &self.shared)?;
            } else {
                self.shared
                    .deflated
                    .fetch_add(pfns.count() as u64, Ordering::Relaxed);
            }
            add_used(queue, &a.mem, q, chain.head, 0)?;
            used += 1;
        }
        if used > 0 {
            notify(queue, &a.mem, a.irq.as_ref(), q)?;
        }
        Ok(())
    }

    /// Returns the held statistics buffer: the driver refills it.
    fn return_stats(&mut self) -> Result<(), DeviceError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        let (Some(head), Some(queue)) = (a.stats_head.take(), a.queues.get_mut(2)) else {
            return Ok(());
        };
        add_used(queue, &a.mem, STATS, head, 0)?;
        notify(queue, &a.mem, a.irq.as_ref(), STATS)
    }

    fn guard(&mut self, r: Result<(), DeviceError>) -> Result<(), DeviceError> {
        if r.is_err() {
            self.deactivate();
        }
        r
    }

    /// Stops serving: no interrupts, no pending kick.
    fn deactivate(&mut self) {
        self.active = None;
        let mut irq = self.shared.irq.lock().unwrap_or_else(|e| e.into_inner());
        *irq = None;
        let _ = self.shared.kick.read();
    }
}

/// Discards the pages of `pfns`, merging neighbours into runs. The PFNs are sorted first:
/// Linux's driver pops its freshly allocated pages off a stack, so a batch of 256 neighbouring
/// pages arrives in descending order, and taken as given every page was one `madvise` (134k
/// calls for 384 MiB inflated twice, each a pass through KVM's MMU notifier and, for a page
/// the guest had touched, a TLB shootdown of every vCPU); sorted, 700-800 calls, about one a
/// batch. A PFN listed twice is discarded (and counted) once.
fn discard_runs(
    mem: &GuestMemory,
    pfns: impl Iterator<Item = u32>,
    reclaim: &dyn PageReclaim,
    shared: &Shared,
) -> Result<(), DeviceError> {
    let mut sorted: Vec<u64> = Vec::new();
    for pfn in pfns {
        let pfn = u64::from(pfn);
        if !mem.address_in_range(GuestAddress(pfn * PAGE))
            || !mem.address_in_range(GuestAddress(pfn * PAGE + PAGE - 1))
        {
            shared.bad_pfns.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        sorted.push(pfn);
    }
    sorted.sort_unstable();
    sorted.dedup();
    shared
        .inflated
        .fetch_add(sorted.len() as u64, Ordering::Relaxed);
    let flush = |r: (u64, u64)| -> Result<(), DeviceError> {
        reclaim
            .discard(GuestAddress(r.0 * PAGE), r.1 * PAGE)
            .map_err(|e| DeviceError::Host(format!("discarding guest pages: {e}")))
    };
    let mut run: Option<(u64, u64)> = None;
    for pfn in sorted {
        run = match run {
            // Every page of a run was checked; a run may span two adjacent regions.
            Some((start, n)) if start + n == pfn => Some((start, n + 1)),
            Some(r) => {
                flush(r)?;
                Some((pfn, 1))
            }
            None => Some((pfn, 1)),
        };
    }
    if let Some(r) = run {
        flush(r)?;
    }
    Ok(())
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        feature::STATS_VQ | feature::DEFLATE_ON_OOM
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn config_size(&self) -> usize {
        8
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 8];
        cfg[..4].copy_from_slice(&self.shared.target.load(Ordering::Acquire).to_le_bytes());
        cfg[4..].copy_from_slice(&self.shared.actual.load(Ordering::Acquire).to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(usize::try_from(o).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4) is the driver's; a 4-byte write of it, as drivers do.
        if offset == 4 && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.shared.actual.store(v, Ordering::Release);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        irq: Arc<dyn Interrupt>,
    ) -> Result<(), DeviceError> {
        if queues.len() != 3 {
            return Err(DeviceError::Activate("virtio-balloon has 3 queues".into()));
        }
        *self.shared.irq.lock().unwrap_or_else(|e| e.into_inner()) = Some(irq.clone());
        self.active = Some(Active {
            mem,
            queues,
            irq,
            stats_head: None,
        });
        Ok(())
    }

    fn queue_notified(&mut self, queue: u16) -> Result<(), DeviceError> {
        let r = self.drain(queue);
        self.guard(r)
    }

    fn reset(&mut self) {
        self.deactivate();
        self.acked = 0;
        self.shared.actual.store(0, Ordering::Release);
    }

    fn save(&self) -> DeviceState {
        DeviceState::Balloon(BalloonState {
            target: self.shared.target.load(Ordering::Acquire),
            actual: self.shared.actual.load(Ordering::Acquire),
            queues: self
                .active
                .as_ref()
                .map(|a| a.queues.iter().map(SavedQueue::of).collect())
                .unwrap_or_default(),
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::Balloon(s) = state else {
            return Err(DeviceError::Restore("not a virtio-balloon state".into()));
        };
        self.shared.target.store(s.target, Ordering::Release);
        self.shared.actual.store(s.actual, Ordering::Release);
        if let Some(a) = self.active.as_mut() {
            for (q, saved) in a.queues.iter_mut().zip(&s.queues) {
                q.set_next_avail(saved.next_avail);
                q.set_next_used(saved.next_used);
            }
        }
        Ok(())
    }

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.shared.kick.as_raw_fd())
    }

    fn host_ready(&mut self) -> Result<(), DeviceError> {
        let _ = self.shared.kick.read();
        let r = self.return_stats();
        self.guard(r)
    }
}

#[cfg(test)]
#[path = "balloon_tests.rs"]
mod tests;
