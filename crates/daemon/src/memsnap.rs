//! Memory snapshots of a running (or paused) VM and `POST /v1/vms/{name}/restore`.
//!
//! A memory snapshot must hold the guest's memory and device state *and* its disks as they
//! were at the same instant. The VMM can write the first (the control socket's `snapshot`)
//! but cannot switch a running VM onto other disk files, and its qcow2 driver keeps L2
//! table updates in its own memory until a guest FLUSH or its exit: a copy of a disk file
//! taken while it merely sits paused may miss writes the guest already saw complete. So a
//! memory snapshot runs the VM on in a new VMM:
//!
//! 1. `snapshot` with `resume: false`: the vCPUs stop and the state goes to the directory
//!    (`DATA/vms/VM/snapshots/SNAP/`, or the `dir` asked for);
//! 2. `quit`: the VMM writes back and syncs every disk and ends;
//! 3. the disks' current files become the snapshot's read-only layers and the VM gets new
//!    qcow2 overlays on them, exactly as a disk snapshot does ([`crate::snapshots`]);
//! 4. a new VMM runs the VM from the directory it just wrote (`ferro-vmm --restore`), on
//!    the new overlays: the guest carries on where it stopped.
//!
//! Nothing is copied (the guest is still for the save, the VMM's exit and a restore:
//! milliseconds for a small guest), and a later restore gives the VM fresh overlays on the
//! same layers, so it sees its disks as they were at the snapshot, whatever the VM wrote
//! after it. The price: the VM's VMM has a new pid after a memory snapshot, and vsock
//! connections (never saved) are dropped.
//!
//! `ferro-vmm --restore DIR` takes the disks and NICs from the snapshot's manifest, so a
//! restore runs it on a working copy of the directory ([`restore_dir`]): the manifest with
//! the VM's disks and NICs of now, the state and memory files linked.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ferro_api::control::ControlRequest;
use ferro_api::rest::{Vm, VmState};
use ferro_api::storage::{CreateSnapshot, RestoreVm, Snapshot};
use ferro_api::VmConfig;

use crate::error::DaemonError;
use crate::ops;
use crate::process::{self, VmDir};
use crate::snapshots::{self, Row};
use crate::store::{self, now_ms, VmRecord};
use crate::supervisor::Supervisor;

/// The snapshot directory format (`snapshot.json`'s `format_version`) of the `ferro-vmm` this
/// daemon runs (crates/vmm/src/snapshot.rs).
pub const VMM_FORMAT_VERSION: u64 = 1;
/// The manifest's name in a snapshot directory.
const MANIFEST: &str = "snapshot.json";
/// The working copy of a snapshot directory a restore runs, under the VM's directory.
const WORK: &str = ".restore";
/// The longest a VMM may take to save a VM.
const SAVE_LIMIT: std::time::Duration = std::time::Duration::from_secs(30 * 60);
/// Largest manifest read.
const MAX_MANIFEST: u64 = 16 << 20;

fn bad(dir: &Path, what: impl std::fmt::Display) -> DaemonError {
    DaemonError::BadSnapshot {
        code: "bad_snapshot",
        message: format!("snapshot directory {}: {what}", dir.display()),
    }
}

/// A file the manifest names: a plain name inside `dir`.
fn member(dir: &Path, manifest: &serde_json::Value, key: &str) -> Result<PathBuf, DaemonError> {
    let name = manifest[key]["file"]
        .as_str()
        .ok_or_else(|| bad(dir, format!("{MANIFEST} names no {key} file")))?;
    if name.is_empty() || Path::new(name).file_name().and_then(|n| n.to_str()) != Some(name) {
        return Err(bad(
            dir,
            format!("{MANIFEST}: {name:?} is not a plain file name"),
        ));
    }
    let p = dir.join(name);
    if !p.is_file() {
        return Err(bad(dir, format!("its {key} file {name} is missing")));
    }
    Ok(p)
}

/// Reads and checks what the daemon can of the snapshot in `dir`: the manifest parses, has
/// this VMM's format version and names state and memory files that exist. The VMM checks the
/// rest (lengths, checksums, the machine state) when it restores.
pub fn check_dir(dir: &Path) -> Result<serde_json::Value, DaemonError> {
    use std::io::Read;
    let path = dir.join(MANIFEST);
    let f = std::fs::File::open(&path).map_err(|e| {
        bad(
            dir,
            format!("cannot read {MANIFEST}: {e} (is it a snapshot?)"),
        )
    })?;
    let mut text = Vec::new();
    f.take(MAX_MANIFEST + 1)
        .read_to_end(&mut text)
        .map_err(|e| bad(dir, format!("cannot read {MANIFEST}: {e}")))?;
    if text.len() as u64 > MAX_MANIFEST {
        return Err(bad(
            dir,
            format!("{MANIFEST} is larger than {MAX_MANIFEST} bytes"),
        ));
    }
    let m: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| bad(dir, format!("{MANIFEST} is not JSON: {e}")))?;
    match m["format_version"].as_u64() {
        Some(VMM_FORMAT_VERSION) => {}
        Some(v) => {
            return Err(DaemonError::BadSnapshot {
                code: "unsupported_snapshot",
                message: format!(
                    "snapshot directory {}: format version {v}, this daemon's ferro-vmm runs version {VMM_FORMAT_VERSION}",
                    dir.display()
                ),
            })
        }
        None => return Err(bad(dir, format!("{MANIFEST} has no format_version"))),
    }
    serde_json::from_value::<VmConfig>(m["config"].clone())
        .map_err(|e| bad(dir, format!("{MANIFEST}: its config: {e}")))?;
    member(dir, &m, "state")?;
    member(dir, &m, "memory")?;
    Ok(m)
}

/// A working copy of snapshot `snap` under the VM's directory that `ferro-vmm --restore`
/// runs with `config`'s disks and NICs (the runtime config the VMM would boot): the manifest
/// rewritten, the state and memory files symlinked. The caller removes it once the VMM
/// answers (it has read the state and mapped the memory by then).
pub fn restore_dir(vm: &VmDir, snap: &Path, config: &VmConfig) -> Result<PathBuf, DaemonError> {
    let mut m = check_dir(snap)?;
    let work = vm.0.join(WORK);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)
        .map_err(DaemonError::io("cannot create the restore directory"))?;
    let made = (|| {
        for key in ["state", "memory"] {
            let from = std::path::absolute(member(snap, &m, key)?)
                .map_err(DaemonError::io("cannot resolve the snapshot directory"))?;
            let name = from.file_name().map(PathBuf::from).unwrap_or_default();
            std::os::unix::fs::symlink(&from, work.join(name))
                .map_err(DaemonError::io("cannot link the snapshot's files"))?;
        }
        m["config"]["disks"] = to_value(&config.disks)?;
        m["config"]["nets"] = to_value(&config.nets)?;
        let text = serde_json::to_vec_pretty(&m).map_err(|e| DaemonError::Vmm(e.to_string()))?;
        std::fs::write(work.join(MANIFEST), text)
            .map_err(DaemonError::io("cannot write the restore manifest"))
    })();
    match made {
        Ok(()) => Ok(work),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            Err(e)
        }
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<serde_json::Value, DaemonError> {
    serde_json::to_value(v).map_err(|e| DaemonError::Vmm(e.to_string()))
}

/// Removes a memory snapshot's directory: the files `ferro-vmm` writes there, then the
/// directory if that left it empty (a directory given with `dir` may hold other things).
pub fn remove_dir(dir: &Path) {
    for f in [
        MANIFEST,
        "state.json",
        "memory",
        "memory.tmp",
        "state.tmp",
        "snapshot.tmp",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let _ = std::fs::remove_dir(dir);
}

fn size_on_disk(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// Where a memory snapshot goes: the `dir` asked for (absolute, missing or empty) or
/// `DATA/vms/VM/snapshots/SNAP`. Created; `true` when this call made it.
fn prepare_dir(
    sup: &Supervisor,
    vm: &str,
    req: &CreateSnapshot,
) -> Result<(PathBuf, bool), DaemonError> {
    let dir = match &req.dir {
        Some(d) if !d.is_absolute() => {
            return Err(DaemonError::BadRequest(format!(
                "dir {} is not an absolute path",
                d.display()
            )))
        }
        Some(d) => d.clone(),
        None => sup.dir(vm).0.join("snapshots").join(&req.name),
    };
    match std::fs::read_dir(&dir) {
        Ok(mut it) => {
            if it.next().is_some() {
                return Err(DaemonError::Conflict(format!(
                    "{} is not empty: give a new or empty directory",
                    dir.display()
                )));
            }
            Ok((dir, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&dir)
                .map_err(DaemonError::io(format!("cannot create {}", dir.display())))?;
            Ok((dir, true))
        }
        Err(e) => Err(DaemonError::Io {
            what: format!("cannot use {}", dir.display()),
            source: e,
        }),
    }
}

/// Takes memory snapshot `req` of running or paused VM `vm` (see the module docs).
pub async fn create(
    sup: &Supervisor,
    vm: &str,
    req: CreateSnapshot,
) -> Result<Snapshot, DaemonError> {
    let _guard = sup.vm_lock(vm).await;
    let rec = sup.store(|s| s.get(vm))?;
    if !matches!(rec.state, VmState::Running | VmState::Paused) || !sup.watches(vm) {
        return Err(DaemonError::InvalidState(format!(
            "VM '{vm}' is {}: a memory snapshot needs it running or paused (a stopped VM's disks are snapshotted without --memory)",
            rec.state.as_str()
        )));
    }
    if sup.store(|s| snapshots::row(s, vm, &req.name)).is_ok() {
        return Err(snapshots::taken(vm, &req.name));
    }
    let (dir, made_dir) = prepare_dir(sup, vm, &req)?;
    let drop_dir = |dir: &Path| {
        remove_dir(dir);
        if !made_dir {
            // It was given empty: leave it so.
            let _ = std::fs::create_dir_all(dir);
        }
    };
    let paused = rec.state == VmState::Paused;
    let control = sup.dir(vm).control();
    let t0 = Instant::now();
    // Writing a large guest's memory takes a while: wait for the answer as long as it takes
    // (within reason), never resume under a save still going on.
    let save = serde_json::to_value(ControlRequest::Snapshot {
        dir: dir.clone(),
        resume: false,
    })
    .map_err(|e| DaemonError::Vmm(e.to_string()))?;
    let saved = process::request_value(&control, &save, SAVE_LIMIT).await;
    if let Err(e) = saved {
        if !paused {
            let _ = process::request(&control, &ControlRequest::Resume).await;
        }
        drop_dir(&dir);
        return Err(DaemonError::Vmm(format!(
            "the VMM could not save VM '{vm}': {e}"
        )));
    }
    // The guest is still from here on. Its VMM's exit writes every disk back.
    if let Err(e) = sup.retire_locked(vm).await {
        drop_dir(&dir);
        return Err(lost(sup, vm, None, &e));
    }
    let mut layers = Vec::new();
    for d in &rec.config.disks {
        let mut l = d.clone();
        l.path = snapshots::absolute(&d.path)?;
        layers.push(l);
    }
    let stamp = now_ms();
    let vmdir = sup.dir(vm).0;
    let tops = snapshots::overlays(&layers, &vmdir, stamp);
    let mut snapshot = Snapshot {
        name: req.name.clone(),
        vm: vm.to_string(),
        disks: layers.iter().map(|d| d.path.clone()).collect(),
        memory: true,
        created_ms: stamp,
        dir: Some(dir.clone()),
        bytes: Some(size_on_disk(&dir)),
        paused_ms: None,
    };
    let mut on = rec.clone();
    let recorded = tops.and_then(|tops| {
        on.config.disks = tops.clone();
        let r = Row {
            snapshot: snapshot.clone(),
            disks: layers.clone(),
            config: Some(rec.config.clone()),
        };
        sup.store(|s| {
            s.transaction(|tx| {
                snapshots::insert(tx, &r)?;
                store::update_vm(tx, &on)
            })
        })
        .inspect_err(|_| remove_tops(&tops))
        .map(|()| tops)
    });
    let tops = match recorded {
        Ok(t) => t,
        Err(e) => {
            // The disks are as they were: boot the VM on from the state it just wrote.
            let back = sup.launch(&rec, false, Some(&dir)).await;
            drop_dir(&dir);
            return Err(match back {
                Ok(()) => e,
                Err(b) => lost(sup, vm, Some(&e), &b),
            });
        }
    };
    freeze(&layers);
    if let Err(e) = sup.launch(&on, false, Some(&dir)).await {
        // Undo: the VM back on its own disks, no snapshot; it cannot go on, so it stops.
        let _ = sup.store(|s| {
            s.transaction(|tx| {
                tx.execute(
                    "DELETE FROM snapshots WHERE vm = ?1 AND name = ?2",
                    [vm, req.name.as_str()],
                )?;
                store::update_vm(tx, &rec)
            })
        });
        thaw(&layers);
        remove_tops(&tops);
        drop_dir(&dir);
        return Err(lost(sup, vm, None, &e));
    }
    if paused {
        process::request(&control, &ControlRequest::Pause).await?;
        let pid = sup.store(|s| s.get(vm))?.pid;
        sup.store(|s| s.set_state(vm, VmState::Paused, pid))?;
    }
    let ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
    snapshot.paused_ms = Some(ms);
    let r = Row {
        snapshot: snapshot.clone(),
        disks: layers,
        config: Some(rec.config.clone()),
    };
    sup.store(|s| {
        s.transaction(|tx| {
            let data = serde_json::to_string(&r).map_err(|e| DaemonError::Vmm(e.to_string()))?;
            tx.execute(
                "UPDATE snapshots SET data = ?3 WHERE vm = ?1 AND name = ?2",
                [vm, req.name.as_str(), data.as_str()],
            )?;
            store::insert_event(
                tx,
                vm,
                "snapshot",
                &format!(
                    "memory snapshot '{}' taken in {}: {} KiB, the guest held still {ms} ms",
                    req.name,
                    dir.display(),
                    snapshot.bytes.unwrap_or(0) >> 10
                ),
            )
        })
    })?;
    Ok(snapshot)
}

/// The VM lost its VMM in a failed memory snapshot and could not be run on: it is stopped
/// (its disks are as they were at the failed snapshot).
fn lost(sup: &Supervisor, vm: &str, first: Option<&DaemonError>, e: &DaemonError) -> DaemonError {
    let _ = sup.store(|s| {
        s.set_state(vm, VmState::Stopped, None)?;
        s.event(
            vm,
            "stopped",
            &format!("the VM could not run on after a failed memory snapshot: {e}"),
        )
    });
    let first = first.map(|f| format!(" ({f})")).unwrap_or_default();
    DaemonError::Vmm(format!(
        "the memory snapshot failed{first} and the VM could not run on from its saved state ({e}): it is stopped, its disks as they were"
    ))
}

fn remove_tops(tops: &[ferro_api::DiskConfig]) {
    for t in tops.iter().filter(|t| !t.readonly) {
        let _ = std::fs::remove_file(&t.path);
    }
}

fn set_mode(layers: &[ferro_api::DiskConfig], mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    for l in layers.iter().filter(|l| !l.readonly) {
        let _ = std::fs::set_permissions(&l.path, std::fs::Permissions::from_mode(mode));
    }
}

fn freeze(layers: &[ferro_api::DiskConfig]) {
    set_mode(layers, 0o444);
}

fn thaw(layers: &[ferro_api::DiskConfig]) {
    set_mode(layers, 0o644);
}

/// What a restore runs: the snapshot directory, the VM's definition, and the snapshot's
/// layers to put fresh overlays on (`None`: the VM's current disks).
struct Source {
    dir: PathBuf,
    config: VmConfig,
    layers: Option<Vec<ferro_api::DiskConfig>>,
}

fn from_row(r: Row, rec: &VmRecord) -> Result<Source, DaemonError> {
    match r.snapshot.dir {
        Some(dir) if r.snapshot.memory => Ok(Source {
            dir,
            config: r.config.unwrap_or_else(|| rec.config.clone()),
            layers: Some(r.disks),
        }),
        _ => Err(DaemonError::InvalidState(format!(
            "snapshot '{}' of VM '{}' holds no memory: revert its disks with `ferro vm snapshot revert {} {}` and start the VM",
            r.snapshot.name, rec.name, rec.name, r.snapshot.name
        ))),
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// A snapshot directory that is not one of the VM's own must fit the VM as it is defined.
fn fits(dir: &Path, m: &serde_json::Value, rec: &VmRecord) -> Result<(), DaemonError> {
    let cfg: VmConfig = serde_json::from_value(m["config"].clone())
        .map_err(|e| bad(dir, format!("{MANIFEST}: its config: {e}")))?;
    let c = &rec.config;
    let shape = |c: &VmConfig| {
        format!(
            "{} vCPUs, {} MiB, {} disks, {} NICs",
            c.cpus,
            c.memory_mib,
            c.disks.len(),
            c.nets.len()
        )
    };
    if (cfg.cpus, cfg.memory_mib, cfg.disks.len(), cfg.nets.len())
        != (c.cpus, c.memory_mib, c.disks.len(), c.nets.len())
    {
        return Err(bad(
            dir,
            format!(
                "it was saved from a VM with {}; VM '{}' has {}",
                shape(&cfg),
                rec.name,
                shape(c)
            ),
        ));
    }
    Ok(())
}

/// Runs stopped VM `vm` from a memory snapshot; a failure leaves it stopped and unchanged.
pub async fn restore(sup: &Supervisor, vm: &str, req: RestoreVm) -> Result<Vm, DaemonError> {
    let _guard = sup.vm_lock(vm).await;
    let rec = sup.store(|s| s.get(vm))?;
    if rec.state.has_vmm() {
        return Err(DaemonError::InvalidState(format!(
            "VM '{vm}' is {}: stop it before you restore it (ferro vm stop {vm})",
            rec.state.as_str()
        )));
    }
    let src =
        match (&req.snapshot, &req.from) {
            (Some(snap), None) => from_row(sup.store(|s| snapshots::row(s, vm, snap))?, &rec)?,
            (None, Some(dir)) => {
                if !dir.is_absolute() {
                    return Err(DaemonError::BadRequest(format!(
                        "from {} is not an absolute path",
                        dir.display()
                    )));
                }
                let own = sup
                    .store(|s| snapshots::rows(s, vm))?
                    .into_iter()
                    .find(|r| r.snapshot.dir.as_deref().is_some_and(|d| same_dir(d, dir)));
                match own {
                    Some(r) => from_row(r, &rec)?,
                    None => Source {
                        dir: dir.clone(),
                        config: rec.config.clone(),
                        layers: None,
                    },
                }
            }
            _ => return Err(DaemonError::BadRequest(
                "give exactly one of snapshot (a memory snapshot's name) and from (a directory)"
                    .into(),
            )),
        };
    let m = check_dir(&src.dir)?;
    if src.layers.is_none() {
        fits(&src.dir, &m, &rec)?;
    }
    let mut on = rec.clone();
    on.config = src.config.clone();
    let tops = match &src.layers {
        Some(layers) => {
            let t = snapshots::overlays(layers, &sup.dir(vm).0, now_ms())?;
            on.config.disks = t.clone();
            t
        }
        None => Vec::new(),
    };
    let t0 = Instant::now();
    let started = async {
        sup.store(|s| s.transaction(|tx| store::update_vm(tx, &on)))?;
        sup.launch(&on, false, Some(&src.dir)).await
    }
    .await;
    if let Err(e) = started {
        let _ = sup.store(|s| s.transaction(|tx| store::update_vm(tx, &rec)));
        remove_tops(&tops);
        return Err(vmm_refused(e, &sup.dir(vm).0.join(WORK), &src.dir));
    }
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    let _ = sup.store(|s| {
        s.event(
            vm,
            "restored",
            &format!("restored from {} in {ms:.1} ms", src.dir.display()),
        )
    });
    sup.reset_history(vm);
    if src.layers.is_some() {
        // The tops the VM had are garbage unless something else is built on them.
        for d in rec.config.disks.iter().filter(|d| !d.readonly) {
            if snapshots::owned(sup, vm, &d.path)
                && !sup.store(|s| snapshots::in_use(s, &d.path, None))?
            {
                let _ = std::fs::remove_file(&d.path);
            }
        }
    }
    ops::get(sup, vm)
}

/// A VMM that refused the snapshot ("ferro-vmm: snapshot DIR: ...") makes a 422 that names
/// the directory the client gave (not the working copy).
fn vmm_refused(e: DaemonError, work: &Path, dir: &Path) -> DaemonError {
    match e {
        DaemonError::Vmm(m) if m.contains("ferro-vmm: snapshot ") => DaemonError::BadSnapshot {
            code: "bad_snapshot",
            message: m
                .replace(&work.display().to_string(), &dir.display().to_string())
                .replace(
                    "the VMM failed to start",
                    &format!("ferro-vmm refused snapshot directory {}", dir.display()),
                ),
        },
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("ferro-memsnap-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn manifest(version: u64) -> serde_json::Value {
        let mut cfg = VmConfig::new("/k");
        cfg.disks.push(ferro_api::DiskConfig {
            path: "/old/disk.qcow2".into(),
            format: None,
            readonly: false,
            serial: None,
            cache: Default::default(),
        });
        json_manifest(version, &cfg)
    }

    fn json_manifest(version: u64, cfg: &VmConfig) -> serde_json::Value {
        serde_json::json!({
            "format_version": version,
            "config": cfg,
            "memory": {"file": "memory", "file_size": 0, "data_bytes": 0, "regions": []},
            "state": {"file": "state.json", "len": 0, "fnv64": "0"},
        })
    }

    fn code(e: DaemonError) -> &'static str {
        match e {
            DaemonError::BadSnapshot { code, .. } => code,
            e => panic!("not a snapshot error: {e}"),
        }
    }

    #[test]
    fn directories_are_checked_before_a_vmm_runs() {
        let d = scratch("check");
        assert_eq!(
            code(check_dir(&d.join("none")).unwrap_err()),
            "bad_snapshot"
        );
        std::fs::write(d.join(MANIFEST), b"{not json").unwrap();
        assert_eq!(code(check_dir(&d).unwrap_err()), "bad_snapshot");
        std::fs::write(d.join(MANIFEST), manifest(7).to_string()).unwrap();
        assert_eq!(code(check_dir(&d).unwrap_err()), "unsupported_snapshot");
        std::fs::write(d.join(MANIFEST), manifest(1).to_string()).unwrap();
        let e = check_dir(&d).unwrap_err();
        assert!(e.to_string().contains("state file"), "{e}");
        std::fs::write(d.join("state.json"), b"{}").unwrap();
        std::fs::write(d.join("memory"), b"").unwrap();
        assert!(check_dir(&d).is_ok());
        let mut m = manifest(1);
        m["state"]["file"] = "../state.json".into();
        std::fs::write(d.join(MANIFEST), m.to_string()).unwrap();
        assert!(check_dir(&d).unwrap_err().to_string().contains("plain"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_restore_runs_on_the_disks_of_now() {
        let d = scratch("work");
        let snap = d.join("snap");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join(MANIFEST), manifest(1).to_string()).unwrap();
        std::fs::write(snap.join("state.json"), b"{}").unwrap();
        std::fs::write(snap.join("memory"), b"").unwrap();
        let vm = VmDir::new(&d, "web");
        let mut now = VmConfig::new("/k");
        now.disks.push(ferro_api::DiskConfig {
            path: "/new/top.qcow2".into(),
            format: None,
            readonly: false,
            serial: None,
            cache: Default::default(),
        });
        let work = restore_dir(&vm, &snap, &now).unwrap();
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(work.join(MANIFEST)).unwrap()).unwrap();
        assert_eq!(m["config"]["disks"][0]["path"], "/new/top.qcow2");
        assert_eq!(m["format_version"], 1);
        assert_eq!(
            std::fs::read_link(work.join("state.json")).unwrap(),
            std::path::absolute(snap.join("state.json")).unwrap()
        );
        // The snapshot itself is untouched.
        let orig: serde_json::Value =
            serde_json::from_slice(&std::fs::read(snap.join(MANIFEST)).unwrap()).unwrap();
        assert_eq!(orig["config"]["disks"][0]["path"], "/old/disk.qcow2");
        let _ = std::fs::remove_dir_all(&d);
    }
}
