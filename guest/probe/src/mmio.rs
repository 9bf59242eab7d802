//! Volatile, naturally aligned accesses to device registers (PCI ECAM, BARs) and to memory
//! shared with devices (virtqueues). Usable at CPL0 and CPL3 alike: the identity map is user
//! accessible. Each access checks that the address is mapped and aligned and is skipped (reads
//! give all ones, as a missing device would) when it is not, so a bad BAR cannot fault.

use crate::phys;

#[inline(always)]
fn valid(addr: u64, width: u64) -> bool {
    addr & (width - 1) == 0 && phys::ok(addr, width)
}

macro_rules! accessors {
    ($r:ident, $w:ident, $t:ty) => {
        /// Volatile read (all ones when unmapped or misaligned).
        #[inline(always)]
        #[allow(dead_code)]
        pub fn $r(addr: u64) -> $t {
            if !valid(addr, core::mem::size_of::<$t>() as u64) {
                return <$t>::MAX;
            }
            // SAFETY: the address is inside the identity map and naturally aligned (checked
            // above); it is a device register or DMA memory the probe owns, which no Rust
            // reference aliases, and every bit pattern is a valid integer.
            unsafe { (addr as *const $t).read_volatile() }
        }

        /// Volatile write (dropped when unmapped or misaligned).
        #[inline(always)]
        pub fn $w(addr: u64, v: $t) {
            if !valid(addr, core::mem::size_of::<$t>() as u64) {
                return;
            }
            // SAFETY: mapped and aligned (checked above); callers only write device registers
            // of functions they drive and DMA memory they allocated, never memory that a Rust
            // reference covers.
            unsafe { (addr as *mut $t).write_volatile(v) }
        }
    };
}

accessors!(r8, w8, u8);
accessors!(r16, w16, u16);
accessors!(r32, w32, u32);
accessors!(r64, w64, u64);
