//! Extends the boot identity map (0..4 GiB, 2 MiB pages, static) up to 64 GiB.

use crate::boot;
use crate::cpu::{cpuid, flush_tlb};
use crate::phys;

const GIB: u64 = 1 << 30;
/// Highest address the probe maps.
pub const MAP_LIMIT: u64 = 64 * GIB;

fn has_1g_pages() -> bool {
    let (max, ..) = cpuid(0x8000_0000, 0);
    max >= 0x8000_0001 && cpuid(0x8000_0001, 0).3 & (1 << 26) != 0
}

/// Fills the spare page directories for GiBs `4..n` with 2 MiB pages. Runs at CPL3 (the page
/// tables are in the user-accessible identity map) so that a host emulating CPL0 does not have
/// to execute thousands of stores; nothing points at these tables yet.
extern "sysv64" fn fill_pd_high(n: u64) -> u64 {
    let base = core::ptr::addr_of_mut!(boot::pd_high) as *mut u64;
    for g in 4..n {
        for j in 0..512u64 {
            // SAFETY: g - 4 < 60 and j < 512 stay inside `pd_high`; these tables are not yet
            // referenced by any paging structure, so writing them has no effect on translation.
            unsafe {
                base.add(((g - 4) * 512 + j) as usize)
                    .write_volatile((g * GIB + (j << 21)) | 0x87)
            };
        }
    }
    0
}

/// Maps `4 GiB..min(end, 64 GiB)` (rounded up to 1 GiB). 1 GiB pages when the CPU has them, else
/// 2 MiB pages from the static pool (filled at CPL3). Returns the new mapped end.
pub fn map_high(end: u64) -> u64 {
    let one_g = has_1g_pages();
    let top = if one_g { MAP_LIMIT } else { end.min(MAP_LIMIT) };
    let n = top.div_ceil(GIB);
    if n <= 4 {
        return phys::mapped_end();
    }
    if !one_g && crate::trap::user_call(fill_pd_high, n).is_err() {
        return phys::mapped_end();
    }
    let pdpt = core::ptr::addr_of_mut!(boot::pdpt) as *mut u64;
    let pd = core::ptr::addr_of!(boot::pd_high) as u64;
    for g in 4..n {
        let e = if one_g {
            (g * GIB) | 0x87
        } else {
            (pd + (g - 4) * 4096) | 0x7
        };
        // SAFETY: g < 64 indexes inside the 512-entry PDPT; entries 4.. were not present, so
        // filling them only adds identity mappings of addresses nothing uses yet.
        unsafe { pdpt.add(g as usize).write_volatile(e) };
    }
    flush_tlb();
    phys::set_mapped_end(n * GIB);
    n * GIB
}
