//! ACPI: RSDP -> XSDT/RSDT -> MADT (CPUs), FADT (power-off and reset registers), DSDT (`_S5_`).

use crate::phys;

/// A Generic Address Structure.
#[derive(Clone, Copy)]
pub struct Gas {
    /// 0 = system memory, 1 = system I/O.
    pub space: u8,
    /// Register width in bits.
    pub bit_width: u8,
    /// Access size code (1 = byte ... 4 = qword), 0 = unspecified.
    pub access: u8,
    /// Address.
    pub addr: u64,
}

impl Gas {
    fn read(at: u64) -> Option<Gas> {
        let g = Gas {
            space: phys::r8(at),
            bit_width: phys::r8(at + 1),
            access: phys::r8(at + 3),
            addr: phys::r64(at + 4),
        };
        (g.addr != 0).then_some(g)
    }

    /// Access width in bytes.
    fn width(&self, default: u8) -> u8 {
        match (self.access, self.bit_width) {
            (1..=4, _) => 1 << (self.access - 1),
            (0, 8) => 1,
            (0, 16) => 2,
            (0, 32) => 4,
            (0, 64) => 8,
            _ => default,
        }
    }

    /// Writes `val` to the register (I/O or memory space); false for other spaces.
    pub fn write(&self, val: u64, default_width: u8) -> bool {
        let w = self.width(default_width);
        match self.space {
            0 => phys::write(self.addr, w, val),
            1 if self.addr <= 0xffff => {
                let port = self.addr as u16;
                match w {
                    1 => crate::cpu::outb(port, val as u8),
                    2 => crate::cpu::outw(port, val as u16),
                    _ => crate::cpu::outl(port, val as u32),
                }
            }
            _ => return false,
        }
        true
    }
}

/// Everything the probe takes from ACPI.
pub struct Acpi {
    /// OEM id from the RSDP.
    pub oem: [u8; 6],
    /// MADT address (0 if none).
    pub madt: u64,
    /// Enabled processors in the MADT.
    pub ncpus: u32,
    /// FADT address (0 if none).
    pub fadt: u64,
    /// FADT flags.
    pub fadt_flags: u32,
    /// DSDT address and length.
    pub dsdt: (u64, u64),
    /// PM1a control block.
    pub pm1a_cnt: Option<Gas>,
    /// HW-reduced sleep control register.
    pub sleep_ctl: Option<Gas>,
    /// Reset register and value.
    pub reset: Option<(Gas, u8)>,
    /// SLP_TYP for S5 from the DSDT (filled in by the caller, which may scan at CPL3).
    pub s5: Option<u8>,
    /// PCIe ECAM base of segment 0 bus 0 from the MCFG (0 if none).
    pub ecam: u64,
}

/// FADT flag: HW_REDUCED_ACPI.
pub const FADT_HW_REDUCED: u32 = 1 << 20;
/// FADT flag: RESET_REG_SUP.
pub const FADT_RESET_SUP: u32 = 1 << 10;

/// Finds the RSDP: the loader's pointer if it has the signature, else a scan of 0xE0000..0x100000.
pub fn find_rsdp(hint: u64) -> u64 {
    if hint != 0 && phys::bytes(hint, 8) == b"RSD PTR " {
        return hint;
    }
    let mut a = 0xe0000;
    while a < 0x100000 {
        if phys::r64(a) == u64::from_le_bytes(*b"RSD PTR ") {
            return a;
        }
        a += 16;
    }
    0
}

impl Acpi {
    /// Parses the tables reachable from the RSDP at `rsdp`.
    pub fn parse(rsdp: u64) -> Acpi {
        let mut a = Acpi {
            oem: [b' '; 6],
            madt: 0,
            ncpus: 0,
            fadt: 0,
            fadt_flags: 0,
            dsdt: (0, 0),
            pm1a_cnt: None,
            sleep_ctl: None,
            reset: None,
            s5: None,
            ecam: 0,
        };
        if rsdp == 0 {
            return a;
        }
        a.oem.copy_from_slice(phys::bytes(rsdp + 9, 6));
        let rev = phys::r8(rsdp + 15);
        let xsdt = if rev >= 2 { phys::r64(rsdp + 24) } else { 0 };
        let (root, esize) = if xsdt != 0 {
            (xsdt, 8)
        } else {
            (phys::r32(rsdp + 16) as u64, 4)
        };
        let len = phys::r32(root + 4) as u64;
        if root == 0 || !(36..=0x10000).contains(&len) {
            return a;
        }
        let mut p = root + 36;
        while p + esize <= root + len {
            let t = if esize == 8 {
                phys::r64(p)
            } else {
                phys::r32(p) as u64
            };
            match phys::bytes(t, 4) {
                b"APIC" => a.parse_madt(t),
                b"FACP" => a.parse_fadt(t),
                b"MCFG" => a.parse_mcfg(t),
                _ => {}
            }
            p += esize;
        }
        a
    }

    fn parse_madt(&mut self, t: u64) {
        self.madt = t;
        self.ncpus = self.cpus().count() as u32;
    }

    /// APIC ids of the enabled processors (MADT types 0 and 9), in MADT order. Walks the table
    /// each time: cheaper at CPL0 than keeping (and copying) a list.
    pub fn cpus(&self) -> impl Iterator<Item = u32> {
        let t = self.madt;
        let end = if t == 0 {
            0
        } else {
            t + phys::r32(t + 4) as u64
        };
        let mut p = t + 44;
        core::iter::from_fn(move || {
            while p + 2 <= end {
                let (kind, elen) = (phys::r8(p), phys::r8(p + 1) as u64);
                if elen < 2 {
                    return None;
                }
                let at = p;
                p += elen;
                match kind {
                    0 if phys::r32(at + 4) & 1 != 0 => return Some(phys::r8(at + 3) as u32),
                    9 if phys::r32(at + 8) & 1 != 0 => return Some(phys::r32(at + 4)),
                    _ => {}
                }
            }
            None
        })
    }

    /// MCFG: 16-byte allocations from offset 44 (base, segment, start bus, end bus). The base
    /// addresses bus 0 of the segment, so only an allocation starting at bus 0 is taken.
    fn parse_mcfg(&mut self, t: u64) {
        let end = t + (phys::r32(t + 4) as u64).min(0x1000);
        let mut p = t + 44;
        while p + 16 <= end {
            if phys::r32(p + 8) & 0xffff == 0 && phys::r8(p + 10) == 0 && self.ecam == 0 {
                self.ecam = phys::r64(p);
            }
            p += 16;
        }
    }

    fn parse_fadt(&mut self, t: u64) {
        let len = phys::r32(t + 4) as u64;
        self.fadt = t;
        self.fadt_flags = if len >= 116 { phys::r32(t + 112) } else { 0 };
        let mut dsdt = phys::r32(t + 40) as u64;
        if len >= 148 && phys::r64(t + 140) != 0 {
            dsdt = phys::r64(t + 140);
        }
        if dsdt != 0 && phys::bytes(dsdt, 4) == b"DSDT" {
            self.dsdt = (dsdt, phys::r32(dsdt + 4) as u64);
        }
        let pm1a = phys::r32(t + 64) as u64;
        self.pm1a_cnt = if len >= 184 { Gas::read(t + 172) } else { None };
        if self.pm1a_cnt.is_none() && pm1a != 0 {
            self.pm1a_cnt = Some(Gas {
                space: 1,
                bit_width: 16,
                access: 2,
                addr: pm1a,
            });
        }
        if len >= 256 {
            self.sleep_ctl = Gas::read(t + 244);
        }
        if len >= 129 && self.fadt_flags & FADT_RESET_SUP != 0 {
            self.reset = Gas::read(t + 116).map(|g| (g, phys::r8(t + 128)));
        }
    }

    /// Whether the FADT says HW-reduced ACPI.
    pub fn hw_reduced(&self) -> bool {
        self.fadt_flags & FADT_HW_REDUCED != 0
    }

    /// The OEM id with trailing blanks removed.
    pub fn oem_trimmed(&self) -> &[u8] {
        let mut n = self.oem.len();
        while n > 0 && (self.oem[n - 1] == b' ' || self.oem[n - 1] == 0) {
            n -= 1;
        }
        &self.oem[..n]
    }
}

/// Finds the SLP_TYP value of `_S5_` in AML bytes `[addr, addr + len)`: `_S5_`, PackageOp,
/// PkgLength, NumElements, then the first element. Returns the value, or 0xff00 when absent.
/// A plain data walk, so it can run at CPL3.
pub fn find_s5(dsdt: u64) -> u64 {
    let len = phys::r32(dsdt + 4) as u64;
    let aml = phys::bytes(dsdt, len);
    let mut i = 36;
    while i + 4 <= aml.len() {
        if &aml[i..i + 4] == b"_S5_" {
            if let Some(v) = s5_package(&aml[i + 4..]) {
                return v as u64;
            }
        }
        i += 1;
    }
    0xff00
}

fn s5_package(p: &[u8]) -> Option<u8> {
    if p.first() != Some(&0x12) {
        return None;
    }
    let lead = *p.get(1)?;
    let follow = (lead >> 6) as usize;
    let first = 1 + 1 + follow + 1; // PackageOp, PkgLength, NumElements
    match *p.get(first)? {
        0x0a => p.get(first + 1).copied(),
        0x00 => Some(0),
        0x01 => Some(1),
        0xff => Some(0xff),
        _ => None,
    }
}

/// The ECAM base a DSDT gives its PCIe host bridge as `Name (_CBA, <integer>)` (QEMU microvm
/// has no MCFG), or 0. A plain data walk like `find_s5`, run at CPL3.
pub fn find_cba(dsdt: u64) -> u64 {
    let len = phys::r32(dsdt + 4) as u64;
    let aml = phys::bytes(dsdt, len);
    let mut i = 36;
    while i + 13 <= aml.len() {
        if &aml[i..i + 4] == b"_CBA" {
            let v = &aml[i + 5..];
            let n = match aml[i + 4] {
                0x0c => 4,
                0x0e => 8,
                _ => 0,
            };
            if n != 0 {
                let mut b = [0u8; 8];
                b[..n].copy_from_slice(&v[..n]);
                return u64::from_le_bytes(b);
            }
        }
        i += 1;
    }
    0
}
