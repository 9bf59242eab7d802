//! The VM's virtio-blk disks: every `--disk` image (and its backing chain) is opened before
//! anything touches KVM, so a missing file, a corrupt image or a missing backing file is one
//! line on stderr and exit status 1 with no VM created. Each disk becomes its own virtio-blk
//! PCI function, in the order given, after virtio-rng.

use std::sync::Arc;

use ferro_api::{DiskCache, DiskConfig, DiskFormat};
use ferro_disk::{ImageFormat, OpenOptions};
use ferro_virtio::block::{Block, BlockConfig};
use ferro_virtio::VirtioDevice;

use crate::VmmError;

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
            let disk = ferro_disk::open(&d.path, &opts)
                .map_err(|e| VmmError::Devices(format!("disk {e}")))?;
            Ok(BlockConfig {
                disk: Arc::from(disk),
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
