//! Handing a loaded kernel what it needs to start: the PVH `hvm_start_info` (for ELF kernels
//! with a PVH note) or the Linux `boot_params` zero page (for bzImage and vmlinux through the
//! 64-bit boot protocol), and where the initrd goes.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::layout::{
    PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::memory_map::MapEntry;

/// Magic of `hvm_start_info`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Magic of the Linux setup header ("HdrS").
const LINUX_HDR_MAGIC: u32 = 0x5372_6448;
/// Boot flag at the end of the boot sector.
const LINUX_BOOT_FLAG: u16 = 0xaa55;
/// `type_of_loader`: undefined boot loader.
const LOADER_TYPE_OTHER: u8 = 0xff;
/// `loadflags`: the protected-mode kernel is loaded high, keep the heap.
const LOADFLAGS_LOADED_HIGH_CAN_USE_HEAP: u8 = 0x01 | 0x80;
/// Most e820 entries `boot_params` holds.
const E820_MAX_ENTRIES_ZEROPAGE: usize = 128;

/// The boot structures could not be written.
#[derive(Debug, Error)]
pub enum BootError {
    /// Too many memory map entries.
    #[error("memory map has {0} entries, more than the boot protocol holds")]
    MemmapTooLarge(usize),
    /// linux-loader refused the structures.
    #[error("cannot write boot parameters: {0}")]
    Write(#[from] linux_loader::configurator::Error),
    /// The initrd does not fit below the limit.
    #[error("initrd of {size} bytes does not fit in guest RAM between {floor:#x} and {ceiling:#x}: give the VM more memory")]
    InitrdTooLarge {
        /// Size of the initrd.
        size: u64,
        /// Lowest usable address (end of the kernel).
        floor: u64,
        /// Highest usable address.
        ceiling: u64,
    },
}

/// Where the initrd was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest-physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Picks the page-aligned address at the top of `floor..ceiling` for an initrd of `size` bytes,
/// which is where Linux boot loaders conventionally put it.
pub fn place_initrd(size: u64, floor: u64, ceiling: u64) -> Result<InitrdPlacement, BootError> {
    let err = || BootError::InitrdTooLarge {
        size,
        floor,
        ceiling,
    };
    let addr = ceiling.checked_sub(size).ok_or_else(err)? & !0xfff;
    if addr < floor {
        return Err(err());
    }
    Ok(InitrdPlacement { addr, size })
}

/// Writes `hvm_start_info`, its memory map and the initrd module entry for a PVH entry.
pub fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    cmdline: GuestAddress,
    rsdp: GuestAddress,
    initrd: Option<InitrdPlacement>,
    map: &[MapEntry],
) -> Result<GuestAddress, BootError> {
    if map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::MemmapTooLarge(map.len()));
    }
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.start,
            size: e.size,
            type_: e.kind.e820_type(),
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        flags: 0,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() {
            PVH_MODLIST_START
        } else {
            0
        },
        cmdline_paddr: cmdline.0,
        rsdp_paddr: rsdp.0,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    let start = GuestAddress(PVH_INFO_START);
    let mut params = BootParams::new(&info, start);
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some(rd) = initrd {
        let module = hvm_modlist_entry {
            paddr: rd.addr,
            size: rd.size,
            cmdline_paddr: 0,
            reserved: 0,
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)?;
    Ok(start)
}

/// Everything the zero page says about this boot.
pub struct LinuxBoot<'a> {
    /// The bzImage's setup header, or `None` for a vmlinux ELF.
    pub header: Option<setup_header>,
    /// Command line address and length (without the NUL).
    pub cmdline: (GuestAddress, usize),
    /// The initrd, if any.
    pub initrd: Option<InitrdPlacement>,
    /// The memory map.
    pub map: &'a [MapEntry],
    /// Where the ACPI RSDP is.
    pub rsdp: GuestAddress,
}

/// Writes the Linux zero page for the 64-bit boot protocol and returns its address.
pub fn write_linux_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    boot: &LinuxBoot<'_>,
) -> Result<GuestAddress, BootError> {
    if boot.map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootError::MemmapTooLarge(boot.map.len()));
    }
    let mut params = boot_params::default();
    if let Some(h) = boot.header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = LINUX_BOOT_FLAG;
        params.hdr.header = LINUX_HDR_MAGIC;
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = LOADER_TYPE_OTHER;
    params.hdr.loadflags |= LOADFLAGS_LOADED_HIGH_CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = boot.cmdline.0 .0 as u32;
    params.hdr.cmdline_size = boot.cmdline.1 as u32;
    if let Some(rd) = boot.initrd {
        params.hdr.ramdisk_image = rd.addr as u32;
        params.hdr.ramdisk_size = rd.size as u32;
        params.ext_ramdisk_image = (rd.addr >> 32) as u32;
        params.ext_ramdisk_size = (rd.size >> 32) as u32;
    }
    params.acpi_rsdp_addr = boot.rsdp.0;
    for (slot, e) in params.e820_table.iter_mut().zip(boot.map) {
        *slot = boot_e820_entry {
            addr: e.start,
            size: e.size,
            r#type: e.kind.e820_type(),
        };
    }
    params.e820_entries = boot.map.len() as u8;
    let start = GuestAddress(ZERO_PAGE_START);
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, start), mem)?;
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory_map::RamLayout;
    use vm_memory::{Bytes, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn initrd_goes_to_the_top() {
        let p = place_initrd(0x1800, 0x100000, 0x200000).unwrap();
        assert_eq!(p.addr, 0x1fe000);
        assert!(place_initrd(0x200000, 0x100000, 0x200000).is_err());
        assert!(place_initrd(u64::MAX, 0, 0x200000).is_err());
    }

    #[test]
    fn pvh_start_info_fields() {
        let m = mem();
        let map = RamLayout::new(16 << 20).memory_map();
        let rd = InitrdPlacement {
            addr: 0xf00000,
            size: 0x1234,
        };
        let at = write_pvh_start_info(
            &m,
            GuestAddress(0x20000),
            GuestAddress(0xe0000),
            Some(rd),
            &map,
        )
        .unwrap();
        let info: hvm_start_info = m.read_obj(at).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.memmap_entries as usize, map.len());
        assert_eq!(info.rsdp_paddr, 0xe0000);
        assert_eq!(info.cmdline_paddr, 0x20000);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0xf00000, 0x1234));
        let last: hvm_memmap_table_entry = m
            .read_obj(GuestAddress(
                info.memmap_paddr + 24 * (u64::from(info.memmap_entries) - 1),
            ))
            .unwrap();
        assert_eq!(last.type_, 1);
        assert_eq!(last.addr + last.size, 16 << 20);
        // The memory map ends before the zero page.
        assert!(PVH_MEMMAP_START + 24 * PVH_MEMMAP_MAX_ENTRIES as u64 <= ZERO_PAGE_START);
    }

    #[test]
    fn zero_page_fields() {
        let m = mem();
        let map = RamLayout::new(16 << 20).memory_map();
        let at = write_linux_boot_params(
            &m,
            &LinuxBoot {
                header: None,
                cmdline: (GuestAddress(0x20000), 42),
                initrd: Some(InitrdPlacement {
                    addr: 0xf00000,
                    size: 0x1000,
                }),
                map: &map,
                rsdp: GuestAddress(0xe0000),
            },
        )
        .unwrap();
        let p: boot_params = m.read_obj(at).unwrap();
        assert_eq!({ p.hdr.header }, LINUX_HDR_MAGIC);
        assert_eq!({ p.hdr.boot_flag }, LINUX_BOOT_FLAG);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0xf00000);
        assert_eq!({ p.hdr.type_of_loader }, LOADER_TYPE_OTHER);
        assert_eq!(p.e820_entries as usize, map.len());
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        let e = p.e820_table[map.len() - 1];
        assert_eq!({ e.addr } + { e.size }, 16 << 20);
    }

    #[test]
    fn too_many_entries_rejected() {
        let m = mem();
        let entry = MapEntry {
            start: 0,
            size: 1,
            kind: crate::memory_map::RegionKind::Ram,
        };
        let map = vec![entry; 200];
        assert!(matches!(
            write_pvh_start_info(&m, GuestAddress(0), GuestAddress(0), None, &map),
            Err(BootError::MemmapTooLarge(200))
        ));
    }
}
