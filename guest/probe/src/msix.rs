//! MSI-X: the capability (id 0x11), its table in a memory BAR, and messages aimed at the BSP's
//! local APIC (physical destination, fixed delivery, edge). Runs at CPL3.

use crate::mmio;
use crate::pci::{Func, Pci};

/// An enabled MSI-X capability.
#[derive(Clone, Copy, Default)]
pub struct Msix {
    /// Address of the vector table.
    pub table: u64,
    /// Table entries.
    pub size: u16,
}

/// Message address for LAPIC `dest` (xAPIC physical destination mode).
pub fn address(dest: u32) -> u32 {
    0xfee0_0000 | ((dest & 0xff) << 12)
}

impl Msix {
    /// Finds the capability of `f`, points every table entry at `vector` on APIC `dest`
    /// (unmasked), and enables MSI-X with the function mask clear. None without a capability or
    /// with a table outside the function's BARs.
    pub fn enable(pci: &Pci, f: &Func, dest: u32, vector: u8) -> Option<Msix> {
        let cap = pci.caps(f.dev, f.func, 0x11).next()?;
        let ctl = pci.r16(f.dev, f.func, cap + 2);
        let size = (ctl & 0x7ff) + 1;
        let tbl = pci.r32(f.dev, f.func, cap + 4);
        let bar = f.bars[(tbl & 7) as usize % 6];
        let off = (tbl & !7) as u64;
        if bar.size == 0 || off + size as u64 * 16 > bar.size {
            return None;
        }
        let m = Msix {
            table: bar.addr + off,
            size,
        };
        // Function mask on while the table is written, then enable and unmask.
        pci.w16(f.dev, f.func, cap + 2, (ctl & !0x8000) | 0x4000);
        for i in 0..size {
            m.set(i, dest, vector);
        }
        pci.w16(f.dev, f.func, cap + 2, (ctl & !0x4000) | 0x8000);
        Some(m)
    }

    /// Programs entry `i`: message address/data for `vector` on APIC `dest`, unmasked.
    pub fn set(&self, i: u16, dest: u32, vector: u8) {
        if i >= self.size {
            return;
        }
        let e = self.table + i as u64 * 16;
        mmio::w32(e + 12, 1);
        mmio::w32(e, address(dest));
        mmio::w32(e + 4, 0);
        mmio::w32(e + 8, vector as u32);
        mmio::w32(e + 12, 0);
    }
}
