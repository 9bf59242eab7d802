//! virtio-balloon from `--balloon[ target=SIZE]`: a [`ferro_virtio::balloon::Balloon`] whose
//! inflated pages go back to the host with `madvise(MADV_DONTNEED)` on the guest-memory
//! mapping (anonymous private memory: the host frees the pages, RSS drops; a later guest touch
//! faults in a zero page). The [`BalloonHandle`] sets the target from the VMM's side.

use std::sync::Arc;

use ferro_virtio::balloon::{Balloon, BalloonHandle, PageReclaim, PAGE};
use ferro_virtio::VirtioDevice;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::memory::GuestMemory;
use crate::VmmError;

/// Frees guest pages in the host.
struct Madvise(GuestMemory);

impl PageReclaim for Madvise {
    fn discard(&self, addr: GuestAddress, len: u64) -> std::io::Result<()> {
        let mut at = addr;
        let end = addr
            .0
            .checked_add(len)
            .ok_or_else(|| std::io::Error::other("range overflows"))?;
        // A run may cross from one region into the next: one madvise per region.
        while at.0 < end {
            let region = self
                .0
                .find_region(at)
                .ok_or_else(|| std::io::Error::other(format!("{:#x} is not RAM", at.0)))?;
            let off = at.0 - region.start_addr().0;
            let n = (region.len() - off).min(end - at.0);
            let host = region
                .get_host_address(MemoryRegionAddress(off))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            if !(host as usize).is_multiple_of(PAGE as usize) || !n.is_multiple_of(PAGE) {
                return Err(std::io::Error::other("unaligned range"));
            }
            // `host..host + n` lies inside this region's mapping (off + n <= len), which `self.0`
            // keeps mapped; MADV_DONTNEED on private anonymous memory only drops the pages'
            // contents (the guest gave them up: it reads zeroes if it touches them again).
            // SAFETY: it never unmaps anything Rust or KVM refer to, as argued just above.
            let r = unsafe { libc::madvise(host.cast(), n as usize, libc::MADV_DONTNEED) };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The pages read as zeros now: a live migration must send them again.
            vm_memory::bitmap::Bitmap::mark_dirty(&region.bitmap(), off as usize, n as usize);
            at = GuestAddress(at.0 + n);
        }
        Ok(())
    }
}

/// Appends the balloon `balloon` asks for to `out`; its handle is for the control side.
pub fn create(
    balloon: bool,
    target_mib: Option<u64>,
    mem: &GuestMemory,
    out: &mut Vec<Box<dyn VirtioDevice>>,
) -> Result<Option<BalloonHandle>, VmmError> {
    if !balloon {
        return Ok(None);
    }
    let pages = target_mib.unwrap_or(0).saturating_mul((1 << 20) / PAGE);
    let pages =
        u32::try_from(pages).map_err(|_| VmmError::Devices("balloon: target too large".into()))?;
    let dev = Balloon::new(pages, Arc::new(Madvise(mem.clone())))
        .map_err(|e| VmmError::Devices(format!("balloon: {e}")))?;
    let handle = dev.handle();
    out.push(Box::new(dev));
    Ok(Some(handle))
}
