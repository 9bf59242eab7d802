//! Guest RAM: anonymous host memory, split around the 32-bit MMIO hole and registered with KVM.

use ferro_arch::memory_map::RamLayout;
use ferro_hypervisor::Vm;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::VmmError;

/// The guest's memory.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Allocates `mib` MiB of guest RAM (reserved lazily: untouched pages cost nothing) and maps it
/// into the VM.
pub fn create(vm: &Vm, mib: u64) -> Result<(GuestMemory, RamLayout), VmmError> {
    let layout = RamLayout::new(mib << 20);
    let ranges: Vec<(GuestAddress, usize)> = layout
        .ranges()
        .into_iter()
        .map(|(a, s)| (GuestAddress(a), s as usize))
        .collect();
    let mem = allocate(&ranges).map_err(|e| VmmError::Memory {
        mib,
        reason: e.to_string(),
    })?;
    register(vm, &mem, mib)?;
    Ok((mem, layout))
}

/// Anonymous guest RAM for `ranges` with transparent huge pages where the host offers them
/// (THP in "madvise" mode), as QEMU asks for its guest RAM: O_DIRECT disk I/O straight into
/// guest memory pins far fewer pages, and the guest takes fewer TLB misses.
pub fn allocate(
    ranges: &[(GuestAddress, usize)],
) -> Result<GuestMemory, vm_memory::mmap::FromRangesError> {
    let mem = GuestMemory::from_ranges(ranges)?;
    advise_huge(&mem);
    Ok(mem)
}

/// Asks for transparent huge pages for `mem`'s anonymous regions. A refusal (THP off) only
/// costs speed. A migration's destination asks only once it has filled its memory: its huge
/// page faults (direct compaction, 2 MiB cleared at a time) made the receiving thread 4-5x
/// slower here (1.0-1.4 s of CPU for 448 MiB instead of 0.22-0.24 s); khugepaged merges the
/// filled pages later.
pub fn advise_huge(mem: &GuestMemory) {
    for region in mem.iter() {
        // SAFETY: advice on this region's own anonymous mapping, which `mem` owns; it changes
        // only how the kernel backs the pages, never their contents or the mapping.
        unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
    }
}

/// Maps every region of `mem` into the VM, one memory slot each. `mem` must live as long as the
/// VM (the process ends with the VM; memory is never unmapped before).
pub fn register(vm: &Vm, mem: &GuestMemory, mib: u64) -> Result<(), VmmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmmError::Memory {
                mib,
                reason: e.to_string(),
            })?;
        // SAFETY: `host` is the start of this region's mmap of `region.len()` bytes, owned by
        // `mem`, which the caller keeps alive for as long as the VM runs (the process ends with
        // the VM; memory is never unmapped before), as this function's contract says.
        unsafe {
            vm.map_memory(
                slot as u32,
                region.start_addr().0,
                region.len(),
                host as u64,
            )?;
        }
    }
    Ok(())
}

/// Turns KVM's dirty-page log on or off for every slot [`register`] made for `mem`.
pub fn set_dirty_logging(vm: &Vm, mem: &GuestMemory, on: bool) -> Result<(), VmmError> {
    for (slot, region) in mem.iter().enumerate() {
        // SAFETY: `register` made slot `slot` for exactly this region of `mem` (same order),
        // whose mapping the caller keeps for as long as the VM runs, as `register` requires;
        // only the logging flag changes.
        unsafe {
            vm.set_dirty_logging(
                slot as u32,
                region.start_addr().0,
                region.len(),
                region.as_ptr() as u64,
                on,
            )?;
        }
    }
    Ok(())
}

/// KVM's dirty log of every slot of `mem` (one bitmap per region, bit = 4 KiB page), read and
/// cleared.
pub fn dirty_log(vm: &Vm, mem: &GuestMemory) -> Result<Vec<Vec<u64>>, VmmError> {
    mem.iter()
        .enumerate()
        .map(|(slot, region)| Ok(vm.dirty_log(slot as u32, region.len())?))
        .collect()
}
