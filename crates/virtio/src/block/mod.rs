//! virtio-blk (device type 2, virtio 1.2 section 5.2): one request queue over a
//! [`ferro_disk::BlockBackend`].
//!
//! Threads: the VMM's event loop calls [`VirtioDevice::queue_notified`] on a kick; it pops
//! every available chain, walks it with [`walk_chain`] (a malformed chain or ring makes the
//! device ask for a reset, as every device does), parses the request ([`request::parse`]) and
//! hands it to this disk's worker threads ([`worker::Pool`], [`WORKERS`] of them, started at
//! the first activation so they inherit the vCPU thread's signal mask). Requests refused while
//! parsing, and GET_ID, are completed on the event loop at once. Reads and writes of a raw
//! image (single or merged runs) go to an io_uring the event loop submits, one entry at a
//! time, and reaps itself (its descriptor is the device's host fd; see [`uring`]); flushes,
//! discard, write-zeroes, qcow2 and write-through go to the workers. Either does the disk I/O
//! straight between the image and guest memory (a bounce buffer only where O_DIRECT or qcow2
//! needs one), writes the status, puts the chain in the used ring and raises the queue's
//! MSI-X vector, one interrupt per batch (see [`worker`]). The event loop never waits for the
//! disk, except to finish the ring's requests at a reset, a save or a device error.
//!
//! Polling: while the event loop polls ([`VirtioDevice::poll_queues`]), requests are taken
//! from the available ring without a kick and the driver's kicks stay off; reaping the ring's
//! completions ([`VirtioDevice::host_ready`]) turns them off too, before the driver sees the
//! completions and refills. That reaping goes [`REAP_STEP`] completions at a time and takes,
//! between two steps, the requests the driver has already put in the freed slots, so the next
//! batch's first request reaches the host disk before the last completions of this one are
//! posted (4 KiB random reads: 9 to 10 of 12 alternating runs faster, medians +5-6 %).
//! [`VirtioDevice::poll_done`] turns them back on and takes what arrived meanwhile. Restore
//! always leaves them on.
//!
//! Features: SEG_MAX, SIZE_MAX, BLK_SIZE (512), FLUSH, DISCARD and WRITE_ZEROES (writable
//! disks), RO (read-only disks); the transport adds VERSION_1, EVENT_IDX and INDIRECT_DESC. A
//! driver that does not take FLUSH gets write-through: every write is flushed before it
//! completes.
//!
//! Save and restore: [`VirtioDevice::save`] first waits until no request is in flight (the
//! caller has paused the vCPUs and holds the transport, so nothing new arrives), then records
//! the queue's indices; the saved state therefore always has 0 requests in flight, and
//! restore only puts the indices back.

pub mod request;
pub mod uring;
pub mod worker;

use std::os::fd::RawFd;
use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ferro_disk::BlockBackend;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use crate::chain::walk_chain;
use crate::{
    device_type, features, DeviceError, DeviceState, GuestMemory, Interrupt, SavedQueue,
    VirtioDevice,
};
use request::{Limits, Op, Rejected, ID_BYTES, SECTOR};
use uring::Uring;
use worker::{Ctx, Job, Part, Pool};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Worker threads per disk.
pub const WORKERS: usize = 16;
/// Completions the event loop reaps before it looks at the available ring again (1 measured
/// the same as 2).
pub const REAP_STEP: usize = 2;
/// Bytes of the device configuration we present (virtio_blk_config up to
/// `write_zeroes_may_unmap` and its padding).
pub const CONFIG_SIZE: usize = 60;

/// virtio-blk feature bits.
pub mod feature {
    /// `size_max` is valid.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// `seg_max` is valid.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The disk is read-only.
    pub const RO: u64 = 1 << 5;
    /// `blk_size` is valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// FLUSH requests.
    pub const FLUSH: u64 = 1 << 9;
    /// DISCARD requests.
    pub const DISCARD: u64 = 1 << 13;
    /// WRITE_ZEROES requests.
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// What a disk is, for the device.
#[derive(Clone)]
pub struct BlockConfig {
    /// The opened image.
    pub disk: Arc<dyn BlockBackend>,
    /// The serial GET_ID reports (at most 20 bytes are used); `None`: the backend's id.
    pub serial: Option<String>,
    /// Name of the worker threads (`blk0`, ...).
    pub name: String,
}

/// Saved state of virtio-blk: where its queue stands, when active. No request is ever in
/// flight in a saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The request queue's progress (None when not activated).
    pub queue: Option<SavedQueue>,
}

struct Active {
    ctx: Arc<Ctx>,
    /// Reused per kick: popped heads, parsed jobs, at-once completions.
    heads: Vec<u16>,
    jobs: Vec<Job>,
    done: Vec<(u16, u32)>,
    /// The driver's kicks are off (USED_F_NO_NOTIFY set, or avail_event left behind with
    /// EVENT_IDX) because the event loop polls the ring.
    kicks_off: bool,
}

/// The virtio-blk device.
pub struct Block {
    cfg: BlockConfig,
    id: [u8; ID_BYTES],
    config: [u8; CONFIG_SIZE],
    negotiated: u64,
    active: Option<Active>,
    pool: Option<Pool>,
    /// Reads and writes of a plain file, submitted and reaped on the event loop (None: the
    /// image has metadata (qcow2), or the host has no io_uring).
    uring: Option<Mutex<Uring>>,
    /// Requests of the current activation in flight (ring and workers), for the event loop's
    /// polling ([`VirtioDevice::poll_counter`]).
    busy: Arc<AtomicUsize>,
}

/// A request-queue access that failed (the ring lies outside guest memory).
fn ring_error(e: virtio_queue::Error) -> DeviceError {
    DeviceError::Ring {
        queue: 0,
        what: e.to_string(),
    }
}

/// Whether `disk` is one plain file that vectored I/O can reach directly (a raw image).
fn plain_file(disk: &dyn BlockBackend) -> bool {
    disk.vectored_fd(&[], 0, false).is_some()
}

/// The GET_ID answer: `serial`, or the backend's id, NUL-padded to 20 bytes.
fn id_bytes(serial: Option<&str>, disk: &dyn BlockBackend) -> [u8; ID_BYTES] {
    let s = serial.map_or_else(|| disk.id(), str::to_string);
    let mut id = [0u8; ID_BYTES];
    let n = s.len().min(ID_BYTES);
    id[..n].copy_from_slice(&s.as_bytes()[..n]);
    id
}

impl Block {
    /// A device for `cfg.disk`, waiting for a driver.
    pub fn new(cfg: BlockConfig) -> Self {
        let id = id_bytes(cfg.serial.as_deref(), cfg.disk.as_ref());
        let mut c = [0u8; CONFIG_SIZE];
        let mut put = |at: usize, b: &[u8]| c[at..at + b.len()].copy_from_slice(b);
        put(0, &(cfg.disk.size() / SECTOR).to_le_bytes());
        put(8, &request::SIZE_MAX.to_le_bytes());
        put(12, &request::SEG_MAX.to_le_bytes());
        put(20, &(SECTOR as u32).to_le_bytes());
        // 36: max_discard_sectors, max_discard_seg, discard_sector_alignment (4 KiB);
        // 48: max_write_zeroes_sectors, max_write_zeroes_seg; 56: write_zeroes_may_unmap.
        put(36, &request::MAX_RANGE_SECTORS.to_le_bytes());
        put(40, &request::MAX_RANGES.to_le_bytes());
        put(44, &8u32.to_le_bytes());
        put(48, &request::MAX_RANGE_SECTORS.to_le_bytes());
        put(52, &request::MAX_RANGES.to_le_bytes());
        put(56, &[1]);
        let uring = plain_file(cfg.disk.as_ref())
            .then(|| Uring::new().ok().map(Mutex::new))
            .flatten();
        Self {
            cfg,
            id,
            config: c,
            negotiated: 0,
            active: None,
            pool: None,
            uring,
            busy: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            capacity: self.cfg.disk.size() / SECTOR,
            readonly: self.cfg.disk.readonly(),
            discard: self.negotiated & feature::DISCARD != 0,
            write_zeroes: self.negotiated & feature::WRITE_ZEROES != 0,
        }
    }

    fn ring(&self) -> Option<MutexGuard<'_, Uring>> {
        self.uring
            .as_ref()
            .map(|u| u.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Waits until no request of the current activation is in flight: the ring's are reaped
    /// here (the event loop may be waiting for the device), the workers' are waited for.
    fn drain(&self) {
        let Some(a) = &self.active else {
            return;
        };
        if let Some(mut u) = self.ring() {
            u.wait_all();
        }
        a.ctx.drain();
    }

    /// Takes every available request: parses it, answers what needs no disk, and hands the
    /// rest to the ring or the workers; leaves the driver's kicks off with `kicks_off` (see
    /// [`Active::pop_all`]). Returns how many requests it took.
    fn serve(&mut self, queue: u16, kicks_off: bool) -> Result<usize, DeviceError> {
        let indirect = self.negotiated & features::RING_INDIRECT_DESC != 0;
        let lim = self.limits();
        let Some(a) = self.active.as_mut() else {
            return Ok(0);
        };
        if a.ctx.broken.load(Ordering::Acquire) {
            return Err(DeviceError::Ring {
                queue: 0,
                what: "used ring is outside guest memory".into(),
            });
        }
        let (ready, table, size) = {
            let q = a.ctx.queue.lock().unwrap_or_else(|e| e.into_inner());
            (q.ready(), q.desc_table(), q.size())
        };
        if queue != 0 || !ready {
            return Ok(0);
        }
        a.heads.clear();
        a.pop_all(kicks_off)?;
        let taken = a.heads.len();
        let ctx = a.ctx.clone();
        let mut result = Ok(());
        for &head in &a.heads {
            let segs = match walk_chain(&ctx.mem, GuestAddress(table), size, head, indirect) {
                Ok(s) => s,
                Err(source) => {
                    // Requests parsed before the bad one still run; nothing after it does.
                    result = Err(DeviceError::Chain { queue: 0, source });
                    break;
                }
            };
            match request::parse(&ctx.mem, &segs, &lim) {
                Ok(req) if req.op == Op::GetId => {
                    let out = request::answer_id(&ctx.mem, &segs, &req, &ctx.id);
                    a.done.push((head, out.written));
                }
                Ok(req) => {
                    let p = Part { head, segs, req };
                    // A request that continues the previous one on the disk joins it.
                    let p = match a.jobs.last_mut() {
                        Some(j) => j.merge(p),
                        None => Err(p),
                    };
                    if let Err(p) = p {
                        a.jobs.push(Job::new(ctx.clone(), p));
                    }
                }
                Err(Rejected { at, status }) => {
                    let written = match at {
                        Some(addr) => {
                            // walk_chain checked the address is guest memory.
                            let _ = vm_memory::Bytes::write_obj(&ctx.mem, status, addr);
                            1
                        }
                        None => 0,
                    };
                    a.done.push((head, written));
                }
            }
        }
        let n: usize = a.jobs.iter().map(Job::requests).sum();
        if n > 0 {
            ctx.begin(n);
            if let Some(u) = self.uring.as_ref() {
                // Reads and writes of a plain file go to io_uring; what it cannot take stays
                // in `jobs` for the workers.
                let mut u = u.lock().unwrap_or_else(|e| e.into_inner());
                let mut rest = Vec::new();
                for j in a.jobs.drain(..) {
                    if let Err(j) = u.push(j) {
                        rest.push(j);
                    }
                }
                // Each entry went to the kernel as it was pushed; whatever finished meanwhile
                // joins the same interrupt decision round.
                u.reap();
                a.jobs.extend(rest);
            }
            if let Some(pool) = &self.pool {
                pool.submit(a.jobs.drain(..));
            }
        }
        if !a.done.is_empty() {
            fence(Ordering::Release);
            {
                let mut q = ctx.queue.lock().unwrap_or_else(|e| e.into_inner());
                for &(head, len) in &a.done {
                    ctx.complete(&mut q, head, len);
                }
            }
            a.done.clear();
            ctx.notify(0);
        }
        result.map(|()| taken)
    }

    /// Whether the driver has made requests not taken yet: one load of the available index.
    fn avail_moved(&self) -> Result<bool, DeviceError> {
        let Some(a) = &self.active else {
            return Ok(false);
        };
        let q = a.ctx.queue.lock().unwrap_or_else(|e| e.into_inner());
        if !q.ready() {
            return Ok(false);
        }
        let avail = q
            .avail_idx(&a.ctx.mem, Ordering::Acquire)
            .map_err(ring_error)?;
        Ok(avail.0 != q.next_avail())
    }

    /// Requests in flight now (0 when not active).
    pub fn inflight(&self) -> usize {
        self.active.as_ref().map_or(0, |a| a.ctx.inflight())
    }
}

impl Active {
    /// Takes every available chain off the ring into `heads`. With `kicks_off` (the event
    /// loop polls the ring) the driver's kicks stay off afterwards; otherwise they are turned
    /// back on, and what the driver added meanwhile is taken too.
    fn pop_all(&mut self, kicks_off: bool) -> Result<(), DeviceError> {
        let ring = |what: String| DeviceError::Ring { queue: 0, what };
        let ctx = &self.ctx;
        let mut q = ctx.queue.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            q.disable_notification(&ctx.mem).map_err(ring_error)?;
            loop {
                let avail = q
                    .avail_idx(&ctx.mem, Ordering::Acquire)
                    .map_err(ring_error)?;
                let pending = avail.0.wrapping_sub(q.next_avail());
                if pending == 0 {
                    break;
                }
                if pending > q.size() {
                    return Err(ring(format!(
                        "available index runs {pending} entries ahead of a ring of {}",
                        q.size()
                    )));
                }
                let Some(chain) = q.pop_descriptor_chain(&ctx.mem) else {
                    return Err(ring("available ring is outside guest memory".into()));
                };
                self.heads.push(chain.head_index());
            }
            self.kicks_off = kicks_off;
            if kicks_off {
                return Ok(());
            }
            if !q.enable_notification(&ctx.mem).map_err(ring_error)? {
                return Ok(());
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let base = feature::SIZE_MAX | feature::SEG_MAX | feature::BLK_SIZE | feature::FLUSH;
        if self.cfg.disk.readonly() {
            base | feature::RO
        } else {
            base | feature::DISCARD | feature::WRITE_ZEROES
        }
    }

    fn ack_features(&mut self, features: u64) {
        self.negotiated = features;
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), DeviceError> {
        let queue = queues
            .into_iter()
            .next()
            .ok_or_else(|| DeviceError::Activate("no request queue".into()))?;
        if self.pool.is_none() {
            let pool = Pool::start(WORKERS, &self.cfg.name)
                .map_err(|e| DeviceError::Activate(format!("cannot start I/O threads: {e}")))?;
            self.pool = Some(pool);
        }

        let ctx = Ctx::new(
            mem,
            queue,
            interrupt,
            self.cfg.disk.clone(),
            self.id,
            self.negotiated & feature::FLUSH == 0,
            self.negotiated & features::RING_EVENT_IDX != 0,
            self.busy.clone(),
        );
        self.active = Some(Active {
            ctx: Arc::new(ctx),
            heads: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            jobs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            done: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            kicks_off: false,
        });
        Ok(())
    }

    fn queue_notified(&mut self, queue: u16) -> Result<(), DeviceError> {
        // Kicks stay as they are: off while the event loop polls the ring.
        let kicks_off = self.active.as_ref().is_some_and(|a| a.kicks_off);
        let r = self.serve(queue, kicks_off).map(|_| ());
        if r.is_err() {
            // The transport stops serving the device until a reset: finish the ring's
            // requests now, so its descriptor does not stay readable for an event loop that
            // will no longer reap it.
            if let Some(mut u) = self.ring() {
                u.wait_all();
            }
        }
        r
    }

    fn host_fd(&self) -> Option<RawFd> {
        self.uring
            .as_ref()
            .map(|u| u.lock().unwrap_or_else(|e| e.into_inner()).fd())
    }

    fn host_ready(&mut self) -> Result<(), DeviceError> {
        // Completions wake the driver, which makes its next requests at once: the event loop
        // polls for them after this (see poll_queues), so kicks go off before the driver can
        // see the first completion, not after it has already paid for a kick.
        if let Some(a) = self.active.as_mut() {
            if !a.kicks_off {
                let mut q = a.ctx.queue.lock().unwrap_or_else(|e| e.into_inner());
                if q.ready() {
                    q.disable_notification(&a.ctx.mem).map_err(ring_error)?;
                    a.kicks_off = true;
                }
            }
        }
        // A few completions at a time, taking between two steps what the driver has already
        // put in the slots the last step freed: the host disk gets the next batch's first
        // request while the rest of this one is still being reaped.
        loop {
            let n = match self.ring() {
                Some(mut u) => u.reap_some(REAP_STEP),
                None => 0,
            };
            if n < REAP_STEP {
                break;
            }
            if self.avail_moved()? {
                self.serve(0, true)?;
            }
        }
        Ok(())
    }

    fn poll_counter(&self) -> Option<Arc<AtomicUsize>> {
        Some(self.busy.clone())
    }

    fn poll_queues(&mut self) -> Result<bool, DeviceError> {
        let Some(a) = &self.active else {
            return Ok(false);
        };
        // The common case while polling (kicks off): nothing new, seen with one load.
        if a.kicks_off && !self.avail_moved()? {
            return Ok(false);
        }
        Ok(self.serve(0, true)? > 0)
    }

    fn poll_done(&mut self) -> Result<bool, DeviceError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(false);
        };
        if !a.kicks_off {
            return Ok(false);
        }
        // Kicks on first, then one more look at the ring: a request the driver added before
        // it could see kicks wanted is taken here (the driver orders its index store before
        // its read of the flags, enable_notification its flag store before this read).
        let more = {
            let mut q = a.ctx.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.enable_notification(&a.ctx.mem).map_err(ring_error)?
        };
        a.kicks_off = false;
        if more {
            self.serve(0, false)?;
        }
        Ok(more)
    }

    fn reset(&mut self) {
        // The ring and the workers finish what they hold: no write into guest memory after
        // this.
        self.drain();
        self.active = None;
        self.negotiated = 0;
    }

    fn save(&self) -> DeviceState {
        self.drain();
        DeviceState::Block(BlockState {
            queue: self.active.as_ref().map(|a| {
                let q = a.ctx.queue.lock().unwrap_or_else(|e| e.into_inner());
                SavedQueue::of(&q)
            }),
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceError> {
        let DeviceState::Block(s) = state else {
            return Err(DeviceError::Restore("not a virtio-blk state".into()));
        };
        if let (Some(a), Some(saved)) = (self.active.as_mut(), s.queue) {
            let mut q = a.ctx.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.set_next_avail(saved.next_avail);
            q.set_next_used(saved.next_used);
            // The source may have been polling the ring with the driver's kicks off: turn them
            // on here (the transport then kicks the queue once, for what the driver added).
            if q.ready() {
                q.enable_notification(&a.ctx.mem)
                    .map_err(|e| DeviceError::Restore(format!("request queue: {e}")))?;
            }
            a.kicks_off = false;
        }
        Ok(())
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests;
