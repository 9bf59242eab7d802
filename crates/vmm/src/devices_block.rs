//! The VM's virtio-blk disks: every `--disk` image (and its backing chain) is opened before
//! anything touches KVM, so a missing file, a corrupt image or a missing backing file is one
//! line on stderr and exit status 1 with no VM created. Each disk becomes its own virtio-blk
//! PCI function, in the order given, after virtio-rng.
//!
//! [`flush_all`] flushes every opened image when the VM ends (power-off, reboot before the
//! VMM re-executes itself, a signal), as a disk keeps its contents across a power cycle:
//! without it, qcow2 metadata still in the image's cache would be lost when the process exits
//! (the guest's own FLUSH requests are honoured as they come, regardless).

use std::sync::{Arc, Mutex};

use ferro_disk::tracked::Tracked;
use ferro_disk::BlockBackend;

use ferro_api::{DiskCache, DiskConfig, DiskFormat};
use ferro_disk::{ImageFormat, OpenOptions};
use ferro_virtio::block::{Block, BlockConfig};
use ferro_virtio::VirtioDevice;

use crate::VmmError;

/// Every image this process opened, in `--disk` order, for [`flush_all`] and for a storage
/// migration's copy ([`opened`]).
static OPENED: Mutex<Vec<Arc<Tracked>>> = Mutex::new(Vec::new());

/// The disks this process opened, in configuration order, each with its write log.
pub fn opened() -> Vec<Arc<Tracked>> {
    OPENED.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Flushes every opened image; failures are reported on stderr (the VM is ending anyway).
pub fn flush_all() {
    let disks = OPENED.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for d in disks {
        if let Err(e) = d.flush() {
            eprintln!("ferro-vmm: flushing a disk at exit: {e}");
        }
    }
}

/// Opens the images of `disks`.
pub fn open_disks(disks: &[DiskConfig]) -> Result<Vec<BlockConfig>, VmmError> {
    disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let opts = OpenOptions {
                format: d.format.map(|f| match f {
                    DiskFormat::Raw => ImageFormat::Raw,
                    DiskFormat::Qcow2 => ImageFormat::Qcow2,
                }),
                readonly: d.readonly,
                direct: d.cache == DiskCache::None,
            };
            let image: Arc<dyn BlockBackend> = ferro_disk::open(&d.path, &opts)
                .map_err(|e| VmmError::Devices(format!("disk {e}")))?
                .into();
            // Every write passes its log (off, one atomic load, until a storage migration).
            let disk = Arc::new(Tracked::new(image));
            OPENED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(disk.clone());
            Ok(BlockConfig {
                disk,
                serial: d.serial.clone(),
                name: format!("blk{i}"),
            })
        })
        .collect()
}

/// The virtio-blk devices for disks [`open_disks`] opened.
pub fn devices(disks: &[BlockConfig]) -> impl Iterator<Item = Box<dyn VirtioDevice>> + '_ {
    disks
        .iter()
        .map(|c| Box::new(Block::new(c.clone())) as Box<dyn VirtioDevice>)
}
