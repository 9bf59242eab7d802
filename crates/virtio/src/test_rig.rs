//! A test driver for devices with several queues, used without the transport: rings at fixed
//! places in 4 MiB of guest memory, chains built from (address, length, writable) lists.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::chain::{DESC_F_NEXT, DESC_F_WRITE};
use crate::{GuestMemory, Interrupt};

/// Guest memory size.
pub const MEM: u64 = 0x40_0000;
/// Where buffers may go (below: rings).
pub const BUF: u64 = 0x10_0000;

/// Records the interrupts a device raises.
#[derive(Default)]
pub struct IrqLog(pub Mutex<Vec<String>>);

impl IrqLog {
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl Interrupt for IrqLog {
    fn signal_queue(&self, queue: u16) {
        self.0.lock().unwrap().push(format!("queue {queue}"));
    }
    fn signal_config(&self) {
        self.0.lock().unwrap().push("config".into());
    }
}

pub struct Vq {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    pub avail_idx: u16,
    pub next_desc: u16,
}

pub struct Rig {
    pub mem: GuestMemory,
    pub qs: Vec<Vq>,
    pub irq: Arc<IrqLog>,
}

impl Rig {
    /// `n` queues of `size` entries each.
    pub fn new(n: usize, size: u16) -> Self {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        let qs = (0..n as u64)
            .map(|i| {
                let base = 0x1000 + i * 0x4000;
                Vq {
                    desc: base,
                    avail: base + 0x1000,
                    used: base + 0x2000,
                    size,
                    avail_idx: 0,
                    next_desc: 0,
                }
            })
            .collect();
        Self {
            mem,
            qs,
            irq: Arc::new(IrqLog::default()),
        }
    }

    /// The queues as the transport would hand them over.
    pub fn queues(&self, event_idx: bool) -> Vec<Queue> {
        self.qs
            .iter()
            .map(|v| {
                let mut q = Queue::new(256).unwrap();
                q.try_set_size(v.size).unwrap();
                q.try_set_desc_table_address(GuestAddress(v.desc)).unwrap();
                q.try_set_avail_ring_address(GuestAddress(v.avail)).unwrap();
                q.try_set_used_ring_address(GuestAddress(v.used)).unwrap();
                q.set_event_idx(event_idx);
                q.set_ready(true);
                q
            })
            .collect()
    }

    pub fn irq(&self) -> Arc<dyn Interrupt> {
        self.irq.clone()
    }

    /// Writes descriptor `i` of queue `q` raw.
    pub fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        crate::chain::tests::put(&self.mem, self.qs[q].desc, i, addr, len, flags, next);
    }

    /// Publishes `head` in queue `q`'s available ring.
    pub fn publish(&mut self, q: usize, head: u16) {
        let v = &mut self.qs[q];
        let slot = v.avail + 4 + u64::from(v.avail_idx % v.size) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        v.avail_idx = v.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(v.avail_idx, GuestAddress(v.avail + 2))
            .unwrap();
    }

    /// Sets queue `q`'s available index raw.
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        self.qs[q].avail_idx = idx;
        self.mem
            .write_obj(idx, GuestAddress(self.qs[q].avail + 2))
            .unwrap();
    }

    /// Builds a chain from `bufs` (address, length, writable) in the next free descriptors of
    /// queue `q`, publishes it and returns its head.
    pub fn post(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let size = self.qs[q].size;
        let head = self.qs[q].next_desc;
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % size;
            let last = k + 1 == bufs.len();
            let mut flags = if write { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            self.desc(q, i, addr, len, flags, (i + 1) % size);
        }
        self.qs[q].next_desc = (head + bufs.len() as u16) % size;
        self.publish(q, head);
        head
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.qs[q].used + 2))
            .unwrap()
    }

    /// (id, len) of used element `i` of queue `q`.
    pub fn used(&self, q: usize, i: u16) -> (u32, u32) {
        let v = &self.qs[q];
        let at = v.used + 4 + u64::from(i % v.size) * 8;
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }
}

/// Whether `fd` is readable right now.
pub fn readable(fd: std::os::fd::RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, alive for the call; timeout 0.
    #[allow(unsafe_code)]
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1
}
