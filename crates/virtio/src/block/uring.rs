//! io_uring for virtio-blk's reads and writes of a plain file, on the event loop itself (QEMU's
//! `aio=io_uring` scheme): a kick's requests become submission entries straight between the
//! image and guest memory, each submitted as it is queued (below); the ring's descriptor is the
//! device's host fd ([`crate::VirtioDevice::host_fd`]), so when requests finish the event loop
//! reaps the completions, completes them into the used ring and decides on one interrupt per
//! reaped group (the device reaps a few at a time and takes new requests in between:
//! `REAP_STEP` in the module above).
//!
//! Against the worker pool this saves, per request, a futex wake-up of a worker, a context
//! switch into it and out of it, and most interrupts: on the 2-CPU PVM host, 50000 4 KiB
//! random reads at queue depth 16 sent 49956 MSIs (each one a vCPU exit, dear on PVM) and took
//! 121k context switches through the workers, about 4700 MSIs and 19k switches here; the
//! probe's random reads went from ~31k to ~42-45k IOPS (medians of 12 alternating runs, host
//! load 4-5 on 2 CPUs). The event loop both submits and reaps because io_uring finishes a
//! request in its submitter's context: a separate reaping thread cost a wake-up of the event
//! loop and one of the reaper per completion, and was slower.
//!
//! Each entry is submitted the moment it is queued, one `io_uring_enter` per request, not
//! one for the whole kick: io_uring plugs a submission of more than two entries, so the
//! host's disk saw none of a batch of 16 until the last was prepared (~11 µs later on the PVM
//! host), and its backend (the outer hypervisor's virtio disk, which works through a batch
//! in order and completes it at once) started late on every batch. Traced with block and
//! io_uring tracepoints, a batch's cycle was the disk's ~155 µs plus ~35 µs from its last
//! completion to the next issue; fio, which submits one at a time, had a shorter disk part.
//! Unplugged, 4 KiB random reads at queue depth 16 went from a median of ~84k to ~95k IOPS
//! (5 alternating runs, quiet host).
//!
//! Writes of a plain file go through the ring too (write-through ones excepted: they need a
//! flush after each write, which the workers do). Unplugged, 448 MiB of sequential 64 KiB
//! writes (merged into 256 KiB runs) rose from a median of ~2450 to ~3050 MB/s against the
//! workers (6 alternating runs, quiet host); with the batch plugged they had been no faster
//! than the workers. A write's completion is reported to the disk ([`ferro_disk::BlockBackend::wrote`])
//! before the guest sees it, so a disk that logs writes for storage migration misses none.
//! Flushes, discard, write-zeroes, qcow2 and buffers O_DIRECT cannot take go to the workers.
//!
//! Lifetimes: an in-flight entry owns its [`Job`] (and through it the activation's guest
//! memory and the disk, which owns the descriptor) and the iovec array the kernel reads, so
//! they outlive the operation; an entry is dropped only once its completion is reaped. Reset,
//! save and a device error first wait for every entry ([`Uring::wait_all`]); dropping the
//! ring with entries in flight would be wrong, so [`Drop`] waits too.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use ferro_disk::IoVec;
use io_uring::{opcode, types, IoUring};

use super::request::{execute_run, finish_run, run_iovecs, Op, Outcome};
use super::worker::{Ctx, Job};

/// Submission queue entries (the virtqueue's size: at most one entry per request).
const ENTRIES: u32 = super::QUEUE_SIZE as u32;
/// Most iovecs one entry carries (Linux's UIO_MAXIOV); longer runs go to the workers.
const IOV_MAX: usize = 1024;

/// One operation in the kernel's hands.
struct InFlight {
    job: Job,
    op: Op,
    offset: u64,
    len: u64,
    /// What the kernel reads the buffers from: it must not move or be freed until the
    /// completion is reaped (the Vec's heap block does not move when the entry does).
    _iov: Vec<libc::iovec>,
}

// SAFETY: the iovecs are addresses of guest memory, which any thread may reach (IoVec's
// contract); everything else in an entry is Send.
unsafe impl Send for InFlight {}

#[derive(Default)]
struct Slots {
    entries: Vec<Option<InFlight>>,
    free: Vec<usize>,
    used: usize,
}

impl Slots {
    fn insert(&mut self, f: InFlight) -> usize {
        self.used += 1;
        match self.free.pop() {
            Some(i) => {
                self.entries[i] = Some(f);
                i
            }
            None => {
                self.entries.push(Some(f));
                self.entries.len() - 1
            }
        }
    }

    fn take(&mut self, i: usize) -> Option<InFlight> {
        let f = self.entries.get_mut(i)?.take()?;
        self.free.push(i);
        self.used -= 1;
        Some(f)
    }
}

/// One disk's ring, driven from the event loop.
pub struct Uring {
    ring: IoUring,
    slots: Slots,
    /// Entries pushed since the last submit.
    queued: usize,
    /// Reused: guest memory of a run, completions of a reap, fallback scratch.
    iov: Vec<IoVec>,
    done: Vec<(u64, i32)>,
    outs: Vec<Outcome>,
    scratch: Vec<IoVec>,
    batch: Vec<(Arc<Ctx>, usize)>,
}

impl Uring {
    /// A ring; an error when the host has no io_uring (the workers then do everything).
    pub fn new() -> io::Result<Self> {
        // COOP_TASKRUN: a finished request does not interrupt the event loop while it runs;
        // it is posted at its next system call, and wakes it when it sleeps in epoll.
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(ENTRIES)
            .or_else(|_| IoUring::new(ENTRIES))?;
        Ok(Self {
            ring,
            slots: Slots::default(),
            queued: 0,
            iov: Vec::with_capacity(64),
            done: Vec::with_capacity(2 * ENTRIES as usize),
            outs: Vec::new(),
            scratch: Vec::new(),
            batch: Vec::new(),
        })
    }

    /// The ring's descriptor: readable when completions wait to be reaped.
    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Operations in the kernel's hands.
    pub fn in_flight(&self) -> usize {
        self.slots.used
    }

    /// Submits `job` when it is a read or a write (one request or a merged run) that the disk
    /// can do with one vectored call on a plain file descriptor; else gives it back for the
    /// workers (see the module text for why).
    pub fn push(&mut self, job: Job) -> Result<(), Job> {
        let c = job.ctx.clone();
        match job.req.op {
            Op::Read => {}
            Op::Write if !c.writethrough => {}
            _ => return Err(job),
        }
        let mut parts = Vec::with_capacity(job.requests());
        parts.push((job.segs.as_slice(), &job.req));
        parts.extend(job.more.iter().map(|p| (p.segs.as_slice(), &p.req)));
        let Some((op, offset, len)) = run_iovecs(&c.mem, &parts, &mut self.iov) else {
            return Err(job);
        };
        drop(parts);
        if self.iov.len() > IOV_MAX {
            return Err(job);
        }
        let Some(fd) = c.disk.vectored_fd(&self.iov, offset, op == Op::Write) else {
            return Err(job);
        };
        if self.ring.submission().is_full() {
            // Not expected: every entry is submitted as it is pushed.
            return Err(job);
        }
        let iov: Vec<libc::iovec> = self
            .iov
            .iter()
            .map(|v| libc::iovec {
                iov_base: v.addr() as *mut libc::c_void,
                iov_len: v.len(),
            })
            .collect();
        let (ptr, n) = (iov.as_ptr(), iov.len() as u32);
        let slot = self.slots.insert(InFlight {
            job,
            op,
            offset,
            len,
            _iov: iov,
        });
        let entry = if op == Op::Read {
            opcode::Readv::new(types::Fd(fd), ptr, n)
                .offset(offset)
                .build()
        } else {
            opcode::Writev::new(types::Fd(fd), ptr, n)
                .offset(offset)
                .build()
        }
        .user_data(slot as u64);
        // SAFETY: the entry's iovec array and the guest memory it points to live in the slot's
        // InFlight (its Job holds the activation's memory and the disk, which owns `fd`) until
        // its completion is reaped, and only then is the slot emptied; nothing drops the ring
        // with entries in flight (Drop waits). The queue is not full (checked above).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        debug_assert!(pushed.is_ok());
        self.queued += 1;
        // At once, unplugged: see the module text.
        self.submit();
        Ok(())
    }

    /// Hands every queued entry to the kernel.
    fn submit(&mut self) {
        while self.queued > 0 {
            match self.ring.submit() {
                Ok(_) => self.queued = 0,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) => {
                    // The kernel is short of resources or completions must be reaped first.
                    self.reap();
                    std::thread::yield_now();
                }
                Err(e) => {
                    // Not expected. The entries stay in the submission queue: the next submit
                    // (or a wait at reset) hands them over; a bad entry would have come back
                    // as a failed completion instead.
                    eprintln!("ferro-vmm: virtio-blk: io_uring submit: {e}");
                    self.queued = 0;
                    return;
                }
            }
        }
    }

    /// Finishes every completion the kernel has posted: status bytes, used ring, then one
    /// interrupt decision per activation for the whole batch.
    pub fn reap(&mut self) {
        self.reap_some(usize::MAX);
    }

    /// Like [`Uring::reap`], for at most `max` completions; returns how many it took.
    pub fn reap_some(&mut self, max: usize) -> usize {
        self.done.clear();
        self.done.extend(
            self.ring
                .completion()
                .take(max)
                .map(|e| (e.user_data(), e.result())),
        );
        for i in 0..self.done.len() {
            let (ud, res) = self.done[i];
            let Some(f) = self.slots.take(ud as usize) else {
                continue;
            };
            let c = f.job.ctx.clone();
            if f.op == Op::Write {
                // Whatever the result: the file may have changed.
                c.disk.wrote(f.offset, f.len);
            }
            let mut parts = Vec::with_capacity(f.job.requests());
            parts.push((f.job.segs.as_slice(), &f.job.req));
            parts.extend(f.job.more.iter().map(|p| (p.segs.as_slice(), &p.req)));
            self.outs.clear();
            if i64::from(res) == f.len as i64 {
                finish_run(&c.mem, &parts, f.op, true, &mut self.outs);
            } else {
                // Short (a file shorter than the disk) or refused (an alignment the kernel
                // did not take after all, an I/O error): the synchronous path zero-fills,
                // bounces, or reports the error.
                execute_run(
                    &c.mem,
                    &parts,
                    c.disk.as_ref(),
                    &c.id,
                    c.writethrough,
                    &mut self.scratch,
                    &mut self.outs,
                );
            }
            {
                let mut q = c.queue.lock().unwrap_or_else(|e| e.into_inner());
                let heads = std::iter::once(f.job.head).chain(f.job.more.iter().map(|p| p.head));
                for (head, out) in heads.zip(&self.outs) {
                    c.complete(&mut q, head, out.written);
                }
            }
            let k = f.job.requests();
            match self.batch.iter_mut().find(|(b, _)| Arc::ptr_eq(b, &c)) {
                Some((_, n)) => *n += k,
                None => self.batch.push((c, k)),
            }
        }
        for (c, n) in self.batch.drain(..) {
            c.notify(n);
        }
        self.done.len()
    }

    /// Waits up to `timeout` for at least one completion (and reaps what came).
    pub fn wait(&mut self, timeout: Duration) {
        if self.slots.used == 0 {
            return;
        }
        let ts = types::Timespec::new()
            .sec(timeout.as_secs())
            .nsec(timeout.subsec_nanos());
        let args = types::SubmitArgs::new().timespec(&ts);
        let _ = self.ring.submitter().submit_with_args(1, &args);
        self.reap();
    }

    /// Reaps until nothing is in the kernel's hands.
    pub fn wait_all(&mut self) {
        self.reap();
        while self.slots.used > 0 {
            self.wait(Duration::from_millis(100));
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.wait_all();
    }
}
