//! `POST /v1/vms/{name}/clone`: a new VM with the source's settings and a copy of its disks.
//!
//! The source must be stopped (a copy of a disk a guest is writing is not a disk).
//!
//! - A full clone flattens each disk into a standalone qcow2 under `DATA/vms/DST/`
//!   (`qemu-img convert`; synchronous).
//! - A linked clone freezes each of the source's current disks as a read-only base (mode
//!   0444, left where it is) and gives *both* VMs a new qcow2 overlay on it: the source's
//!   under `DATA/vms/SRC/` (its definition is changed to use it), the clone's under
//!   `DATA/vms/DST/`. Neither VM ever writes the base again, so the two never see each
//!   other's writes; the price is one more level of backing chain per linked clone of a
//!   clone. A template does the same without touching the source.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ferro_api::rest::{Vm, VmState};
use ferro_api::{DiskConfig, DiskFormat};

use crate::error::DaemonError;
use crate::images;
use crate::operations::Tracker;
use crate::ops::{self, check_name};
use crate::store::{self, now_ms, VmRecord};
use crate::supervisor::Supervisor;

fn qcow2_disk(path: PathBuf, like: &DiskConfig) -> DiskConfig {
    DiskConfig {
        path,
        format: Some(DiskFormat::Qcow2),
        readonly: like.readonly,
        serial: None,
        cache: like.cache,
    }
}

fn format_of(d: &DiskConfig) -> Result<&'static str, DaemonError> {
    Ok(match d.format {
        Some(DiskFormat::Raw) => "raw",
        Some(DiskFormat::Qcow2) => "qcow2",
        None => match ferro_disk::info(&d.path) {
            Ok(i) if i.format == ferro_disk::ImageFormat::Qcow2 => "qcow2",
            Ok(_) => "raw",
            Err(e) => {
                return Err(DaemonError::BadRequest(format!(
                    "disk {}: {e}",
                    d.path.display()
                )))
            }
        },
    })
}

fn overlay(path: &Path, base: &Path) -> Result<(), DaemonError> {
    ferro_disk::create_qcow2_overlay(path, base)
        .map_err(|e| DaemonError::Vmm(format!("cannot make an overlay on {}: {e}", base.display())))
}

/// The checks a clone request must pass before any work starts (the clone repeats them
/// under the VMs' locks).
pub fn precheck(sup: &Supervisor, src: &str, dst: &str) -> Result<(), DaemonError> {
    check_name(dst)?;
    if src == dst || sup.store(|s| s.get(dst)).is_ok() {
        return Err(DaemonError::Exists(dst.to_string()));
    }
    let rec = sup.store(|s| s.get(src))?;
    if rec.state != VmState::Stopped {
        return Err(DaemonError::InvalidState(format!(
            "VM '{src}' is {}: stop it before cloning it (ferro vm stop {src})",
            rec.state.as_str()
        )));
    }
    Ok(())
}

/// Clones stopped VM `src` into a new VM `dst`, reporting a full copy's progress to
/// `progress`.
pub async fn clone(
    sup: &Supervisor,
    src: &str,
    dst: &str,
    linked: bool,
    progress: Tracker,
) -> Result<Vm, DaemonError> {
    check_name(dst)?;
    if src == dst {
        // Also keeps the second vm_lock below from waiting on the first.
        return Err(DaemonError::Exists(dst.to_string()));
    }
    let _src_guard = sup.vm_lock(src).await;
    let mut rec = sup.store(|s| s.get(src))?;
    if rec.state != VmState::Stopped {
        return Err(DaemonError::InvalidState(format!(
            "VM '{src}' is {}: stop it before cloning it (ferro vm stop {src})",
            rec.state.as_str()
        )));
    }
    let _dst_guard = sup.vm_lock(dst).await;
    if sup.store(|s| s.get(dst)).is_ok() {
        return Err(DaemonError::Exists(dst.to_string()));
    }
    let dst_dir = sup.dir(dst).0;
    std::fs::create_dir_all(&dst_dir).map_err(DaemonError::io("cannot create the VM directory"))?;
    let stamp = now_ms();
    let mut src_new: Vec<PathBuf> = Vec::new();
    let bases: Vec<PathBuf> = rec.config.disks.iter().map(|d| d.path.clone()).collect();
    let result = async {
        let mut disks = Vec::new();
        if linked {
            let src_dir = sup.dir(src).0;
            let mut src_disks = Vec::new();
            for (i, d) in rec.config.disks.iter().enumerate() {
                let mine = dst_dir.join(format!("disk{i}.qcow2"));
                overlay(&mine, &d.path)?;
                disks.push(qcow2_disk(mine, d));
                let theirs = src_dir.join(format!("disk{i}-{stamp}.qcow2"));
                overlay(&theirs, &d.path)?;
                src_new.push(theirs.clone());
                src_disks.push(qcow2_disk(theirs, d));
            }
            rec.config.disks = src_disks;
        } else {
            let plan: Vec<(PathBuf, &'static str, PathBuf)> = rec
                .config
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| Ok((d.path.clone(), format_of(d)?, dst_dir.join(format!("disk{i}.qcow2")))))
                .collect::<Result<_, DaemonError>>()?;
            let copy = plan.clone();
            tokio::task::spawn_blocking(move || {
                let n = copy.len();
                copy.iter().enumerate().try_for_each(|(i, (from, fmt, to))| {
                    images::copy_to_qcow2(from, fmt, to, &progress.part(i, n))
                })
            })
            .await
            .map_err(|e| DaemonError::Vmm(format!("the clone task failed: {e}")))??;
            for ((_, _, to), d) in plan.into_iter().zip(&rec.config.disks) {
                disks.push(qcow2_disk(to, d));
            }
        }
        let mut config = rec.config.clone();
        config.disks = disks;
        // The clone's NICs get MACs (and addresses) of their own.
        for n in &mut config.nets {
            n.mac = None;
        }
        let mut new = VmRecord {
            name: dst.to_string(),
            config,
            restart: rec.restart,
            state: VmState::Stopped,
            pid: None,
            restarts: 0,
            created_ms: now_ms(),
        };
        let kind = if linked { "linked" } else { "full" };
        sup.store(|s| {
            s.transaction(|tx| {
                crate::net::sync(tx, &sup.0.net, dst, &mut new.config.nets)?;
                store::insert_vm(tx, &new)?;
                store::insert_event(tx, dst, "created", &format!("{kind} clone of VM '{src}'"))?;
                if linked {
                    store::update_vm(tx, &rec)?;
                    store::insert_event(
                        tx,
                        src,
                        "edited",
                        &format!("disks became overlays on read-only bases, shared with linked clone '{dst}'"),
                    )?;
                }
                Ok(())
            })
        })
    }
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&dst_dir);
        for p in &src_new {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    if linked {
        for b in &bases {
            let _ = std::fs::set_permissions(b, std::fs::Permissions::from_mode(0o444));
        }
    }
    ops::get(sup, dst)
}
