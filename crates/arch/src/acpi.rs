//! ACPI tables that describe the Ferrovisor machine to the guest: RSDP, XSDT, FADT (+FACS),
//! MADT and a DSDT in AML, written into the reserved area `ACPI_START..ACPI_END`.
//!
//! The machine is a full fixed-hardware ACPI platform (not hardware-reduced) because the guest
//! powers off through the PM1a control block (`\_S5_`, SLP_TYP 5) and reads the PM timer; ACPI is
//! always enabled (SMI_CMD 0), so no SMM handshake exists.
//!
//! Interrupt model, which the VMM must reproduce: KVM's in-kernel irqchip (PIC + IOAPIC) with its
//! default routing, where ISA IRQ *n* is IOAPIC pin *n*. In particular the in-kernel PIT drives
//! pin 0, so the MADT has **no** IRQ0→GSI2 override (real chipsets and QEMU have one because they
//! wire the PIT to pin 2); adding one would make Linux wait on a pin that never fires. The only
//! override is for the SCI: IRQ 9, level-triggered, active high. The IOAPIC has id 0, the value
//! KVM's in-kernel IOAPIC ID register holds after reset, so table and register agree.
//!
//! Layout in guest memory, in this order: RSDP at `RSDP_START` (16-byte aligned, where legacy
//! scanners look), FACS (64-byte aligned), DSDT, FADT, the XSDT-listed system tables (MADT, and
//! later MCFG), XSDT; SDTs are 8-byte aligned. Nothing is written unless everything fits.
//!
//! To add a table (MCFG for a PCIe ECAM), append it in `system_tables`; to add a device, append
//! its AML in `sb_devices`, both fed from [`AcpiConfig`].

use acpi_tables::aml;
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::layout::{self, ports};

mod pci;
pub use pci::PciAcpi;

/// OEM id Ferrovisor puts in every table.
pub const DEFAULT_OEM_ID: [u8; 6] = *b"FERRO ";
/// OEM table id of every table.
const OEM_TABLE_ID: [u8; 8] = *b"FERROVMM";
/// OEM revision of every table.
const OEM_REVISION: u32 = 1;
/// Largest vCPU count the tables describe (APIC ids `0..num_cpus`).
pub const MAX_CPUS: u8 = 32;
/// IOAPIC id announced in the MADT: the reset value of KVM's in-kernel IOAPIC ID register.
pub const IOAPIC_ID: u8 = 0;

/// Size of the ACPI 2.0+ RSDP.
const RSDP_LEN: u64 = 36;
/// Length of the standard SDT header.
const SDT_HEADER_LEN: u32 = 36;
/// Alignment of ordinary SDTs.
const SDT_ALIGN: u64 = 8;
/// The FACS must be 64-byte aligned.
const FACS_ALIGN: u64 = 64;
/// FACS version for ACPI 2.0 and later.
const FACS_VERSION: u8 = 2;

/// MADT revision (ACPI 6.3+).
const MADT_REVISION: u8 = 5;
/// MADT flag: the machine also has dual 8259 PICs (KVM's in-kernel PIC), which the OS must mask.
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT structure type: Interrupt Source Override.
const MADT_TYPE_ISO: u8 = 2;
/// MADT structure type: Local APIC NMI.
const MADT_TYPE_LAPIC_NMI: u8 = 4;
/// MPS INTI flags: active high (polarity 01) and level-triggered (trigger mode 11).
const MPS_INTI_ACTIVE_HIGH_LEVEL: u16 = 0b1101;
/// "All processors" in a Local APIC NMI structure.
const ALL_PROCESSORS: u8 = 0xff;
/// The local APIC input wired to NMI.
const LINT1: u8 = 1;

/// DSDT revision 2: AML integers are 64-bit.
const DSDT_REVISION: u8 = 2;

/// IAPC_BOOT_ARCH: the machine has user-visible legacy devices (COM1, CMOS RTC).
const BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
/// IAPC_BOOT_ARCH: VGA is not present.
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// P_LVL2_LAT above 100 µs tells the OS C2 is not supported.
const C2_NOT_SUPPORTED: u16 = 101;
/// P_LVL3_LAT above 1000 µs tells the OS C3 is not supported.
const C3_NOT_SUPPORTED: u16 = 1001;

/// Errors from building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The vCPU count is outside 1..=32.
    #[error("{0} vCPUs cannot be described: the tables allow 1 to {MAX_CPUS}")]
    InvalidCpuCount(u8),
    /// The tables do not fit below `ACPI_END`.
    #[error("ACPI tables would end at {end:#x}, past the end of the ACPI area at {limit:#x}")]
    NoSpace {
        /// First address past the last table.
        end: u64,
        /// End (exclusive) of the ACPI area.
        limit: u64,
    },
    /// A table could not be written to guest memory.
    #[error("cannot write ACPI table {table} at {addr:#x}")]
    Write {
        /// Signature of the table.
        table: String,
        /// Where it was to be written.
        addr: u64,
        /// The guest memory error.
        #[source]
        source: GuestMemoryError,
    },
}

/// What the ACPI tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs, 1..=32; their APIC ids and ACPI processor UIDs are `0..num_cpus`.
    pub num_cpus: u8,
    /// OEM id of every table, e.g. [`DEFAULT_OEM_ID`].
    pub oem_id: [u8; 6],
    /// The PCI root complex (MCFG, `\_SB.PCI0`), if the machine has one.
    pub pci: Option<PciAcpi>,
}

impl AcpiConfig {
    /// A configuration for `num_cpus` vCPUs with Ferrovisor's OEM id.
    pub fn new(num_cpus: u8) -> Self {
        Self {
            num_cpus,
            oem_id: DEFAULT_OEM_ID,
            pci: None,
        }
    }
}

/// Writes RSDP (at `layout::RSDP_START`) and all tables into guest memory below
/// `layout::ACPI_END`; returns the RSDP address.
pub fn write_acpi_tables<M: GuestMemory>(
    mem: &M,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    let area = build_tables(cfg)?;
    for table in &area.placed {
        mem.write_slice(&table.bytes, GuestAddress(table.addr))
            .map_err(|source| AcpiError::Write {
                table: String::from_utf8_lossy(&table.signature).into_owned(),
                addr: table.addr,
                source,
            })?;
    }
    Ok(GuestAddress(layout::RSDP_START))
}

/// One table with its final address.
struct PlacedTable {
    signature: [u8; 4],
    addr: u64,
    bytes: Vec<u8>,
}

/// Hands out addresses in the ACPI area, one table after another.
struct TableArea {
    next: u64,
    placed: Vec<PlacedTable>,
}

impl TableArea {
    /// An empty area whose first table goes right after the RSDP.
    fn new() -> Self {
        Self {
            next: layout::RSDP_START + RSDP_LEN,
            placed: Vec::new(),
        }
    }

    /// Places `bytes` at the next `align`-aligned address and returns that address.
    fn place(&mut self, signature: [u8; 4], bytes: Vec<u8>, align: u64) -> Result<u64, AcpiError> {
        let limit = layout::ACPI_END;
        let no_space = |end| AcpiError::NoSpace { end, limit };
        let addr = self
            .next
            .checked_next_multiple_of(align)
            .ok_or(no_space(u64::MAX))?;
        let end = addr
            .checked_add(bytes.len() as u64)
            .ok_or(no_space(u64::MAX))?;
        if end > limit {
            return Err(no_space(end));
        }
        self.next = end;
        self.placed.push(PlacedTable {
            signature,
            addr,
            bytes,
        });
        Ok(addr)
    }
}

/// Lays out every table in the ACPI area; the RSDP is the last one placed.
fn build_tables(cfg: &AcpiConfig) -> Result<TableArea, AcpiError> {
    if cfg.num_cpus == 0 || cfg.num_cpus > MAX_CPUS {
        return Err(AcpiError::InvalidCpuCount(cfg.num_cpus));
    }
    let mut area = TableArea::new();

    let facs = area.place(*b"FACS", facs(), FACS_ALIGN)?;
    let dsdt = area.place(*b"DSDT", dsdt(cfg), SDT_ALIGN)?;
    let fadt = area.place(*b"FACP", fadt(cfg, facs, dsdt), SDT_ALIGN)?;

    let mut xsdt = XSDT::new(cfg.oem_id, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt);
    for (signature, bytes) in system_tables(cfg) {
        xsdt.add_entry(area.place(signature, bytes, SDT_ALIGN)?);
    }
    let xsdt = area.place(*b"XSDT", aml_bytes(&xsdt), SDT_ALIGN)?;

    let rsdp = aml_bytes(&Rsdp::new(cfg.oem_id, xsdt));
    area.placed.push(PlacedTable {
        signature: *b"RSDP",
        addr: layout::RSDP_START,
        bytes: rsdp,
    });
    Ok(area)
}

/// The tables the XSDT lists besides the FADT: MADT, and MCFG for the PCIe ECAM.
fn system_tables(cfg: &AcpiConfig) -> Vec<([u8; 4], Vec<u8>)> {
    let mut t = vec![(*b"APIC", madt(cfg))];
    if let Some(p) = &cfg.pci {
        t.push((*b"MCFG", pci::mcfg(cfg, p)));
    }
    t
}

/// Serialises an AML object or table.
fn aml_bytes(obj: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    obj.to_aml_bytes(&mut bytes);
    bytes
}

/// An empty standard SDT header (checksum kept valid by [`Sdt`]).
fn sdt(cfg: &AcpiConfig, signature: [u8; 4], revision: u8) -> Sdt {
    Sdt::new(
        signature,
        SDT_HEADER_LEN,
        revision,
        cfg.oem_id,
        OEM_TABLE_ID,
        OEM_REVISION,
    )
}

/// The Firmware ACPI Control Structure: required on non-hardware-reduced platforms (global lock,
/// waking vector). It has no checksum.
fn facs() -> Vec<u8> {
    let mut facs = FACS::new();
    facs.version = FACS_VERSION;
    aml_bytes(&facs)
}

/// A system I/O Generic Address Structure `len` bytes wide, access size left to the OS as the
/// PM blocks' 32-bit fields do.
fn io_gas(port: u16, len: u8, access_size: AccessSize) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        len * 8,
        0,
        access_size,
        u64::from(port),
    )
}

/// The FADT (revision 6 layout): fixed-hardware PM1a event/control blocks, PM timer, SCI,
/// reset register; ACPI always enabled.
fn fadt(cfg: &AcpiConfig, facs: u64, dsdt: u64) -> Vec<u8> {
    const PM1_EVT_LEN: u8 = 4;
    const PM1_CNT_LEN: u8 = 2;
    const PM_TMR_LEN: u8 = 4;

    let mut fadt = FADTBuilder::new(cfg.oem_id, OEM_TABLE_ID, OEM_REVISION)
        .preferred_pm_profile(PmProfile::EnterpriseServer)
        // WBINVD works; C1 (HLT) is supported on every CPU; there is no fixed sleep button;
        // RESET_REG is valid. PWR_BUTTON stays clear: the power button is a fixed feature.
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    // Both the 32-bit fields and the X_ fields point at the tables; they hold the same values,
    // which ACPICA accepts without a mismatch warning. FIRMWARE_CTRL is used alone, as
    // X_FIRMWARE_CTRL would make the OS map the same FACS twice.
    // The casts are lossless: TableArea places every table below ACPI_END (1 MiB).
    fadt.firmware_ctrl = (facs as u32).into();
    fadt.dsdt = (dsdt as u32).into();
    fadt.x_dsdt = dsdt.into();
    fadt.sci_int = (ports::SCI_IRQ as u16).into();
    // SMI_CMD 0: no SMM, ACPI is always enabled (acpi_enable/acpi_disable stay 0).
    fadt.smi_cmd = 0.into();
    fadt.pm1a_evt_blk = u32::from(ports::PM1A_EVT_BLK).into();
    fadt.pm1a_cnt_blk = u32::from(ports::PM1A_CNT_BLK).into();
    fadt.pm_tmr_blk = u32::from(ports::PM_TMR_BLK).into();
    fadt.pm1_evt_len = PM1_EVT_LEN;
    fadt.pm1_cnt_len = PM1_CNT_LEN;
    fadt.pm_tmr_len = PM_TMR_LEN;
    fadt.x_pm1a_evt_blk = io_gas(ports::PM1A_EVT_BLK, PM1_EVT_LEN, AccessSize::Undefined);
    fadt.x_pm1a_cnt_blk = io_gas(ports::PM1A_CNT_BLK, PM1_CNT_LEN, AccessSize::Undefined);
    fadt.x_pm_tmr_blk = io_gas(ports::PM_TMR_BLK, PM_TMR_LEN, AccessSize::Undefined);
    fadt.p_lvl2_lat = C2_NOT_SUPPORTED.into();
    fadt.p_lvl3_lat = C3_NOT_SUPPORTED.into();
    // No 8042 advertised (Linux then skips probing it; the VMM keeps port 0x64 for reset only),
    // no VGA, MSI supported, CMOS RTC present.
    fadt.iapc_boot_arch = (BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_VGA_NOT_PRESENT).into();
    fadt.reset_reg = io_gas(ports::RESET_REG, 1, AccessSize::ByteAccess);
    fadt.reset_value = ports::RESET_VALUE;
    aml_bytes(&fadt.finalize())
}

/// The MADT: one enabled local APIC per vCPU, one IOAPIC, the SCI override and LINT1 as NMI.
fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut madt = sdt(cfg, *b"APIC", MADT_REVISION);
    let mut body = Vec::new();
    body.extend_from_slice(&(layout::LAPIC_START as u32).to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for cpu in 0..cfg.num_cpus {
        ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled).to_aml_bytes(&mut body);
    }
    IoApic::new(IOAPIC_ID, layout::IOAPIC_START as u32, 0).to_aml_bytes(&mut body);
    // Interrupt Source Override: ISA bus 0, IRQ 9 -> GSI 9, active high, level-triggered.
    body.extend_from_slice(&[MADT_TYPE_ISO, 10, 0, ports::SCI_IRQ as u8]);
    body.extend_from_slice(&ports::SCI_IRQ.to_le_bytes());
    body.extend_from_slice(&MPS_INTI_ACTIVE_HIGH_LEVEL.to_le_bytes());
    // Local APIC NMI: all processors, flags 0 (as the bus defines), LINT1.
    body.extend_from_slice(&[MADT_TYPE_LAPIC_NMI, 6, ALL_PROCESSORS, 0, 0, LINT1]);
    madt.append_slice(&body);
    madt.as_slice().to_vec()
}

/// The DSDT: `\_S5_` for soft-off and the `\_SB` devices.
fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let slp_typ = ports::S5_SLP_TYP;
    let s5 = aml::Package::new(vec![&slp_typ, &slp_typ, &aml::ZERO, &aml::ZERO]);
    let mut body = aml_bytes(&aml::Name::new(aml::Path::new("\\_S5_"), &s5));
    body.extend(aml::Scope::raw(aml::Path::new("\\_SB_"), sb_devices(cfg)));
    let mut dsdt = sdt(cfg, *b"DSDT", DSDT_REVISION);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// The AML of the devices under `\_SB`: COM1, pvpanic, the PCIe host bridge.
fn sb_devices(cfg: &AcpiConfig) -> Vec<u8> {
    let mut aml = com1();
    aml.extend(pvpanic());
    if let Some(p) = &cfg.pci {
        aml.extend(pci::devices(p));
    }
    aml
}

/// `_STA` value: present, enabled, shown in UI, functioning.
const STA_PRESENT: u8 = 0x0f;

/// COM1: a 16550 at 0x3f8, ISA IRQ 4.
fn com1() -> Vec<u8> {
    let io = aml::IO::new(ports::COM1, ports::COM1, 1, 8);
    let irq = IrqNoFlags(ports::COM1_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    aml_bytes(&aml::Device::new(
        aml::Path::new("COM1"),
        vec![
            &aml::Name::new(aml::Path::new("_HID"), &aml::EISAName::new("PNP0501")),
            &aml::Name::new(aml::Path::new("_UID"), &aml::ONE),
            &aml::Name::new(aml::Path::new("_STA"), &STA_PRESENT),
            &aml::Name::new(aml::Path::new("_CRS"), &crs),
        ],
    ))
}

/// pvpanic (`QEMU0001`): one I/O port the guest writes on a kernel panic.
fn pvpanic() -> Vec<u8> {
    let io = aml::IO::new(ports::PVPANIC, ports::PVPANIC, 1, 1);
    let crs = aml::ResourceTemplate::new(vec![&io]);
    aml_bytes(&aml::Device::new(
        aml::Path::new("PEVT"),
        vec![
            &aml::Name::new(aml::Path::new("_HID"), &"QEMU0001"),
            &aml::Name::new(aml::Path::new("_STA"), &STA_PRESENT),
            &aml::Name::new(aml::Path::new("_CRS"), &crs),
        ],
    ))
}

/// ASL `IRQNoFlags() {n}`: the short IRQ descriptor of an ISA interrupt (edge, active high,
/// exclusive), which acpi_tables lacks.
struct IrqNoFlags(u32);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        // Small resource, type 4 (IRQ), 2 data bytes: the 16-bit mask of ISA IRQs 0..15.
        sink.byte(0x22);
        sink.word(1u16.checked_shl(self.0).unwrap_or(0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use vm_memory::GuestMemoryMmap;

    const MIB: usize = 1 << 20;

    /// Tables by signature, with their guest addresses.
    type Tables = HashMap<[u8; 4], (u64, Vec<u8>)>;

    fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 * MIB)]).expect("2 MiB of guest memory")
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr))
            .expect("readable table");
        buf
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
    }

    /// Reads the SDT at `addr` using the length in its header, checking its checksum.
    fn read_sdt(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let header = read(mem, addr, 36);
        let len = u32_at(&header, 4) as usize;
        assert!(len >= 36, "table at {addr:#x} has length {len}");
        let table = read(mem, addr, len);
        assert_eq!(
            sum(&table),
            0,
            "checksum of {:?}",
            String::from_utf8_lossy(&table[..4])
        );
        table
    }

    /// Every table reachable from the RSDP, by signature, with its address.
    fn walk(mem: &GuestMemoryMmap, rsdp: GuestAddress) -> Tables {
        let rsdp = read(mem, rsdp.0, 36);
        let xsdt_addr = u64_at(&rsdp, 24);
        let xsdt = read_sdt(mem, xsdt_addr);
        let mut tables = HashMap::new();
        for entry in xsdt[36..].chunks(8) {
            let addr = u64::from_le_bytes(entry.try_into().expect("8-byte XSDT entry"));
            let table = read_sdt(mem, addr);
            let sig: [u8; 4] = table[..4].try_into().expect("signature");
            assert!(tables.insert(sig, (addr, table)).is_none(), "listed twice");
        }
        let fadt = &tables[b"FACP"].1;
        let dsdt_addr = u64_at(fadt, 140);
        let facs_addr = u64::from(u32_at(fadt, 36));
        tables.insert(*b"DSDT", (dsdt_addr, read_sdt(mem, dsdt_addr)));
        tables.insert(*b"FACS", (facs_addr, read(mem, facs_addr, 64)));
        tables.insert(*b"XSDT", (xsdt_addr, xsdt));
        tables
    }

    fn build(num_cpus: u8) -> (GuestMemoryMmap, Tables) {
        let mem = guest_memory();
        let rsdp = write_acpi_tables(&mem, &AcpiConfig::new(num_cpus)).expect("tables fit");
        assert_eq!(rsdp, GuestAddress(layout::RSDP_START));
        let tables = walk(&mem, rsdp);
        (mem, tables)
    }

    /// (type, bytes) of each MADT interrupt controller structure.
    fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let len = madt[off + 1] as usize;
            assert!(len >= 2, "MADT entry of length {len}");
            entries.push((madt[off], madt[off..off + len].to_vec()));
            off += len;
        }
        assert_eq!(off, madt.len(), "MADT entries end at the table's end");
        entries
    }

    #[test]
    fn rsdp_has_both_checksums_and_points_to_the_xsdt() {
        let (mem, tables) = build(4);
        let rsdp = read(&mem, layout::RSDP_START, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(&rsdp), 0, "extended checksum");
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(u32_at(&rsdp, 20), 36, "length");
        assert_eq!(&rsdp[9..15], &DEFAULT_OEM_ID);
        assert_eq!(u64_at(&rsdp, 24), tables[b"XSDT"].0);
        assert_eq!(layout::RSDP_START % 16, 0);
    }

    #[test]
    fn every_table_has_a_valid_checksum_length_and_place() {
        for num_cpus in [1, 2, 32] {
            let (_, tables) = build(num_cpus);
            let mut spans: Vec<(u64, u64)> = vec![(layout::RSDP_START, layout::RSDP_START + 36)];
            for (sig, (addr, bytes)) in &tables {
                assert_eq!(&bytes[..4], sig);
                if sig != b"FACS" {
                    assert_eq!(u32_at(bytes, 4) as usize, bytes.len());
                    assert_eq!(sum(bytes), 0);
                    assert_eq!(&bytes[10..16], &DEFAULT_OEM_ID);
                    assert_eq!(
                        addr % SDT_ALIGN,
                        0,
                        "{:?} aligned",
                        String::from_utf8_lossy(sig)
                    );
                }
                spans.push((*addr, addr + bytes.len() as u64));
            }
            spans.sort();
            for pair in spans.windows(2) {
                assert!(pair[0].1 <= pair[1].0, "tables overlap: {pair:x?}");
            }
            assert!(spans[0].0 >= layout::ACPI_START);
            assert!(spans[spans.len() - 1].1 <= layout::ACPI_END);
        }
    }

    #[test]
    fn xsdt_lists_fadt_and_madt() {
        let (_, tables) = build(2);
        let xsdt = &tables[b"XSDT"].1;
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|e| u64_at(e, 0)).collect();
        assert_eq!(xsdt.len(), 36 + 8 * entries.len());
        assert!(entries.contains(&tables[b"FACP"].0));
        assert!(entries.contains(&tables[b"APIC"].0));
        assert!(
            !entries.contains(&tables[b"DSDT"].0),
            "the DSDT is reached through the FADT"
        );
    }

    #[test]
    fn pci_adds_mcfg_to_the_xsdt() {
        let mem = guest_memory();
        let mut cfg = AcpiConfig::new(2);
        cfg.pci = Some(PciAcpi::standard(1 << 30));
        let rsdp = write_acpi_tables(&mem, &cfg).expect("tables fit");
        let tables = walk(&mem, rsdp);
        let xsdt = &tables[b"XSDT"].1;
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|e| u64_at(e, 0)).collect();
        assert!(entries.contains(&tables[b"MCFG"].0));
        assert!(find(&tables[b"DSDT"].1, b"PCI0").is_some());
    }

    #[test]
    fn facs_is_64_byte_aligned() {
        let (_, tables) = build(1);
        let (addr, facs) = &tables[b"FACS"];
        assert_eq!(addr % 64, 0);
        assert_eq!(&facs[..4], b"FACS");
        assert_eq!(u32_at(facs, 4), 64);
        assert_eq!(facs[32], FACS_VERSION);
    }

    #[test]
    fn fadt_describes_fixed_hardware() {
        let (_, tables) = build(2);
        let fadt = &tables[b"FACP"].1;
        let dsdt = tables[b"DSDT"].0;
        assert_eq!(fadt.len(), 276, "revision 6 layout");
        assert_eq!(fadt[8], 6, "major revision");
        assert_eq!(fadt[131], 5, "minor revision");
        assert_eq!(u32_at(fadt, 36) as u64, tables[b"FACS"].0, "FIRMWARE_CTRL");
        assert_eq!(u64_at(fadt, 132), 0, "X_FIRMWARE_CTRL unused");
        assert_eq!(u32_at(fadt, 40) as u64, dsdt, "DSDT");
        assert_eq!(u64_at(fadt, 140), dsdt, "X_DSDT");
        assert_eq!(u32::from(u16_at(fadt, 46)), ports::SCI_IRQ, "SCI_INT");
        assert_eq!(u32_at(fadt, 48), 0, "SMI_CMD");
        assert_eq!((fadt[52], fadt[53]), (0, 0), "ACPI_ENABLE/ACPI_DISABLE");
        assert_eq!(u32_at(fadt, 56), u32::from(ports::PM1A_EVT_BLK));
        assert_eq!(u32_at(fadt, 64), u32::from(ports::PM1A_CNT_BLK));
        assert_eq!(u32_at(fadt, 76), u32::from(ports::PM_TMR_BLK));
        assert_eq!(
            (fadt[88], fadt[89], fadt[91]),
            (4, 2, 4),
            "PM1_EVT/PM1_CNT/PM_TMR lengths"
        );
        // X_ GAS: system I/O, bit width = 8 * length, same port as the 32-bit field.
        for (off, port, len) in [
            (148, ports::PM1A_EVT_BLK, 4u8),
            (172, ports::PM1A_CNT_BLK, 2),
            (208, ports::PM_TMR_BLK, 4),
        ] {
            assert_eq!(fadt[off], 1, "system I/O at {off}");
            assert_eq!(fadt[off + 1], len * 8);
            assert_eq!(u64_at(fadt, off + 4), u64::from(port));
        }
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & Flags::Wbinvd as u32, 0);
        assert_ne!(flags & Flags::ResetRegSup as u32, 0);
        assert_eq!(
            flags & Flags::HwReducedAcpi as u32,
            0,
            "not hardware-reduced"
        );
        assert_eq!(flags & Flags::PwrButton as u32, 0, "fixed power button");
        let boot_arch = u16_at(fadt, 109);
        assert_eq!(boot_arch & (1 << 1), 0, "no 8042");
        assert_ne!(boot_arch & (1 << 2), 0, "VGA not present");
        assert_eq!(boot_arch & (1 << 3), 0, "MSI supported");
        assert_eq!(boot_arch & (1 << 5), 0, "CMOS RTC present");
        // RESET_REG: system I/O, 8 bits, byte access.
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(fadt, 120), u64::from(ports::RESET_REG));
        assert_eq!(fadt[128], ports::RESET_VALUE);
    }

    #[test]
    fn madt_has_one_enabled_lapic_per_cpu() {
        for num_cpus in [1u8, 3, 32] {
            let (_, tables) = build(num_cpus);
            let madt = &tables[b"APIC"].1;
            assert_eq!(madt[8], MADT_REVISION);
            assert_eq!(u64::from(u32_at(madt, 36)), layout::LAPIC_START);
            assert_eq!(u32_at(madt, 40), MADT_PCAT_COMPAT);
            let lapics: Vec<Vec<u8>> = madt_entries(madt)
                .into_iter()
                .filter(|(t, _)| *t == 0)
                .map(|(_, e)| e)
                .collect();
            assert_eq!(lapics.len(), usize::from(num_cpus));
            for (i, lapic) in lapics.iter().enumerate() {
                assert_eq!(lapic.len(), 8);
                assert_eq!(usize::from(lapic[2]), i, "processor UID");
                assert_eq!(usize::from(lapic[3]), i, "APIC id");
                assert_eq!(u32_at(lapic, 4), 1, "enabled");
            }
        }
    }

    #[test]
    fn madt_has_ioapic_sci_override_and_nmi_but_no_irq0_override() {
        let (_, tables) = build(4);
        let entries = madt_entries(&tables[b"APIC"].1);
        let of_type = |t: u8| -> Vec<Vec<u8>> {
            entries
                .iter()
                .filter(|(ty, _)| *ty == t)
                .map(|(_, e)| e.clone())
                .collect()
        };
        let ioapics = of_type(1);
        assert_eq!(ioapics.len(), 1);
        assert_eq!(ioapics[0].len(), 12);
        assert_eq!(ioapics[0][2], IOAPIC_ID);
        assert_eq!(u64::from(u32_at(&ioapics[0], 4)), layout::IOAPIC_START);
        assert_eq!(u32_at(&ioapics[0], 8), 0, "GSI base");

        let overrides = of_type(MADT_TYPE_ISO);
        assert_eq!(overrides.len(), 1, "only the SCI is overridden");
        let iso = &overrides[0];
        assert_eq!(iso.len(), 10);
        assert_eq!(
            (iso[2], u32::from(iso[3])),
            (0, ports::SCI_IRQ),
            "ISA IRQ 9"
        );
        assert_eq!(u32_at(iso, 4), ports::SCI_IRQ, "GSI 9");
        assert_eq!(u16_at(iso, 8) & 0b11, 0b01, "active high");
        assert_eq!((u16_at(iso, 8) >> 2) & 0b11, 0b11, "level-triggered");

        let nmis = of_type(MADT_TYPE_LAPIC_NMI);
        assert_eq!(nmis, vec![vec![MADT_TYPE_LAPIC_NMI, 6, 0xff, 0, 0, 1]]);
    }

    /// Decodes an AML PkgLength at `b[0..]`: (length, bytes used by the encoding).
    fn pkg_length(b: &[u8]) -> (usize, usize) {
        let follow = usize::from(b[0] >> 6);
        if follow == 0 {
            return (usize::from(b[0] & 0x3f), 1);
        }
        let mut len = usize::from(b[0] & 0x0f);
        for i in 0..follow {
            len |= usize::from(b[1 + i]) << (4 + 8 * i);
        }
        (len, 1 + follow)
    }

    fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    #[test]
    fn dsdt_has_s5_package_starting_with_slp_typ_5() {
        let (_, tables) = build(1);
        let dsdt = &tables[b"DSDT"].1;
        assert_eq!(dsdt[8], DSDT_REVISION);
        // NameOp '\' "_S5_" PackageOp PkgLength NumElements BytePrefix 5 BytePrefix 5 Zero Zero
        let at = find(dsdt, b"_S5_").expect("_S5_ in the DSDT");
        assert_eq!(&dsdt[at - 2..at], &[0x08, b'\\'], "NameOp at the root");
        let pkg = &dsdt[at + 4..];
        assert_eq!(pkg[0], 0x12, "PackageOp");
        let (len, used) = pkg_length(&pkg[1..]);
        let body = &pkg[1 + used..1 + len];
        assert_eq!(
            body,
            &[4, 0x0a, ports::S5_SLP_TYP, 0x0a, ports::S5_SLP_TYP, 0, 0]
        );
    }

    #[test]
    fn dsdt_describes_com1_and_pvpanic() {
        let (_, tables) = build(1);
        let dsdt = &tables[b"DSDT"].1;
        assert!(find(dsdt, b"_SB_").is_some());
        // EISAID("PNP0501") = 0x0105d041 as a DWord.
        assert!(find(
            dsdt,
            &[0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x05, 0x01]
        )
        .is_some());
        let [lo, hi] = ports::COM1.to_le_bytes();
        assert!(
            find(dsdt, &[0x47, 1, lo, hi, lo, hi, 1, 8]).is_some(),
            "IO(0x3f8, len 8)"
        );
        assert!(
            find(dsdt, &[0x22, 1 << ports::COM1_IRQ, 0]).is_some(),
            "IRQNoFlags {{4}}"
        );
        assert!(
            find(dsdt, b"\x0dQEMU0001\0").is_some(),
            "pvpanic _HID string"
        );
        let [lo, hi] = ports::PVPANIC.to_le_bytes();
        assert!(
            find(dsdt, &[0x47, 1, lo, hi, lo, hi, 1, 1]).is_some(),
            "IO(0x505, len 1)"
        );
        let sta = [0x08, b'_', b'S', b'T', b'A', 0x0a, 0x0f];
        assert_eq!(dsdt.windows(sta.len()).filter(|w| *w == sta).count(), 2);
    }

    #[test]
    fn cpu_counts_outside_1_to_32_are_refused() {
        let mem = guest_memory();
        for num_cpus in [0, MAX_CPUS + 1, u8::MAX] {
            let err = write_acpi_tables(&mem, &AcpiConfig::new(num_cpus)).expect_err("refused");
            assert!(matches!(err, AcpiError::InvalidCpuCount(n) if n == num_cpus));
        }
    }

    #[test]
    fn memory_without_the_acpi_area_is_an_error() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).expect("512 KiB");
        let err = write_acpi_tables(&mem, &AcpiConfig::new(1)).expect_err("no ACPI area");
        assert!(matches!(err, AcpiError::Write { .. }), "{err}");
    }

    #[test]
    fn tables_past_the_acpi_area_are_refused() {
        let mut area = TableArea::new();
        let room = (layout::ACPI_END - layout::RSDP_START - RSDP_LEN - 8) as usize;
        area.place(*b"BIG1", vec![0; room], SDT_ALIGN)
            .expect("fits exactly");
        let err = area
            .place(*b"BIG2", vec![0; 1], SDT_ALIGN)
            .expect_err("one byte too many");
        assert!(matches!(err, AcpiError::NoSpace { end, limit } if end > limit));
    }

    #[test]
    fn oem_id_is_configurable() {
        let mem = guest_memory();
        let cfg = AcpiConfig {
            num_cpus: 2,
            oem_id: *b"TESTID",
            pci: Some(PciAcpi::standard(0)),
        };
        let rsdp = write_acpi_tables(&mem, &cfg).expect("tables fit");
        for (_, (_, table)) in walk(&mem, rsdp).iter().filter(|(s, _)| *s != b"FACS") {
            assert_eq!(&table[10..16], b"TESTID");
        }
    }
}
