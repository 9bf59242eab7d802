//! Split virtqueues: descriptor table, available ring and used ring in DMA memory the driver
//! owns, with a free list of descriptors chained through `next`.

use crate::dma::Dma;
use crate::mmio::{r16, r32, w16, w32, w64};
use core::sync::atomic::{compiler_fence, fence, AtomicU64, Ordering};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// Used ring flag: no need to notify.
const USED_NO_NOTIFY: u16 = 1;
/// Available ring flag: no need to interrupt (VIRTQ_AVAIL_F_NO_INTERRUPT).
const AVAIL_NO_INTERRUPT: u16 = 1;

/// A buffer of a descriptor chain: address, length, device-writable.
#[derive(Clone, Copy)]
pub struct Buf {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it.
    pub write: bool,
}

/// Readable buffer.
pub fn rd(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: false,
    }
}

/// Device-writable buffer.
pub fn wr(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: true,
    }
}

/// Kicks written (all queues), the time the vCPU spent in their notify writes (on PVM each is
/// a trapped MMIO write), and kicks left out because the device asked for none.
pub static KICKS: AtomicU64 = AtomicU64::new(0);
/// See [`KICKS`].
pub static KICK_NS: AtomicU64 = AtomicU64::new(0);
/// See [`KICKS`].
pub static KICKS_SKIPPED: AtomicU64 = AtomicU64::new(0);

/// One split virtqueue.
pub struct Queue {
    /// Queue index.
    pub idx: u16,
    /// Number of descriptors (a power of two).
    pub size: u16,
    /// Descriptor table, available ring, used ring.
    pub desc: u64,
    /// Available (driver) ring.
    pub avail: u64,
    /// Used (device) ring.
    pub used: u64,
    /// Notification register.
    pub notify: u64,
    free_head: u16,
    /// Free descriptors.
    pub num_free: u16,
    avail_idx: u16,
    last_used: u16,
    pending: bool,
}

impl Queue {
    /// Allocates the rings for `size` descriptors (a power of two) and links the free list.
    pub fn alloc(dma: &mut Dma, idx: u16, size: u16) -> Option<Queue> {
        let n = size as u64;
        let desc = dma.alloc(16 * n, 4096)?;
        let avail = dma.alloc(6 + 2 * n, 64)?;
        let used = dma.alloc(6 + 8 * n, 64)?;
        for i in 0..size {
            w16(desc + 16 * i as u64 + 14, i.wrapping_add(1));
        }
        Some(Queue {
            idx,
            size,
            desc,
            avail,
            used,
            notify: 0,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            last_used: 0,
            pending: false,
        })
    }

    /// The descriptor the next `push` starts its chain with (None when none is free). Drivers
    /// that use one-descriptor chains tie a buffer to each descriptor index with it.
    pub fn next_head(&self) -> Option<u16> {
        (self.num_free > 0).then_some(self.free_head)
    }

    /// Puts a chain on the available ring (not yet notified: see `kick`). Returns its head
    /// descriptor (the token `pop` gives back), or None when too few descriptors are free.
    pub fn push(&mut self, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.num_free as usize {
            return None;
        }
        let head = self.free_head;
        let mut d = head;
        for (i, b) in bufs.iter().enumerate() {
            let a = self.desc + 16 * d as u64;
            let last = i + 1 == bufs.len();
            let next = r16(a + 14);
            w64(a, b.addr);
            w32(a + 8, b.len);
            w16(
                a + 12,
                if last { 0 } else { F_NEXT } | if b.write { F_WRITE } else { 0 },
            );
            if last {
                self.free_head = next;
            } else {
                d = next;
            }
        }
        self.num_free -= bufs.len() as u16;
        let slot = self.avail_idx % self.size;
        w16(self.avail + 4 + 2 * slot as u64, head);
        // The ring entry (and the descriptors) before the index that publishes them; volatile
        // stores stay in program order and x86 keeps stores ordered.
        compiler_fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        w16(self.avail + 2, self.avail_idx);
        self.pending = true;
        Some(head)
    }

    /// Notifies the device of new buffers, unless it said it does not need it.
    pub fn kick(&mut self) {
        if !self.pending {
            return;
        }
        self.pending = false;
        // The index store must be visible before the used ring's flags are read.
        fence(Ordering::SeqCst);
        if r16(self.used) & USED_NO_NOTIFY == 0 {
            let t0 = crate::kvmclock::now_ns();
            w16(self.notify, self.idx);
            KICK_NS.fetch_add(crate::kvmclock::now_ns() - t0, Ordering::Relaxed);
            KICKS.fetch_add(1, Ordering::Relaxed);
        } else {
            KICKS_SKIPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Asks the device not to interrupt for used chains (`quiet`) or to interrupt again. A
    /// polling driver sets it while it spins on the used ring, as Linux's virtio-blk poll
    /// queues do: an interrupt the spinning CPU does not need still costs it an exit.
    pub fn quiet(&self, quiet: bool) {
        w16(self.avail, if quiet { AVAIL_NO_INTERRUPT } else { 0 });
        // The flag must be visible before the used index is read again.
        fence(Ordering::SeqCst);
    }

    /// Whether the device returned a chain not yet popped.
    pub fn has_used(&self) -> bool {
        r16(self.used + 2) != self.last_used
    }

    /// Takes the next used chain: (head token, bytes the device wrote); frees its descriptors.
    pub fn pop(&mut self) -> Option<(u16, u32)> {
        if !self.has_used() {
            return None;
        }
        compiler_fence(Ordering::Acquire);
        let e = self.used + 4 + 8 * (self.last_used % self.size) as u64;
        let (id, len) = (r32(e) as u16 % self.size, r32(e + 4));
        self.last_used = self.last_used.wrapping_add(1);
        let mut d = id;
        let mut n = 1u16;
        while r16(self.desc + 16 * d as u64 + 12) & F_NEXT != 0 && n < self.size {
            d = r16(self.desc + 16 * d as u64 + 14) % self.size;
            n += 1;
        }
        w16(self.desc + 16 * d as u64 + 14, self.free_head);
        self.free_head = id;
        self.num_free += n;
        Some((id, len))
    }
}
