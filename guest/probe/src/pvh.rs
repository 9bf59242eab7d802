//! The PVH `hvm_start_info` handed over in EBX.

use crate::phys;

/// `hvm_start_info.magic`.
pub const MAGIC: u32 = 0x336e_c578;
/// Longest command line we read.
const CMDLINE_MAX: u64 = 0x10000;

/// What the probe uses from the start info.
pub struct StartInfo {
    /// Whether the magic matched.
    pub valid: bool,
    /// Command line bytes (without the NUL).
    pub cmdline: &'static [u8],
    /// RSDP physical address (0 if not given).
    pub rsdp: u64,
    /// Memory map physical address.
    pub memmap: u64,
    /// Number of memory map entries.
    pub memmap_entries: u32,
}

/// One memory map entry.
#[derive(Clone, Copy)]
pub struct MemEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type (1 = RAM).
    pub kind: u32,
}

impl StartInfo {
    /// Reads the start info at `paddr`.
    pub fn read(paddr: u64) -> StartInfo {
        let magic = phys::r32(paddr);
        if magic != MAGIC {
            return StartInfo {
                valid: false,
                cmdline: &[],
                rsdp: 0,
                memmap: 0,
                memmap_entries: 0,
            };
        }
        let version = phys::r32(paddr + 4);
        let cmd = phys::r64(paddr + 24);
        let mut cmdline: &[u8] = &[];
        if cmd != 0 {
            let mut len = 0;
            while len < CMDLINE_MAX && phys::r8(cmd + len) != 0 {
                len += 1;
            }
            cmdline = phys::bytes(cmd, len);
        }
        let (memmap, memmap_entries) = if version >= 1 {
            (phys::r64(paddr + 40), phys::r32(paddr + 48))
        } else {
            (0, 0)
        };
        StartInfo {
            valid: true,
            cmdline,
            rsdp: phys::r64(paddr + 32),
            memmap,
            memmap_entries,
        }
    }

    /// Memory map entry `i`.
    pub fn entry(&self, i: u32) -> MemEntry {
        let a = self.memmap + i as u64 * 24;
        MemEntry {
            addr: phys::r64(a),
            size: phys::r64(a + 8),
            kind: phys::r32(a + 16),
        }
    }

    /// Iterates the memory map.
    pub fn entries(&self) -> impl Iterator<Item = MemEntry> + '_ {
        (0..self.memmap_entries).map(|i| self.entry(i))
    }
}
