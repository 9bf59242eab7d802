//! ACPI description of the PCI root complex: the MCFG table (PCIe ECAM of segment 0, bus 0),
//! the `\_SB.PCI0` host bridge (PNP0A08, compatible PNP0A03) with its resources, and a PNP0C02
//! motherboard-resources device that reserves the ECAM range, which Linux requires before it
//! uses MMCONFIG.

use acpi_tables::aml::{self, AddressSpace, AddressSpaceCacheable};
use acpi_tables::mcfg::MCFG;
use acpi_tables::Aml;

use super::{aml_bytes, AcpiConfig, OEM_REVISION, OEM_TABLE_ID};
use crate::layout::ports;

/// Where the PCI root complex's resources are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciAcpi {
    /// ECAM base of bus 0.
    pub ecam: u64,
    /// ECAM size (1 MiB per bus).
    pub ecam_size: u64,
    /// 32-bit memory window (start, size).
    pub mmio32: (u64, u64),
    /// 64-bit memory window (start, size), if any.
    pub mmio64: Option<(u64, u64)>,
}

impl PciAcpi {
    /// The standard layout of `crate::layout` for a VM with `high_ram` bytes above 4 GiB.
    pub fn standard(high_ram: u64) -> Self {
        use crate::layout::*;
        Self {
            ecam: PCI_ECAM_START,
            ecam_size: PCI_ECAM_SIZE,
            mmio32: (PCI_MMIO32_START, PCI_MMIO32_SIZE),
            mmio64: Some(pci_mmio64_window(high_ram)),
        }
    }

    /// Last bus number the ECAM covers.
    fn end_bus(&self) -> u8 {
        (self.ecam_size >> 20).saturating_sub(1).min(255) as u8
    }
}

/// The MCFG table: one ECAM allocation for segment 0 from bus 0.
pub(super) fn mcfg(cfg: &AcpiConfig, pci: &PciAcpi) -> Vec<u8> {
    let mut t = MCFG::new(cfg.oem_id, OEM_TABLE_ID, OEM_REVISION);
    t.add_ecam(pci.ecam, 0, 0, pci.end_bus());
    aml_bytes(&t)
}

/// `\_SB.PCI0` and `\_SB.MRES`.
pub(super) fn devices(pci: &PciAcpi) -> Vec<u8> {
    let buses = AddressSpace::<u16>::new_bus_number(0, u16::from(pci.end_bus()));
    let cfg_io = aml::IO::new(ports::PCI_CONFIG_ADDRESS, ports::PCI_CONFIG_ADDRESS, 1, 8);
    let (s32, l32) = pci.mmio32;
    let mem32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        s32 as u32,
        (s32 + l32 - 1) as u32,
        None,
    );
    let mem64 = pci.mmio64.map(|(s, l)| {
        AddressSpace::<u64>::new_memory(AddressSpaceCacheable::Cacheable, true, s, s + l - 1, None)
    });
    let mut res: Vec<&dyn Aml> = vec![&buses, &cfg_io, &mem32];
    if let Some(m) = &mem64 {
        res.push(m);
    }
    let crs = aml::ResourceTemplate::new(res);
    let mut out = aml_bytes(&aml::Device::new(
        aml::Path::new("PCI0"),
        vec![
            &aml::Name::new(aml::Path::new("_HID"), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new(aml::Path::new("_CID"), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new(aml::Path::new("_SEG"), &aml::ZERO),
            &aml::Name::new(aml::Path::new("_BBN"), &aml::ZERO),
            &aml::Name::new(aml::Path::new("_UID"), &aml::ZERO),
            &aml::Name::new(aml::Path::new("_CRS"), &crs),
        ],
    ));
    let ecam = aml::Memory32Fixed::new(false, pci.ecam as u32, pci.ecam_size as u32);
    let crs = aml::ResourceTemplate::new(vec![&ecam]);
    out.extend(aml_bytes(&aml::Device::new(
        aml::Path::new("MRES"),
        vec![
            &aml::Name::new(aml::Path::new("_HID"), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new(aml::Path::new("_UID"), &aml::ONE),
            &aml::Name::new(aml::Path::new("_CRS"), &crs),
        ],
    )));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(h: &[u8], n: &[u8]) -> Option<usize> {
        h.windows(n.len()).position(|w| w == n)
    }

    #[test]
    fn mcfg_has_one_allocation_for_bus_0() {
        let cfg = AcpiConfig::new(1);
        let pci = PciAcpi::standard(0);
        let t = mcfg(&cfg, &pci);
        assert_eq!(&t[..4], b"MCFG");
        assert_eq!(t.len(), 44 + 16);
        assert_eq!(u64::from_le_bytes(t[44..52].try_into().unwrap()), pci.ecam);
        assert_eq!(&t[52..56], &[0, 0, 0, 0], "segment 0, bus 0..0");
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }

    #[test]
    fn host_bridge_resources() {
        let pci = PciAcpi::standard(0);
        let aml = devices(&pci);
        // EISAID("PNP0A08") = 0x080ad041, EISAID("PNP0A03") = 0x030ad041, PNP0C02 = 0x020cd041.
        assert!(find(&aml, &[0x0c, 0x41, 0xd0, 0x0a, 0x08]).is_some());
        assert!(find(&aml, &[0x0c, 0x41, 0xd0, 0x0a, 0x03]).is_some());
        assert!(find(&aml, &[0x0c, 0x41, 0xd0, 0x0c, 0x02]).is_some());
        // IO(Decode16, 0xcf8, 0xcf8, 1, 8).
        assert!(find(&aml, &[0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]).is_some());
        // Memory32Fixed(ReadOnly, ECAM, 1 MiB).
        let mut m = vec![0x86, 9, 0, 0];
        m.extend_from_slice(&(pci.ecam as u32).to_le_bytes());
        m.extend_from_slice(&(pci.ecam_size as u32).to_le_bytes());
        assert!(find(&aml, &m).is_some());
        // DWordMemory min/max of the 32-bit window.
        let mut w = (pci.mmio32.0 as u32).to_le_bytes().to_vec();
        w.extend_from_slice(&((pci.mmio32.0 + pci.mmio32.1 - 1) as u32).to_le_bytes());
        assert!(find(&aml, &w).is_some());
        for name in [b"_SEG", b"_BBN", b"_UID", b"_CRS"] {
            assert!(find(&aml, name).is_some());
        }
    }
}
