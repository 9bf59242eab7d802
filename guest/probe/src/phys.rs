//! Reads and writes of guest-physical memory through the identity map.
//!
//! Addresses come from the loader and the firmware tables, so they are checked against the part
//! of the address space that is mapped (a bad table must not take down the probe with a #PF).

use core::sync::atomic::{AtomicU64, Ordering};

/// End (exclusive) of the identity-mapped range; raised by `paging::map_high`.
static MAPPED_END: AtomicU64 = AtomicU64::new(1 << 32);

/// Records that `0..end` is identity mapped.
pub fn set_mapped_end(end: u64) {
    MAPPED_END.store(end, Ordering::Relaxed);
}

/// End (exclusive) of the identity-mapped range.
pub fn mapped_end() -> u64 {
    MAPPED_END.load(Ordering::Relaxed)
}

/// Whether `[addr, addr + len)` is mapped.
pub fn ok(addr: u64, len: u64) -> bool {
    addr.checked_add(len).is_some_and(|e| e <= mapped_end())
}

/// Reads a byte (0 when unmapped).
pub fn r8(addr: u64) -> u8 {
    if !ok(addr, 1) {
        return 0;
    }
    // SAFETY: `ok` checked the address is inside the identity map; any byte is a valid u8.
    unsafe { (addr as *const u8).read_volatile() }
}

/// Reads a little-endian u32 at any alignment (0 when unmapped).
pub fn r32(addr: u64) -> u32 {
    if !ok(addr, 4) {
        return 0;
    }
    // SAFETY: mapped (checked above); read_unaligned has no alignment requirement.
    unsafe { (addr as *const u32).read_unaligned() }
}

/// Reads a little-endian u64 at any alignment (0 when unmapped).
pub fn r64(addr: u64) -> u64 {
    if !ok(addr, 8) {
        return 0;
    }
    // SAFETY: mapped (checked above); read_unaligned has no alignment requirement.
    unsafe { (addr as *const u64).read_unaligned() }
}

/// A byte slice of physical memory, or an empty slice when the range is not mapped.
pub fn bytes(addr: u64, len: u64) -> &'static [u8] {
    if len == 0 || !ok(addr, len) {
        return &[];
    }
    // SAFETY: the range is inside the identity map; the probe never writes firmware tables,
    // start info or the command line, so the shared view stays valid for its lifetime.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) }
}

/// Volatile write of `width` bytes (1, 2, 4 or 8) to MMIO or RAM.
pub fn write(addr: u64, width: u8, val: u64) {
    if !ok(addr, width as u64) {
        return;
    }
    // SAFETY: the range is mapped; callers only write device registers named by the firmware
    // tables (FADT sleep/reset registers, the LAPIC) with the width the table gives.
    unsafe {
        match width {
            1 => (addr as *mut u8).write_volatile(val as u8),
            2 => (addr as *mut u16).write_volatile(val as u16),
            8 => (addr as *mut u64).write_volatile(val),
            _ => (addr as *mut u32).write_volatile(val as u32),
        }
    }
}
