//! Memory shared with devices: a bump allocator over free RAM above the probe image. Used at
//! CPL3 (zeroing a buffer there runs natively even where CPL0 is emulated).

/// A range of free RAM handed out front to back; nothing is ever freed.
#[derive(Clone, Copy)]
pub struct Dma {
    /// Next free byte.
    pub next: u64,
    /// End (exclusive).
    pub end: u64,
}

impl Dma {
    /// `size` zeroed bytes aligned to `align` (a power of two), or None when the range is spent.
    pub fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let a = self.next.checked_next_multiple_of(align)?;
        let e = a.checked_add(size)?;
        if e > self.end || !crate::phys::ok(a, size) {
            return None;
        }
        self.next = e;
        // SAFETY: [a, e) lies inside the free RAM range this allocator was given (checked above
        // to be identity mapped); it was never handed out before, so nothing else refers to it.
        unsafe { core::ptr::write_bytes(a as *mut u8, 0, size as usize) };
        Some(a)
    }
}

/// A byte slice view of DMA memory the caller allocated.
pub fn slice(addr: u64, len: usize) -> &'static mut [u8] {
    if len == 0 || !crate::phys::ok(addr, len as u64) {
        return &mut [];
    }
    // SAFETY: callers pass buffers they allocated from `Dma` (mapped RAM, checked above) and
    // hold no other reference to them while the slice lives; devices write such buffers only
    // while the driver has them queued, and drivers look at them after the device returned them.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) }
}
