//! Walking a split-virtqueue descriptor chain with every check a hostile driver calls for.
//!
//! `virtio_queue::DescriptorChain` stops silently at the first bad descriptor, which a device
//! cannot tell from the end of the chain. [`walk_chain`] instead returns the whole chain as
//! validated [`Segment`]s or a [`ChainError`] naming what is wrong: a head or `next` index
//! outside the table, a table or buffer outside guest memory, a loop or a chain longer than the
//! table, more than 4 GiB in one chain, a readable buffer after a writable one, or an indirect
//! table that is not allowed, nested, chained or badly sized. The device then reports
//! DEVICE_NEEDS_RESET instead of guessing.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

use virtio_queue::desc::split::Descriptor;

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub const DESC_F_INDIRECT: u16 = 4;
/// Bytes per descriptor.
const DESC_SIZE: u64 = 16;
/// Most descriptors in an indirect table (the spec's limit on a queue size).
const MAX_INDIRECT: u64 = 32768;

/// One buffer of a chain, inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (else it reads it).
    pub write: bool,
}

/// What is wrong with a chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A head or `next` index at or past the table size.
    #[error("descriptor index {index} is outside a table of {size}")]
    IndexOutOfRange {
        /// The index.
        index: u16,
        /// Entries in the table.
        size: u64,
    },
    /// A descriptor could not be read: the table is outside guest memory.
    #[error("descriptor at {0:#x} is outside guest memory")]
    TableOutsideMemory(u64),
    /// A buffer is not entirely inside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    BufferOutsideMemory {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// More descriptors than the table holds: the chain loops.
    #[error("chain is longer than its table of {0} (a loop)")]
    TooLong(u64),
    /// The buffers add up to 4 GiB or more.
    #[error("chain carries more than 4 GiB")]
    TooManyBytes,
    /// A device-readable buffer follows a device-writable one.
    #[error("readable buffer after a writable one")]
    ReadAfterWrite,
    /// An indirect descriptor although INDIRECT_DESC was not negotiated.
    #[error("indirect descriptor without VIRTIO_F_INDIRECT_DESC")]
    IndirectNotNegotiated,
    /// An indirect descriptor inside an indirect table, or with NEXT set.
    #[error("indirect descriptor is nested or chained")]
    IndirectMisused,
    /// An indirect table whose length is 0, not a multiple of 16 or over 32768 entries.
    #[error("indirect table of {0} bytes")]
    IndirectBadLength(u32),
}

fn read_desc<M: GuestMemoryBackend>(
    mem: &M,
    table: GuestAddress,
    index: u16,
) -> Result<Descriptor, ChainError> {
    let addr = table
        .checked_add(u64::from(index) * DESC_SIZE)
        .ok_or(ChainError::TableOutsideMemory(table.raw_value()))?;
    mem.read_obj::<Descriptor>(addr)
        .map_err(|_| ChainError::TableOutsideMemory(addr.raw_value()))
}

/// Walks the chain starting at `head` in the descriptor table at `table` of a queue of
/// `queue_size` entries, and returns its buffers, every byte of which is guest memory (an
/// empty buffer has no bytes, so its address is not checked). `indirect` says whether
/// INDIRECT_DESC was negotiated.
pub fn walk_chain<M>(
    mem: &M,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
    indirect: bool,
) -> Result<Vec<Segment>, ChainError>
where
    M: GuestMemoryBackend + GuestMemory,
{
    let mut segs = Vec::new();
    let mut total: u64 = 0;
    let mut seen_write = false;
    let mut table = table;
    let mut size = u64::from(queue_size);
    let mut index = head;
    let mut count: u64 = 0;
    let mut in_indirect = false;
    loop {
        if u64::from(index) >= size {
            return Err(ChainError::IndexOutOfRange { index, size });
        }
        count += 1;
        if count > size {
            return Err(ChainError::TooLong(size));
        }
        let d = read_desc(mem, table, index)?;
        let flags = d.flags();
        if flags & DESC_F_INDIRECT != 0 {
            if !indirect {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if in_indirect || flags & DESC_F_NEXT != 0 {
                return Err(ChainError::IndirectMisused);
            }
            let len = d.len();
            let entries = u64::from(len) / DESC_SIZE;
            if len == 0 || u64::from(len) % DESC_SIZE != 0 || entries > MAX_INDIRECT {
                return Err(ChainError::IndirectBadLength(len));
            }
            if !GuestMemoryBackend::check_range(mem, d.addr(), len as usize) {
                return Err(ChainError::BufferOutsideMemory {
                    addr: d.addr().raw_value(),
                    len,
                });
            }
            in_indirect = true;
            table = d.addr();
            size = entries;
            index = 0;
            count = 0;
            continue;
        }
        let len = d.len();
        if !GuestMemoryBackend::check_range(mem, d.addr(), len as usize) {
            return Err(ChainError::BufferOutsideMemory {
                addr: d.addr().raw_value(),
                len,
            });
        }
        total += u64::from(len);
        if total > u64::from(u32::MAX) {
            return Err(ChainError::TooManyBytes);
        }
        let write = flags & DESC_F_WRITE != 0;
        if seen_write && !write {
            return Err(ChainError::ReadAfterWrite);
        }
        seen_write |= write;
        segs.push(Segment {
            addr: d.addr(),
            len,
            write,
        });
        if flags & DESC_F_NEXT == 0 {
            return Ok(segs);
        }
        index = d.next();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::GuestMemory;

    /// Writes descriptor `i` of the table at `table`.
    pub fn put(mem: &GuestMemory, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Descriptor::new(addr, len, flags, next);
        mem.write_obj(d, GuestAddress(table + u64::from(i) * 16))
            .unwrap();
    }

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    const T: u64 = 0x1000;

    #[test]
    fn good_chain() {
        let m = mem();
        put(&m, T, 0, 0x8000, 16, DESC_F_NEXT, 3);
        put(&m, T, 3, 0x9000, 32, DESC_F_WRITE | DESC_F_NEXT, 1);
        put(&m, T, 1, 0xa000, 8, DESC_F_WRITE, 0);
        let s = walk_chain(&m, GuestAddress(T), 4, 0, false).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[1],
            Segment {
                addr: GuestAddress(0x9000),
                len: 32,
                write: true
            }
        );
    }

    #[test]
    fn head_or_next_out_of_range() {
        let m = mem();
        assert_eq!(
            walk_chain(&m, GuestAddress(T), 4, 4, false),
            Err(ChainError::IndexOutOfRange { index: 4, size: 4 })
        );
        put(&m, T, 0, 0x8000, 16, DESC_F_NEXT, 9);
        assert_eq!(
            walk_chain(&m, GuestAddress(T), 4, 0, false),
            Err(ChainError::IndexOutOfRange { index: 9, size: 4 })
        );
    }

    #[test]
    fn loops_are_caught() {
        let m = mem();
        put(&m, T, 0, 0x8000, 16, DESC_F_NEXT, 1);
        put(&m, T, 1, 0x8000, 16, DESC_F_NEXT, 0);
        assert_eq!(
            walk_chain(&m, GuestAddress(T), 8, 0, false),
            Err(ChainError::TooLong(8))
        );
        put(&m, T, 2, 0x8000, 16, DESC_F_NEXT, 2);
        assert_eq!(
            walk_chain(&m, GuestAddress(T), 8, 2, false),
            Err(ChainError::TooLong(8))
        );
    }

    #[test]
    fn buffers_outside_memory() {
        let m = mem();
        put(&m, T, 0, 0xf_fff0, 0x20, DESC_F_WRITE, 0);
        assert!(matches!(
            walk_chain(&m, GuestAddress(T), 2, 0, false),
            Err(ChainError::BufferOutsideMemory { .. })
        ));
        put(&m, T, 0, u64::MAX - 4, 16, DESC_F_WRITE, 0);
        assert!(matches!(
            walk_chain(&m, GuestAddress(T), 2, 0, false),
            Err(ChainError::BufferOutsideMemory { .. })
        ));
        // The descriptor table itself outside memory.
        assert!(matches!(
            walk_chain(&m, GuestAddress(0x20_0000), 2, 0, false),
            Err(ChainError::TableOutsideMemory(_))
        ));
        assert!(matches!(
            walk_chain(&m, GuestAddress(u64::MAX - 8), 2, 1, false),
            Err(ChainError::TableOutsideMemory(_))
        ));
    }

    #[test]
    fn absurd_lengths() {
        let m = mem();
        put(&m, T, 0, 0x8000, u32::MAX, DESC_F_WRITE, 0);
        assert!(matches!(
            walk_chain(&m, GuestAddress(T), 2, 0, false),
            Err(ChainError::BufferOutsideMemory { .. })
        ));
        // Many in-memory buffers that add up past 4 GiB.
        let big = GuestMemory::from_ranges(&[(GuestAddress(0), 0x8000_0000)]).unwrap();
        for i in 0..3u16 {
            put(
                &big,
                T,
                i,
                0x10_0000,
                0x7000_0000,
                DESC_F_WRITE | DESC_F_NEXT,
                i + 1,
            );
        }
        put(&big, T, 3, 0x10_0000, 0x7000_0000, DESC_F_WRITE, 0);
        assert_eq!(
            walk_chain(&big, GuestAddress(T), 4, 0, false),
            Err(ChainError::TooManyBytes)
        );
    }

    #[test]
    fn read_after_write() {
        let m = mem();
        put(&m, T, 0, 0x8000, 16, DESC_F_WRITE | DESC_F_NEXT, 1);
        put(&m, T, 1, 0x9000, 16, 0, 0);
        assert_eq!(
            walk_chain(&m, GuestAddress(T), 2, 0, false),
            Err(ChainError::ReadAfterWrite)
        );
    }

    #[test]
    fn indirect_tables() {
        let m = mem();
        let it = 0x4000;
        put(&m, it, 0, 0x8000, 16, DESC_F_NEXT, 1);
        put(&m, it, 1, 0x9000, 64, DESC_F_WRITE, 0);
        put(&m, T, 0, it, 32, DESC_F_INDIRECT, 0);
        assert_eq!(
            walk_chain(&m, GuestAddress(T), 2, 0, false),
            Err(ChainError::IndirectNotNegotiated)
        );
        let s = walk_chain(&m, GuestAddress(T), 2, 0, true).unwrap();
        assert_eq!(s.len(), 2);
        // Nested.
        put(&m, it, 1, it, 32, DESC_F_INDIRECT, 0);
        assert_eq!(
            walk_chain(&m, GuestAddress(T), 2, 0, true),
            Err(ChainError::IndirectMisused)
        );
        // Chained.
        put(&m, T, 0, it, 32, DESC_F_INDIRECT | DESC_F_NEXT, 1);
        assert_eq!(
            walk_chain(&m, GuestAddress(T), 2, 0, true),
            Err(ChainError::IndirectMisused)
        );
        // Bad sizes.
        for len in [0, 17] {
            put(&m, T, 0, it, len, DESC_F_INDIRECT, 0);
            assert_eq!(
                walk_chain(&m, GuestAddress(T), 2, 0, true),
                Err(ChainError::IndirectBadLength(len))
            );
        }
        // A loop inside the indirect table.
        put(&m, it, 0, 0x8000, 16, DESC_F_NEXT, 1);
        put(&m, it, 1, 0x8000, 16, DESC_F_NEXT, 0);
        put(&m, T, 0, it, 32, DESC_F_INDIRECT, 0);
        assert_eq!(
            walk_chain(&m, GuestAddress(T), 2, 0, true),
            Err(ChainError::TooLong(2))
        );
        // Indirect table outside memory.
        put(&m, T, 0, 0xf_fff0, 32, DESC_F_INDIRECT, 0);
        assert!(matches!(
            walk_chain(&m, GuestAddress(T), 2, 0, true),
            Err(ChainError::BufferOutsideMemory { .. })
        ));
    }
}
