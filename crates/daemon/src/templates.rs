//! Templates: read-only base disks under `DATA/templates/NAME/` plus the settings a VM made
//! from one starts with, one row each in the `templates` table.
//!
//! From a stopped VM, each disk is flattened (`qemu-img convert -O qcow2`, backing chain
//! and all) into the template's folder, so the VM keeps its own disks and the template
//! depends on nothing. From an image, the image's stored qcow2 files are the bases as they
//! are (no copy); the image cannot be deleted while a template uses it. Base files are made
//! mode 0444: the daemon never opens them for writing, VMs only get overlays on them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ferro_api::rest::VmState;
use ferro_api::storage::{CreateTemplate, Template};
use ferro_api::{DiskCache, DiskConfig, DiskFormat, VmConfig};
use rusqlite::{params, OptionalExtension, Transaction};

use crate::error::DaemonError;
use crate::images;
use crate::ops::check_name;
use crate::store::{now_ms, Store};
use crate::supervisor::Supervisor;

/// `DATA/templates/`.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("templates")
}

fn decode(data: String) -> Result<Template, DaemonError> {
    serde_json::from_str(&data).map_err(|_| {
        DaemonError::Store(rusqlite::Error::InvalidColumnType(
            0,
            "templates.data".into(),
            rusqlite::types::Type::Text,
        ))
    })
}

/// Every template, by name.
pub fn list(s: &Store) -> Result<Vec<Template>, DaemonError> {
    let mut st = s
        .conn()
        .prepare("SELECT data FROM templates ORDER BY name")?;
    let rows = st.query_map([], |r| r.get::<_, String>(0))?;
    rows.map(|r| decode(r?)).collect()
}

/// One template.
pub fn get(s: &Store, name: &str) -> Result<Template, DaemonError> {
    let data: Option<String> = s
        .conn()
        .query_row("SELECT data FROM templates WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?;
    decode(data.ok_or_else(|| DaemonError::NoSuch {
        what: "template",
        name: name.to_string(),
    })?)
}

fn taken(name: &str) -> DaemonError {
    DaemonError::Conflict(format!(
        "a template named '{name}' exists already: pick another name or delete it first"
    ))
}

fn insert(tx: &Transaction<'_>, t: &Template) -> Result<(), DaemonError> {
    let data = serde_json::to_string(t).map_err(|e| DaemonError::BadRequest(e.to_string()))?;
    let r = tx.execute(
        "INSERT INTO templates (name, data, created_ms) VALUES (?1, ?2, ?3)",
        params![t.name, data, i64::try_from(t.created_ms).unwrap_or(0)],
    );
    match r {
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Err(taken(&t.name))
        }
        other => other.map(|_| ()).map_err(DaemonError::from),
    }
}

fn read_only(path: &Path) {
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444));
}

/// Flattens `disks` into `DATA/templates/NAME/diskI.qcow2` (blocking). Nothing is left on failure.
fn flatten_all(
    data_dir: &Path,
    name: &str,
    disks: &[DiskConfig],
) -> Result<Vec<PathBuf>, DaemonError> {
    let root = dir(data_dir);
    let tmp = root.join(format!(".new-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)
        .map_err(DaemonError::io(format!("cannot create {}", tmp.display())))?;
    let fail = |e: DaemonError| {
        let _ = std::fs::remove_dir_all(&tmp);
        e
    };
    for (i, d) in disks.iter().enumerate() {
        let format = match d.format {
            Some(DiskFormat::Raw) => "raw",
            Some(DiskFormat::Qcow2) => "qcow2",
            None => match ferro_disk::info(&d.path) {
                Ok(info) if info.format == ferro_disk::ImageFormat::Qcow2 => "qcow2",
                Ok(_) => "raw",
                Err(e) => {
                    return Err(fail(DaemonError::BadRequest(format!(
                        "disk {}: {e}",
                        d.path.display()
                    ))))
                }
            },
        };
        let none = crate::operations::Tracker::none().part(0, 1);
        images::copy_to_qcow2(&d.path, format, &tmp.join(format!("disk{i}.qcow2")), &none)
            .map_err(fail)?;
    }
    let dest = root.join(name);
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&tmp, &dest)
        .map_err(DaemonError::io(format!(
            "cannot move the template into {}",
            dest.display()
        )))
        .map_err(fail)?;
    let paths: Vec<PathBuf> = (0..disks.len())
        .map(|i| dest.join(format!("disk{i}.qcow2")))
        .collect();
    paths.iter().for_each(|p| read_only(p));
    Ok(paths)
}

/// Makes a template from a stopped VM or from an image.
pub async fn create(sup: &Supervisor, req: CreateTemplate) -> Result<Template, DaemonError> {
    check_name(&req.name)?;
    if sup.store(|s| get(s, &req.name)).is_ok() {
        return Err(taken(&req.name));
    }
    let defaults = VmConfig::new("");
    let mut t = Template {
        name: req.name.clone(),
        source: String::new(),
        cpus: defaults.cpus,
        memory_mib: defaults.memory_mib,
        kernel: None,
        initrd: None,
        cmdline: String::new(),
        disks: Vec::new(),
        created_ms: now_ms(),
    };
    let _guard;
    match (req.from_vm, req.from_image) {
        (Some(vm), None) => {
            _guard = sup.vm_lock(&vm).await;
            let rec = sup.store(|s| s.get(&vm))?;
            if rec.state != VmState::Stopped {
                return Err(DaemonError::InvalidState(format!(
                    "VM '{vm}' is {}: stop it first (ferro vm stop {vm})",
                    rec.state.as_str()
                )));
            }
            let (data_dir, name, disks) = (
                sup.0.data_dir.clone(),
                t.name.clone(),
                rec.config.disks.clone(),
            );
            t.disks = tokio::task::spawn_blocking(move || flatten_all(&data_dir, &name, &disks))
                .await
                .map_err(|e| DaemonError::Vmm(format!("the template task failed: {e}")))??;
            t.source = format!("vm:{vm}");
            t.cpus = rec.config.cpus;
            t.memory_mib = rec.config.memory_mib;
            t.kernel = Some(rec.config.kernel);
            t.initrd = rec.config.initrd;
            t.cmdline = rec.config.cmdline;
        }
        (None, Some(image)) => {
            let img = sup.store(|s| images::get(s, &image))?;
            img.disks.iter().for_each(|p| read_only(p));
            t.source = format!("image:{image}");
            t.cpus = img.cpus.unwrap_or(t.cpus);
            t.memory_mib = img.memory_mib.unwrap_or(t.memory_mib);
            t.disks = img.disks;
        }
        _ => {
            return Err(DaemonError::BadRequest(
                "give exactly one of from_vm and from_image".into(),
            ))
        }
    }
    let r = sup.store(|s| s.transaction(|tx| insert(tx, &t)));
    if let Err(e) = r {
        if t.source.starts_with("vm:") && !matches!(e, DaemonError::Conflict(_)) {
            let _ = std::fs::remove_dir_all(dir(&sup.0.data_dir).join(&t.name));
        }
        return Err(e);
    }
    Ok(t)
}

/// Whether a template is based on any of `files` (an image's disks).
pub fn uses_any(s: &Store, files: &[PathBuf]) -> Result<Option<String>, DaemonError> {
    Ok(list(s)?
        .into_iter()
        .find(|t| t.disks.iter().any(|d| files.contains(d)))
        .map(|t| t.name))
}

/// The disks of a new VM `vm_dir` made from template `t`: one qcow2 overlay per base disk,
/// created in `vm_dir` (which must exist).
pub fn overlays(t: &Template, vm_dir: &Path) -> Result<Vec<DiskConfig>, DaemonError> {
    let mut out = Vec::new();
    for (i, base) in t.disks.iter().enumerate() {
        let path = vm_dir.join(format!("disk{i}.qcow2"));
        ferro_disk::create_qcow2_overlay(&path, base).map_err(|e| {
            DaemonError::Vmm(format!("cannot make an overlay on {}: {e}", base.display()))
        })?;
        out.push(DiskConfig {
            path,
            format: Some(DiskFormat::Qcow2),
            readonly: false,
            serial: None,
            cache: DiskCache::default(),
        });
    }
    Ok(out)
}

/// Fills what a create request left out from template `t`: kernel, initrd, command line, and
/// CPUs and memory when `cpus` / `memory` say they were not given.
pub fn fill(t: &Template, cfg: &mut VmConfig, cpus: bool, memory: bool) -> Result<(), DaemonError> {
    if cfg.kernel.as_os_str().is_empty() {
        cfg.kernel = t.kernel.clone().ok_or_else(|| {
            DaemonError::BadRequest(format!(
                "template '{}' has no kernel (it was made from an image): pass --kernel",
                t.name
            ))
        })?;
    }
    if cfg.initrd.is_none() {
        cfg.initrd.clone_from(&t.initrd);
    }
    if cfg.cmdline.is_empty() {
        cfg.cmdline.clone_from(&t.cmdline);
    }
    if cpus {
        cfg.cpus = t.cpus;
    }
    if memory {
        cfg.memory_mib = t.memory_mib;
    }
    Ok(())
}

/// Deletes a template; refused while a VM's disk is based on one of its bases. The folder of
/// a template made from a VM goes with it; an image's files stay with the image.
pub async fn delete(sup: &Supervisor, name: &str) -> Result<(), DaemonError> {
    let t = sup.store(|s| get(s, name))?;
    for vm in sup.store(|s| s.list())? {
        if vm
            .config
            .disks
            .iter()
            .any(|d| t.disks.iter().any(|b| images::chain_uses(&d.path, b)))
        {
            return Err(DaemonError::Conflict(format!(
                "template '{name}' is the base of VM '{}': delete the VM first",
                vm.name
            )));
        }
    }
    sup.store(|s| {
        s.conn()
            .execute("DELETE FROM templates WHERE name = ?1", [name])?;
        Ok(())
    })?;
    if t.source.starts_with("vm:") {
        let _ = std::fs::remove_dir_all(dir(&sup.0.data_dir).join(name));
    }
    Ok(())
}
