//! The guest-physical memory map and the I/O port map every part of Ferrovisor agrees on.
//!
//! ```text
//! 0x0000_0500  GDT used for the 32-bit PVH and 64-bit Linux entries
//! 0x0000_6000  hvm_start_info (PVH), followed by its memory map at 0x6100
//! 0x0000_7000  Linux boot_params ("zero page")
//! 0x0000_9000  identity page tables for the 64-bit Linux entry (PML4, PDPT, 4 PDs: first 4 GiB)
//! 0x0002_0000  kernel command line (up to 64 KiB)
//! 0x0009_fc00  end of low RAM (EBDA-sized gap up to 0xa0000 is reserved)
//! 0x000e_0000  ACPI tables, RSDP first (reserved in the memory map)
//! 0x0010_0000  high RAM; PVH kernels are loaded from here; initrd goes at the top of RAM below 4 GiB
//! 0xc000_0000  32-bit MMIO hole up to 4 GiB:
//!   0xc000_0000    PCI 32-bit memory window (512 MiB): BARs placed by the VMM or the guest
//!   0xe000_0000    PCIe ECAM of bus 0 (1 MiB; MCFG, reserved by a PNP0C02 device)
//!   0xfec0_0000    IOAPIC, 0xfee0_0000 LAPIC, 0xfffb_c000 KVM identity map + TSS
//! 0x1_0000_0000 RAM above the hole
//! above RAM     PCI 64-bit memory window ([`pci_mmio64_window`]): 32 GiB from the first 1 GiB
//!               boundary at or above the end of RAM (and at least 4 GiB)
//! ```
//! The guest's own trampolines (the probe's AP start-up code) may use 0x8000..0x9000.

/// Guest-physical address of the GDT written for boot.
pub const BOOT_GDT_START: u64 = 0x500;
/// Guest-physical address of the IDT (empty) loaded for boot.
pub const BOOT_IDT_START: u64 = 0x520;
/// Where the PVH `hvm_start_info` structure is written.
pub const PVH_INFO_START: u64 = 0x6000;
/// Where the PVH module list (the initrd) is written.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// Where the PVH memory map entries are written.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Maximum number of PVH memory map entries (they must end before the zero page).
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 128;
/// Linux boot_params ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Start of the identity page tables for the 64-bit Linux entry.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories mapping 0..4 GiB with 2 MiB pages.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line accepted, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Top of conventional low memory.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the low reserved area that holds the ACPI tables.
pub const ACPI_START: u64 = 0xe0000;
/// End (exclusive) of the low reserved area.
pub const ACPI_END: u64 = 0x100000;
/// RSDP lives at the start of the ACPI area so legacy scanners find it too.
pub const RSDP_START: u64 = ACPI_START;
/// Start of RAM above 1 MiB.
pub const HIGH_RAM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO hole: RAM continues above.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// PCI 32-bit memory window: start.
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
/// PCI 32-bit memory window: size.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCIe ECAM (enhanced configuration access) of bus 0.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// ECAM size: one bus (32 devices x 8 functions x 4 KiB).
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
const _: () = assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START);
const _: () = assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);

/// Size of the PCI 64-bit memory window.
pub const PCI_MMIO64_SIZE: u64 = 32 << 30;

/// The PCI 64-bit memory window (start, size) for a VM whose RAM above 4 GiB is `high_ram`
/// bytes: from the first 1 GiB boundary at or above the end of RAM.
pub fn pci_mmio64_window(high_ram: u64) -> (u64, u64) {
    const GIB: u64 = 1 << 30;
    let end = MMIO_HOLE_END.saturating_add(high_ram);
    (end.div_ceil(GIB).saturating_mul(GIB), PCI_MMIO64_SIZE)
}

/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;

/// Legacy I/O ports and interrupt lines of the machine.
pub mod ports {
    /// First serial port (16550).
    pub const COM1: u16 = 0x3f8;
    /// Interrupt line of COM1.
    pub const COM1_IRQ: u32 = 4;
    /// i8042 keyboard controller data port.
    pub const I8042_DATA: u16 = 0x60;
    /// i8042 command/status port: writing 0xfe resets the machine.
    pub const I8042_CMD: u16 = 0x64;
    /// CMOS/RTC index port; data is at 0x71.
    pub const CMOS_INDEX: u16 = 0x70;
    /// ACPI PM1a event block (status at +0, enable at +2), 4 bytes.
    pub const PM1A_EVT_BLK: u16 = 0x600;
    /// ACPI PM1a control block, 2 bytes: SLP_TYP in bits 10..13, SLP_EN is bit 13.
    pub const PM1A_CNT_BLK: u16 = 0x604;
    /// ACPI PM timer, 4 bytes, 3.579545 MHz.
    pub const PM_TMR_BLK: u16 = 0x608;
    /// Length of the ACPI PM register block starting at `PM1A_EVT_BLK`.
    pub const PM_BLK_LEN: u16 = 0x0c;
    /// The SLP_TYP value the DSDT's `_S5_` package announces for soft-off.
    pub const S5_SLP_TYP: u8 = 5;
    /// ACPI SCI interrupt line.
    pub const SCI_IRQ: u32 = 9;
    /// Reset control register (FADT RESET_REG): writing `RESET_VALUE` resets the machine.
    pub const RESET_REG: u16 = 0xcf9;
    /// Value written to `RESET_REG` to reset.
    pub const RESET_VALUE: u8 = 0x06;
    /// pvpanic device (ACPI `QEMU0001`): the guest writes bit 0 on a kernel panic.
    pub const PVPANIC: u16 = 0x505;
    /// PCI type 1 CONFIG_ADDRESS (32-bit accesses only; 0xcf9 is `RESET_REG`).
    pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
    /// PCI type 1 CONFIG_DATA, 4 ports.
    pub const PCI_CONFIG_DATA: u16 = 0xcfc;
    /// POST/debug port, written by firmware and kernels for delays.
    pub const POST: u16 = 0x80;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmio64_window_follows_ram() {
        assert_eq!(pci_mmio64_window(0), (4 << 30, PCI_MMIO64_SIZE));
        assert_eq!(pci_mmio64_window(1), (5 << 30, PCI_MMIO64_SIZE));
        assert_eq!(pci_mmio64_window(1 << 30), (5 << 30, PCI_MMIO64_SIZE));
    }
}
