//! The storage part of the REST API: the image store (`/v1/images`).
//!
//! Additions are append-only, like [`crate::rest`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An imported disk image (or the disks of an imported OVA), stored as qcow2 under
/// `DATA/images/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Image {
    /// Unique name.
    pub name: String,
    /// The format it was imported from: `qcow2`, `raw`, `vmdk`, `vpc` (VHD), `vhdx` or `ova`.
    pub format: String,
    /// Guest-visible size of the first disk, bytes.
    pub virtual_size: u64,
    /// The stored qcow2 file of the first disk.
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// Every stored disk, first one first (an OVA may carry several).
    #[schema(value_type = Vec<String>)]
    pub disks: Vec<PathBuf>,
    /// vCPUs the OVA's descriptor asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory the OVA's descriptor asks for, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Import time, Unix ms.
    pub created_ms: u64,
}

/// `POST /v1/images`: import a file on the daemon's host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportImage {
    /// The file to import (qcow2, raw, VMDK, VHD, VHDX or OVA), on the daemon's host.
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// The image's name (default: the file name without its extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A template: read-only base disks plus the machine settings a VM made from it starts with.
/// A VM created from it gets qcow2 overlays on the base disks (a linked clone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Template {
    /// Unique name.
    pub name: String,
    /// Where it came from: `vm:NAME` or `image:NAME`.
    pub source: String,
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Kernel on the host (absent for a template made from an image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// The read-only base disks (qcow2), first one first.
    #[schema(value_type = Vec<String>)]
    pub disks: Vec<PathBuf>,
    /// Creation time, Unix ms.
    pub created_ms: u64,
}

/// `POST /v1/templates`: make a template from a stopped VM or from an image (exactly one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    /// The template's name.
    pub name: String,
    /// A stopped VM whose disks are copied (flattened) into the template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_vm: Option<String>,
    /// An image used as the template's base disk(s) as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_image: Option<String>,
}

/// `POST /v1/vms/{name}/clone`: a new VM from a stopped one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneVm {
    /// The new VM's name.
    pub name: String,
    /// A linked clone (qcow2 overlays on the source's disks, which become read-only bases)
    /// instead of a full copy.
    #[serde(default)]
    pub linked: bool,
}

/// A disk snapshot of a VM, taken while it was stopped: each writable disk's file as it was
/// then, frozen read-only, with the VM moved onto a qcow2 overlay of it (reverting gives the
/// VM a fresh overlay on these files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    /// Unique among the VM's snapshots.
    pub name: String,
    /// The VM.
    pub vm: String,
    /// The frozen files that hold it, one per disk of the VM at the time (read-only disks as
    /// they are).
    #[schema(value_type = Vec<String>)]
    pub disks: Vec<PathBuf>,
    /// Whether it holds the guest's memory and device state too (a snapshot of a running or
    /// paused VM, taken with `memory: true`; `POST /v1/vms/{name}/restore` runs it again).
    #[serde(default)]
    pub memory: bool,
    /// Creation time, Unix ms.
    pub created_ms: u64,
    /// A memory snapshot's directory (`snapshot.json`, `state.json`, `memory`: what
    /// `ferro-vmm --restore DIR` reads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub dir: Option<PathBuf>,
    /// A memory snapshot's size on disk (state and the memory file's data), bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// How long a memory snapshot held the guest still (pause to running again), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_ms: Option<u64>,
}

/// `POST /v1/vms/{name}/snapshots`: snapshot a stopped VM's disks, or (`memory: true`) a
/// running or paused VM's memory, device state and disks at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// The snapshot's name: 1 to 63 of `a-z A-Z 0-9 - _ .`.
    pub name: String,
    /// Save memory and device state of a running or paused VM too (its disks are frozen at
    /// the same instant).
    #[serde(default)]
    pub memory: bool,
    /// Where a memory snapshot's directory goes (absolute, missing or empty; default
    /// `DATA/vms/NAME/snapshots/SNAP`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub dir: Option<PathBuf>,
}

/// `POST /v1/vms/{name}/restore`: run a stopped VM from a memory snapshot (exactly one of
/// `snapshot` and `from`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreVm {
    /// One of the VM's memory snapshots: its state, with its disks as they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// A snapshot directory on the daemon's host. One of the VM's own memory snapshots is
    /// restored with its disks; any other runs on the VM's current disks and must match the
    /// VM's CPUs, memory, disks and NICs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub from: Option<PathBuf>,
}
