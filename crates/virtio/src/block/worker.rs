//! The I/O side of virtio-blk: a small pool of worker threads per disk that execute requests
//! the event loop parsed, complete them into the used ring and raise the queue interrupt.
//!
//! Completion batching: a worker that finishes a quick request (under [`HOLD_IF_FASTER`]) and
//! finds another one waiting takes it before deciding on an interrupt, so a burst of cached
//! requests costs one interrupt per [`MAX_BATCH`] completions (or per burst) instead of one
//! each, and a slow request (O_DIRECT, a flush) is signalled as soon as it is done. The decision itself honours
//! EVENT_IDX (`used_event`) or, without it, the driver's VRING_AVAIL_F_NO_INTERRUPT flag.
//! A request counts as in flight from the moment the event loop hands it over until its
//! interrupt decision is made, so a reset that waits for "nothing in flight" knows no worker
//! will touch guest memory, the used ring or the interrupt of that activation again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferro_disk::{BlockBackend, IoVec};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::request::{execute, execute_run, Op, Outcome, Request, CHUNK, ID_BYTES};
use crate::chain::Segment;
use crate::{GuestMemory, Interrupt};

/// Completions a worker may hold back before it decides on an interrupt.
pub const MAX_BATCH: usize = 16;
/// A completion is held back only after a request that took less than this (page-cache
/// speed): holding back after a slow one would delay its interrupt by another slow one.
pub const HOLD_IF_FASTER: Duration = Duration::from_micros(50);
/// Stack of a worker thread (a bounce buffer, when a backend needs one, is on the heap).
const STACK: usize = 128 * 1024;
/// VRING_AVAIL_F_NO_INTERRUPT.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Everything the workers need about one activation of the device.
pub struct Ctx {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The request queue; the event loop pops from it, the workers complete into it.
    pub queue: Mutex<Queue>,
    /// The queue interrupt.
    pub interrupt: Arc<dyn Interrupt>,
    /// The disk.
    pub disk: Arc<dyn BlockBackend>,
    /// GET_ID's answer.
    pub id: [u8; ID_BYTES],
    /// Flush after every write (FLUSH not negotiated).
    pub writethrough: bool,
    /// EVENT_IDX negotiated.
    pub event_idx: bool,
    /// The used ring could not be written: the device must ask for a reset.
    pub broken: AtomicBool,
    inflight: Mutex<usize>,
    /// `inflight`, for the event loop to read without a lock (its polling hint).
    busy: Arc<AtomicUsize>,
    idle: Condvar,
}

impl Ctx {
    /// A context for one activation; `busy` mirrors its count of requests in flight.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mem: GuestMemory,
        queue: Queue,
        interrupt: Arc<dyn Interrupt>,
        disk: Arc<dyn BlockBackend>,
        id: [u8; ID_BYTES],
        writethrough: bool,
        event_idx: bool,
        busy: Arc<AtomicUsize>,
    ) -> Self {
        busy.store(0, Ordering::Relaxed);
        Self {
            mem,
            queue: Mutex::new(queue),
            interrupt,
            disk,
            id,
            writethrough,
            event_idx,
            broken: AtomicBool::new(false),
            inflight: Mutex::new(0),
            busy,
            idle: Condvar::new(),
        }
    }

    /// `n` more requests are in flight.
    pub fn begin(&self, n: usize) {
        let mut f = lock(&self.inflight);
        *f += n;
        self.busy.store(*f, Ordering::Relaxed);
    }

    /// Requests in flight now.
    pub fn inflight(&self) -> usize {
        *lock(&self.inflight)
    }

    /// Waits until no request is in flight.
    pub fn drain(&self) {
        let mut n = lock(&self.inflight);
        while *n > 0 {
            n = self
                .idle
                .wait_timeout(n, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Puts `head` with `len` written bytes in the used ring.
    pub fn complete(&self, q: &mut Queue, head: u16, len: u32) {
        if q.add_used(&self.mem, head, len).is_err() {
            self.broken.store(true, Ordering::Release);
        }
    }

    /// Decides on the queue interrupt for what was completed since the last decision, and
    /// ends `n` requests' time in flight.
    pub fn notify(&self, n: usize) {
        let signal = {
            let mut q = lock(&self.queue);
            if self.event_idx {
                q.needs_notification(&self.mem).unwrap_or(true)
            } else {
                let flags: u16 = self.mem.read_obj(GuestAddress(q.avail_ring())).unwrap_or(0);
                flags & AVAIL_F_NO_INTERRUPT == 0
            }
        };
        if signal {
            self.interrupt.signal_queue(0);
        }
        if n > 0 {
            let mut f = lock(&self.inflight);
            *f = f.saturating_sub(n);
            self.busy.store(*f, Ordering::Relaxed);
            if *f == 0 {
                self.idle.notify_all();
            }
        }
    }
}

/// Most bytes of one run of merged requests (one disk call). A quarter of a 16-deep queue of
/// 64 KiB requests: merging fewer, larger calls saves system calls and wake-ups, while keeping
/// a few calls in flight keeps the disk busy while the guest refills the ring (measured on the
/// 2-CPU PVM host with the probe's `blk=bench`: 256 KiB beat both no merging and 512 KiB).
pub const MERGE_MAX: u64 = 256 * 1024;
const _: () = assert!(MERGE_MAX <= CHUNK as u64);

/// One request: its head descriptor, buffers and what it asks.
pub struct Part {
    /// Head descriptor index.
    pub head: u16,
    /// Its buffers.
    pub segs: Vec<Segment>,
    /// What it asks.
    pub req: Request,
}

/// A parsed request on its way to a worker, with the requests merged into it: reads (or
/// writes) that continue it on the disk, done by the same disk call.
pub struct Job {
    /// The activation it belongs to.
    pub ctx: Arc<Ctx>,
    /// Head descriptor index.
    pub head: u16,
    /// Its buffers.
    pub segs: Vec<Segment>,
    /// What it asks.
    pub req: Request,
    /// Requests merged after it, in disk order.
    pub more: Vec<Part>,
}

impl Job {
    /// A job of one request.
    pub fn new(ctx: Arc<Ctx>, p: Part) -> Self {
        Self {
            ctx,
            head: p.head,
            segs: p.segs,
            req: p.req,
            more: Vec::new(),
        }
    }

    /// Requests in this job.
    pub fn requests(&self) -> usize {
        1 + self.more.len()
    }

    /// Takes `p` into this job when it is the same kind of transfer (read or write) and
    /// starts where the job ends on the disk, up to [`MERGE_MAX`] bytes; else gives it back.
    pub fn merge(&mut self, p: Part) -> Result<(), Part> {
        let last = self.more.last().map_or(&self.req, |m| &m.req);
        let bytes: u64 =
            u64::from(self.req.len) + self.more.iter().map(|m| u64::from(m.req.len)).sum::<u64>();
        let end = last
            .sector
            .saturating_add(u64::from(last.len) / super::request::SECTOR);
        if matches!(self.req.op, Op::Read | Op::Write)
            && p.req.op == self.req.op
            && p.req.sector == end
            && bytes + u64::from(p.req.len) <= MERGE_MAX
        {
            self.more.push(p);
            Ok(())
        } else {
            Err(p)
        }
    }
}

struct State {
    jobs: VecDeque<Job>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
}

/// The worker threads of one disk.
pub struct Pool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `n` workers named `name-ioK`. They inherit the calling thread's signal mask.
    pub fn start(n: usize, name: &str) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                stop: false,
            }),
            ready: Condvar::new(),
        });
        let mut pool = Self {
            shared,
            threads: Vec::new(),
        };
        for k in 0..n {
            let s = pool.shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("{name}-io{k}"))
                .stack_size(STACK)
                .spawn(move || work(&s))?;
            pool.threads.push(t);
        }
        Ok(pool)
    }

    /// Hands `jobs` to the workers.
    pub fn submit(&self, jobs: impl Iterator<Item = Job>) {
        let mut st = lock(&self.shared.state);
        let before = st.jobs.len();
        st.jobs.extend(jobs);
        let added = st.jobs.len() - before;
        drop(st);
        // One wake-up per job: waking every idle worker for two jobs costs more than it helps.
        for _ in 0..added.min(self.threads.len()) {
            self.shared.ready.notify_one();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The next job: without waiting when `wait` is false.
fn next(s: &Shared, wait: bool) -> Option<Job> {
    let mut st = lock(&s.state);
    loop {
        if let Some(j) = st.jobs.pop_front() {
            return Some(j);
        }
        if st.stop || !wait {
            return None;
        }
        st = s.ready.wait(st).unwrap_or_else(|e| e.into_inner());
    }
}

fn work(s: &Shared) {
    let mut iov: Vec<IoVec> = Vec::with_capacity(64);
    let mut outs: Vec<Outcome> = Vec::new();
    // Completions whose interrupt decision is still to be made, and their activation.
    let mut held: Option<(Arc<Ctx>, usize)> = None;
    let mut last = Duration::ZERO;
    loop {
        let job = match next(s, false) {
            // Hold back only after a quick job, while the next is one of the same activation.
            Some(j)
                if held.as_ref().is_none_or(|(c, n)| {
                    Arc::ptr_eq(c, &j.ctx)
                        && *n < MAX_BATCH
                        && last < HOLD_IF_FASTER
                        && j.req.op != Op::Flush
                }) =>
            {
                j
            }
            other => {
                if let Some((c, n)) = held.take() {
                    c.notify(n);
                }
                match other {
                    Some(j) => j,
                    None => match next(s, true) {
                        Some(j) => j,
                        None => return,
                    },
                }
            }
        };
        let t = Instant::now();
        let c = &job.ctx;
        if job.more.is_empty() {
            let out = execute(
                &c.mem,
                &job.segs,
                &job.req,
                c.disk.as_ref(),
                &c.id,
                c.writethrough,
                &mut iov,
            );
            last = t.elapsed();
            let mut q = lock(&c.queue);
            c.complete(&mut q, job.head, out.written);
        } else {
            let mut parts = Vec::with_capacity(job.requests());
            parts.push((job.segs.as_slice(), &job.req));
            parts.extend(job.more.iter().map(|p| (p.segs.as_slice(), &p.req)));
            outs.clear();
            execute_run(
                &c.mem,
                &parts,
                c.disk.as_ref(),
                &c.id,
                c.writethrough,
                &mut iov,
                &mut outs,
            );
            last = t.elapsed();
            let mut q = lock(&c.queue);
            let heads = std::iter::once(job.head).chain(job.more.iter().map(|p| p.head));
            for (head, out) in heads.zip(&outs) {
                c.complete(&mut q, head, out.written);
            }
        }
        let k = job.requests();
        held = Some(match held {
            Some((c, n)) => (c, n + k),
            None => (job.ctx, k),
        });
    }
}
