//! Fuzz bodies for the guest-facing parsers of this crate, shared by the `cargo fuzz` targets in
//! `fuzz/` and by plain tests that run them over a few thousand inputs from a fixed seed (so
//! they run on stable Rust in every `cargo test`).
//!
//! Both bodies lay the input out in a small guest memory as a driver would lay out rings and
//! descriptor tables, run the code under test, and check that it answered without panicking
//! and that whatever it accepted is sane.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::chain::{walk_chain, ChainError};
use crate::{GuestMemory, Interrupt, VirtioDevice};

/// Guest memory of the fuzz bodies.
const MEM: u64 = 0x1_0000;
/// Where the input's bytes go: descriptor tables, rings and buffers all live in them.
const INPUT_AT: u64 = 0x1000;

fn memory(data: &[u8]) -> GuestMemory {
    let mem =
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("fuzz guest memory");
    let n = data.len().min((MEM - INPUT_AT) as usize);
    mem.write_slice(&data[..n], GuestAddress(INPUT_AT))
        .expect("input fits");
    mem
}

fn u16_at(data: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([
        data.get(i).copied().unwrap_or(0),
        data.get(i + 1).copied().unwrap_or(0),
    ])
}

/// Walks one chain laid out by `data`: byte 0 picks the queue size (a power of two up to
/// 256), bytes 1-2 the head, byte 3 whether indirect tables are allowed, bytes 4-5 where the
/// table starts (inside or just outside memory); all of `data` is guest memory from 0x1000.
pub fn chain_walk(data: &[u8]) {
    let size = 1u16 << (data.first().copied().unwrap_or(0) % 9);
    let head = u16_at(data, 1);
    let indirect = data.get(3).is_some_and(|b| b & 1 != 0);
    let table = u64::from(u16_at(data, 4)) * 16;
    let mem = memory(data);
    match walk_chain(&mem, GuestAddress(table), size, head, indirect) {
        Ok(segs) => {
            assert!(!segs.is_empty());
            let mut total = 0u64;
            let mut seen_write = false;
            for s in &segs {
                // Every byte is guest memory (an empty buffer has none to check).
                let end = s.addr.0.checked_add(u64::from(s.len));
                assert!(s.len == 0 || end.is_some_and(|e| e <= MEM));
                assert!(!seen_write || s.write, "reads after writes are refused");
                seen_write |= s.write;
                total += u64::from(s.len);
            }
            assert!(total <= u64::from(u32::MAX));
            // A direct chain has at most `size` buffers; an indirect table at most 32768.
            assert!(segs.len() <= usize::from(size) + 32768);
        }
        Err(
            ChainError::IndexOutOfRange { .. }
            | ChainError::TableOutsideMemory(_)
            | ChainError::BufferOutsideMemory { .. }
            | ChainError::TooLong(_)
            | ChainError::TooManyBytes
            | ChainError::ReadAfterWrite
            | ChainError::IndirectNotNegotiated
            | ChainError::IndirectMisused
            | ChainError::IndirectBadLength(_),
        ) => {}
    }
}

struct NoInterrupt;

impl Interrupt for NoInterrupt {
    fn signal_queue(&self, _: u16) {}
    fn signal_config(&self) {}
}

/// Runs virtio-rng's queue processing over rings laid out by `data`: a queue of 16 with its
/// descriptor table at 0x1000, available ring at 0x1100 and used ring at 0x1200, all filled
/// from the input (so heads, indexes, flags and addresses are the fuzzer's); byte 0 bit 0 turns
/// EVENT_IDX on. The device may refuse the rings, but must not panic or hang.
pub fn rng_queue(data: &[u8]) {
    let mem = memory(data);
    let Ok(mut q) = Queue::new(16) else { return };
    let ok = q.try_set_desc_table_address(GuestAddress(0x1000)).is_ok()
        && q.try_set_avail_ring_address(GuestAddress(0x1100)).is_ok()
        && q.try_set_used_ring_address(GuestAddress(0x1200)).is_ok();
    if !ok {
        return;
    }
    q.set_event_idx(data.first().is_some_and(|b| b & 1 != 0));
    q.set_ready(true);
    let mut rng = crate::rng::Rng::new();
    if rng.activate(mem, vec![q], Arc::new(NoInterrupt)).is_err() {
        return;
    }
    // Twice: the second pass starts from wherever the first one left the queue.
    for _ in 0..2 {
        if rng.queue_notified(0).is_err() {
            return;
        }
    }
}

/// A small xorshift generator for the seeded runs (no dependency, same inputs every run).
pub struct XorShift(pub u64);

impl XorShift {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// An input of up to `max` bytes, biased towards the small values rings are made of.
    pub fn input(&mut self, max: usize) -> Vec<u8> {
        let len = (self.next_u64() % max as u64) as usize;
        (0..len)
            .map(|_| {
                let r = self.next_u64();
                match r % 4 {
                    0 => 0,
                    1 => (r >> 8) as u8 & 0x1f,
                    _ => (r >> 8) as u8,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_walk_over_seeded_inputs() {
        let mut r = XorShift(0x5eed_1234_abcd_0001);
        for _ in 0..5000 {
            chain_walk(&r.input(512));
        }
    }

    #[test]
    fn rng_queue_over_seeded_inputs() {
        let mut r = XorShift(0x5eed_1234_abcd_0002);
        for _ in 0..3000 {
            rng_queue(&r.input(1024));
        }
    }
}
