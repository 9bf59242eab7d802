//! Loading the kernel and initrd into guest memory, and choosing how the kernel is entered.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use ferro_arch::boot::{place_initrd, InitrdPlacement};
use ferro_arch::layout::HIGH_RAM_START;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;
use crate::VmmError;

/// Offset of `startup_64` from the start of a bzImage's protected-mode code.
const BZIMAGE_STARTUP_64: u64 = 0x200;

/// What kind of kernel file this is, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF64 executable (PVH kernel or Linux vmlinux).
    Elf,
    /// A Linux bzImage.
    BzImage,
}

/// How to enter an ELF kernel that carries a PVH note.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BootProtocol {
    /// PVH if the ELF has a PVH note, the Linux 64-bit protocol otherwise.
    #[default]
    Auto,
    /// Always the Linux 64-bit boot protocol (vmlinux, bzImage).
    Linux,
}

/// A kernel in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// How to enter it.
    pub entry: KernelEntry,
    /// First byte past the loaded image.
    pub end: u64,
    /// The bzImage setup header, for the zero page.
    pub header: Option<setup_header>,
}

/// Where execution begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelEntry {
    /// 32-bit PVH entry point.
    Pvh(u64),
    /// 64-bit Linux entry point.
    Linux64(u64),
}

fn open(what: &'static str, path: &Path) -> Result<File, VmmError> {
    let file = File::open(path).map_err(|source| VmmError::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| VmmError::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(VmmError::ReadFile {
            what,
            path: path.to_path_buf(),
            source: std::io::Error::other("not a regular file"),
        });
    }
    Ok(file)
}

/// Recognises a kernel file by its magic numbers.
pub fn detect(file: &mut File) -> Option<KernelFormat> {
    let mut head = [0u8; 0x206];
    let n = file.read(&mut head).ok()?;
    file.rewind().ok()?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Some(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Some(KernelFormat::BzImage);
    }
    None
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(
    mem: &GuestMemory,
    path: &Path,
    protocol: BootProtocol,
) -> Result<LoadedKernel, VmmError> {
    let mut file = open("kernel", path)?;
    let format = detect(&mut file).ok_or_else(|| VmmError::NotAKernel(path.to_path_buf()))?;
    let load_err = |e: linux_loader::loader::Error| VmmError::KernelLoad {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let high = Some(GuestAddress(HIGH_RAM_START));
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, high).map_err(load_err)?;
            let entry = match (r.pvh_boot_cap, protocol) {
                (PvhBootCapability::PvhEntryPresent(addr), BootProtocol::Auto) => {
                    KernelEntry::Pvh(addr.0)
                }
                _ => KernelEntry::Linux64(r.kernel_load.0),
            };
            Ok(LoadedKernel {
                entry,
                end: r.kernel_end,
                header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, high).map_err(load_err)?;
            let header = r.setup_header.ok_or_else(|| VmmError::KernelLoad {
                path: path.to_path_buf(),
                reason: "bzImage has no setup header".into(),
            })?;
            if header.version < 0x020c {
                return Err(VmmError::KernelLoad {
                    path: path.to_path_buf(),
                    reason: format!(
                        "boot protocol {:#x} is too old for a 64-bit entry (2.12 needed)",
                        { header.version }
                    ),
                });
            }
            // The kernel decompresses itself up to pref_address + init_size.
            let end = (header.pref_address + u64::from(header.init_size)).max(r.kernel_end);
            Ok(LoadedKernel {
                entry: KernelEntry::Linux64(r.kernel_load.0 + BZIMAGE_STARTUP_64),
                end,
                header: Some(header),
            })
        }
    }
}

/// Loads the initrd at the top of RAM below `ceiling`, above the kernel.
pub fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    ceiling: u64,
) -> Result<InitrdPlacement, VmmError> {
    let mut file = open("initrd", path)?;
    let read_err = |source| VmmError::ReadFile {
        what: "initrd",
        path: path.to_path_buf(),
        source,
    };
    let size = file.seek(SeekFrom::End(0)).map_err(read_err)?;
    file.rewind().map_err(read_err)?;
    let floor = (kernel_end + 0xfff) & !0xfff;
    let place = place_initrd(size, floor, ceiling)?;
    mem.read_exact_volatile_from(GuestAddress(place.addr), &mut file, size as usize)
        .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
    Ok(place)
}
