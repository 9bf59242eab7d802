//! Queue helpers shared by the devices: take the next chain with every check
//! ([`pop_chain`]), copy between a chain's buffers and host memory, return a chain, and
//! interrupt the driver when the ring's suppression rules allow it.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::chain::{walk_chain, Segment};
use crate::{DeviceError, GuestMemory, Interrupt};

/// A ring-level error on queue `queue`.
pub(crate) fn ring_err(queue: u16, what: impl ToString) -> DeviceError {
    DeviceError::Ring {
        queue,
        what: what.to_string(),
    }
}

/// A popped chain: its head index and its checked buffers.
pub(crate) struct Chain {
    pub head: u16,
    pub segs: Vec<Segment>,
}

impl Chain {
    /// Bytes the device may write.
    pub fn writable(&self) -> usize {
        self.segs
            .iter()
            .filter(|s| s.write)
            .map(|s| s.len as usize)
            .sum()
    }

    /// Bytes the device may read.
    pub fn readable(&self) -> usize {
        self.segs
            .iter()
            .filter(|s| !s.write)
            .map(|s| s.len as usize)
            .sum()
    }
}

/// Whether the driver has published chains the device has not taken yet. A driver that
/// publishes more than a ring's worth is broken.
pub(crate) fn has_avail(q: &Queue, mem: &GuestMemory, queue: u16) -> Result<bool, DeviceError> {
    let avail = q
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|e| ring_err(queue, e))?;
    let pending = avail.0.wrapping_sub(q.next_avail());
    if pending > q.size() {
        return Err(ring_err(
            queue,
            format!(
                "available index runs {pending} entries ahead of a ring of {}",
                q.size()
            ),
        ));
    }
    Ok(pending != 0)
}

/// Takes the next available chain and walks it; `None` when the ring is empty.
pub(crate) fn pop_chain(
    q: &mut Queue,
    mem: &GuestMemory,
    queue: u16,
    indirect: bool,
) -> Result<Option<Chain>, DeviceError> {
    if !has_avail(q, mem, queue)? {
        return Ok(None);
    }
    let Some(chain) = q.pop_descriptor_chain(mem) else {
        return Err(ring_err(queue, "available ring is outside guest memory"));
    };
    let head = chain.head_index();
    let segs = walk_chain(mem, GuestAddress(q.desc_table()), q.size(), head, indirect)
        .map_err(|source| DeviceError::Chain { queue, source })?;
    Ok(Some(Chain { head, segs }))
}

/// Like [`pop_chain`], but when the ring is empty it re-enables notifications first (with
/// EVENT_IDX that publishes `avail_event`, without which the driver stops kicking) and looks
/// once more, so a chain published meanwhile is not missed.
pub(crate) fn next_chain(
    q: &mut Queue,
    mem: &GuestMemory,
    queue: u16,
    indirect: bool,
) -> Result<Option<Chain>, DeviceError> {
    for _ in 0..2 {
        if let Some(c) = pop_chain(q, mem, queue, indirect)? {
            return Ok(Some(c));
        }
        if !q.enable_notification(mem).map_err(|e| ring_err(queue, e))? {
            break;
        }
    }
    Ok(None)
}

/// Writes `data` into the chain's writable buffers starting `offset` bytes into them; returns
/// how many bytes fitted.
pub(crate) fn write_to(
    mem: &GuestMemory,
    segs: &[Segment],
    mut offset: usize,
    data: &[u8],
    queue: u16,
) -> Result<usize, DeviceError> {
    let mut done = 0;
    for s in segs.iter().filter(|s| s.write) {
        if done == data.len() {
            break;
        }
        let len = s.len as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(data.len() - done);
        // walk_chain checked that the whole buffer is guest memory.
        mem.write_slice(
            &data[done..done + n],
            GuestAddress(s.addr.0 + offset as u64),
        )
        .map_err(|e| ring_err(queue, e))?;
        done += n;
        offset = 0;
    }
    Ok(done)
}

/// Appends the chain's readable buffers to `out`, at most `max` bytes in all; returns false
/// (with `out` holding the first `max` bytes) when they hold more.
pub(crate) fn read_from(
    mem: &GuestMemory,
    segs: &[Segment],
    out: &mut Vec<u8>,
    max: usize,
    queue: u16,
) -> Result<bool, DeviceError> {
    for s in segs.iter().filter(|s| !s.write) {
        let room = max.saturating_sub(out.len());
        let n = (s.len as usize).min(room);
        let at = out.len();
        out.resize(at + n, 0);
        mem.read_slice(&mut out[at..], s.addr)
            .map_err(|e| ring_err(queue, e))?;
        if n < s.len as usize {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Returns chain `head` to the driver with `len` bytes written.
pub(crate) fn add_used(
    q: &mut Queue,
    mem: &GuestMemory,
    queue: u16,
    head: u16,
    len: u32,
) -> Result<(), DeviceError> {
    std::sync::atomic::fence(Ordering::Release);
    q.add_used(mem, head, len).map_err(|e| ring_err(queue, e))
}

/// Interrupts the driver for queue `queue` unless it asked not to be (flags or used_event).
pub(crate) fn notify(
    q: &mut Queue,
    mem: &GuestMemory,
    irq: &dyn Interrupt,
    queue: u16,
) -> Result<(), DeviceError> {
    if q.needs_notification(mem).map_err(|e| ring_err(queue, e))? {
        irq.signal_queue(queue);
    }
    Ok(())
}
