//! A vCPU's architectural state at kernel entry: the boot GDT, identity page tables for the
//! 64-bit Linux entry, special and general registers, MSRs, the FPU and the local APIC's LINT pins.
//!
//! Two entries exist. PVH: 32-bit protected mode, paging off, `EBX` = `hvm_start_info`.
//! Linux 64-bit boot protocol: long mode on identity-mapped page tables covering the first
//! 4 GiB, `__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18, `RSI` = the zero page.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{BOOT_GDT_START, BOOT_IDT_START, PDE_START, PDPTE_START, PML4_START};

/// Selector of the 32-bit flat code segment (PVH entry).
pub const CODE32_SELECTOR: u16 = 0x08;
/// Selector of the 64-bit code segment (Linux `__BOOT_CS`).
pub const CODE64_SELECTOR: u16 = 0x10;
/// Selector of the flat data segment (Linux `__BOOT_DS`).
pub const DATA_SELECTOR: u16 = 0x18;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x20;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Writing the boot structures into guest memory failed.
#[derive(Debug, Error)]
pub enum RegsError {
    /// The GDT could not be written.
    #[error("cannot write the boot GDT")]
    Gdt,
    /// The page tables could not be written.
    #[error("cannot write the boot page tables")]
    PageTables,
}

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// PVH: 32-bit protected mode at `entry`, `EBX` = start info.
    Pvh {
        /// Entry point.
        entry: u64,
        /// Address of `hvm_start_info`.
        start_info: u64,
    },
    /// Linux 64-bit boot protocol at `entry`, `RSI` = zero page.
    Linux64 {
        /// Entry point (`startup_64`).
        entry: u64,
        /// Address of `boot_params`.
        zero_page: u64,
    },
}

/// A GDT descriptor from flags (the access byte in bits 0..8, flags nibble in 12..16), base, limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | (((limit as u64 & 0x000f_0000) >> 16) << 48)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The boot GDT: null, 32-bit code, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 5] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The KVM segment register a GDT entry describes when loaded with `selector`.
fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

/// Writes the boot GDT and an empty IDT.
pub fn write_gdt<M: GuestMemoryBackend>(mem: &M) -> Result<(), RegsError> {
    for (i, e) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| RegsError::Gdt)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| RegsError::Gdt)
}

/// Writes identity page tables mapping the first 4 GiB with 2 MiB pages.
pub fn write_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), RegsError> {
    let w = |val: u64, addr: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|_| RegsError::PageTables)
    };
    // Present | writable.
    w(PDPTE_START | 0x03, PML4_START)?;
    for pd in 0..4u64 {
        let pd_addr = PDE_START + pd * 0x1000;
        w(pd_addr | 0x03, PDPTE_START + pd * 8)?;
        let mut table = [0u64; 512];
        for (i, e) in table.iter_mut().enumerate() {
            // Present | writable | 2 MiB page.
            *e = ((pd << 30) + ((i as u64) << 21)) | 0x83;
        }
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(pd_addr))
            .map_err(|_| RegsError::PageTables)?;
    }
    Ok(())
}

/// Sets `sregs` for the given entry (the boot GDT and page tables must have been written).
pub fn setup_sregs(sregs: &mut kvm_sregs, entry: Entry) {
    let data = segment_from_gdt(BOOT_GDT[3], DATA_SELECTOR);
    let tss = segment_from_gdt(BOOT_GDT[4], TSS_SELECTOR);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match entry {
        Entry::Pvh { .. } => {
            sregs.cs = segment_from_gdt(BOOT_GDT[1], CODE32_SELECTOR);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        Entry::Linux64 { .. } => {
            sregs.cs = segment_from_gdt(BOOT_GDT[2], CODE64_SELECTOR);
            sregs.cr3 = PML4_START;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
}

/// General registers at entry.
pub fn entry_regs(entry: Entry) -> kvm_regs {
    let mut r = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        Entry::Pvh { entry, start_info } => {
            r.rip = entry;
            r.rbx = start_info;
        }
        Entry::Linux64 { entry, zero_page } => {
            r.rip = entry;
            r.rsi = zero_page;
            r.rsp = 0x8ff0;
            r.rbp = 0x8ff0;
        }
    }
    r
}

/// x87 and SSE control words as after a reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs every vCPU starts with.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    const IA32_SYSENTER_CS: u32 = 0x174;
    const IA32_SYSENTER_ESP: u32 = 0x175;
    const IA32_SYSENTER_EIP: u32 = 0x176;
    const STAR: u32 = 0xc000_0081;
    const LSTAR: u32 = 0xc000_0082;
    const CSTAR: u32 = 0xc000_0083;
    const SYSCALL_MASK: u32 = 0xc000_0084;
    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const MTRR_DEF_TYPE: u32 = 0x2ff;
    vec![
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (STAR, 0),
        (CSTAR, 0),
        (KERNEL_GS_BASE, 0),
        (SYSCALL_MASK, 0),
        (LSTAR, 0),
        // Fast string operations enabled, as firmware leaves it.
        (IA32_MISC_ENABLE, 1),
        // MTRRs enabled, default memory type write-back.
        (MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

/// Wires LINT0 to ExtINT (the 8259 PIC) and LINT1 to NMI, as firmware does on the BSP.
pub fn setup_lint(lapic: &mut kvm_lapic_state) {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7 << 8;
    const MODE_NMI: u32 = 0x4 << 8;
    for (off, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let mut b = [0u8; 4];
        for (dst, src) in b.iter_mut().zip(&lapic.regs[off..off + 4]) {
            *dst = *src as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | mode;
        for (dst, src) in lapic.regs[off..off + 4].iter_mut().zip(v.to_le_bytes()) {
            *dst = src as _;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_entries_decode() {
        let code64 = segment_from_gdt(BOOT_GDT[2], CODE64_SELECTOR);
        assert_eq!(
            (code64.l, code64.db, code64.type_, code64.present),
            (1, 0, 0xb, 1)
        );
        assert_eq!(code64.limit, 0xffff_ffff);
        let code32 = segment_from_gdt(BOOT_GDT[1], CODE32_SELECTOR);
        assert_eq!((code32.l, code32.db, code32.g), (0, 1, 1));
        let data = segment_from_gdt(BOOT_GDT[3], DATA_SELECTOR);
        assert_eq!((data.type_, data.s, data.unusable), (3, 1, 0));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        // The last 2 MiB page below 4 GiB.
        let pd3: u64 = m.read_obj(GuestAddress(PDPTE_START + 24)).unwrap();
        let last: u64 = m.read_obj(GuestAddress((pd3 & !0xfff) + 511 * 8)).unwrap();
        assert_eq!(last, ((4u64 << 30) - (2 << 20)) | 0x83);
    }

    #[test]
    fn long_mode_sregs() {
        let mut s = kvm_sregs::default();
        setup_sregs(
            &mut s,
            Entry::Linux64 {
                entry: 0x1000000,
                zero_page: 0x7000,
            },
        );
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.ds.selector, 0x18);
        let mut p = kvm_sregs::default();
        setup_sregs(
            &mut p,
            Entry::Pvh {
                entry: 0x100000,
                start_info: 0x6000,
            },
        );
        assert_eq!((p.cr0 & CR0_PG, p.efer), (0, 0));
        assert_eq!(p.cs.db, 1);
    }

    #[test]
    fn lint_pins() {
        let mut l = kvm_lapic_state::default();
        setup_lint(&mut l);
        assert_eq!(l.regs[0x351] as u8, 0x07);
        assert_eq!(l.regs[0x361] as u8, 0x04);
    }
}
