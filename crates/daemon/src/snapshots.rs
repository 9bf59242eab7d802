//! Disk snapshots of a stopped VM, as external qcow2 overlays:
//! `POST|GET /v1/vms/{name}/snapshots`, `POST /v1/vms/{name}/snapshots/{snap}/revert`,
//! `DELETE /v1/vms/{name}/snapshots/{snap}`.
//!
//! Why overlays and not qcow2 internal snapshots (`qemu-img snapshot -c`): `ferro-vmm`'s qcow2
//! writer (`ferro-disk`) refuses to open an image with internal snapshots for writing (it does
//! not copy clusters shared with a snapshot on write), so a VM with one would not start.
//! Overlays are what templates and linked clones already use, take milliseconds
//! ([`ferro_disk::create_qcow2_overlay`]) and work on raw disks too.
//!
//! - Taking snapshot S freezes each writable disk's current file as S's layer (mode 0444, left
//!   where it is) and gives the VM a new overlay on it, `DATA/vms/VM/diskN-snap-MS.qcow2`.
//!   Read-only disks are recorded as they are.
//! - Reverting to S gives each disk a fresh overlay on S's layer; the VM's previous top files
//!   are deleted when they are the daemon's (under `DATA/vms/VM/`) and nothing else uses them.
//!   Snapshots taken after S stay (a tree: revert to any of them later).
//! - Deleting S folds each of its layers into the files directly above it (`qemu-img rebase`
//!   onto the layer's own backing file, which keeps their contents) and then deletes the layer
//!   if it is the daemon's; a layer that is not the daemon's (the VM's original disk) or that
//!   another VM is based on (a linked clone) stays as a base.
//!
//! The rows live in the `snapshots` table ([`MIGRATION`]); a trigger drops them with their VM.
//! A memory snapshot ([`CreateSnapshot::memory`], [`crate::memsnap`]) is a row of the same
//! kind with a state directory and the VM's definition as it was; deleting it removes the
//! directory's files too.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use ferro_api::rest::{ApiErrorBody, Vm};
use ferro_api::storage::{CreateSnapshot, RestoreVm, Snapshot};
use ferro_api::{DiskConfig, DiskFormat};
use rusqlite::{params, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};

use crate::error::DaemonError;
use crate::images::chain_uses;
use crate::ops::{self, check_name};
use crate::store::{self, now_ms, Store, VmRecord};
use crate::supervisor::Supervisor;

/// The schema migration of the `snapshots` table (the store's migration list holds it).
pub const MIGRATION: &str = "CREATE TABLE snapshots (
        vm TEXT NOT NULL,
        name TEXT NOT NULL,
        data TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (vm, name)
    );
    CREATE TRIGGER snapshots_of_deleted_vm AFTER DELETE ON vms
    BEGIN DELETE FROM snapshots WHERE vm = OLD.name; END;";

/// A row's `data`: the API view plus the VM's disks as they were (paths = the layers) and,
/// for a memory snapshot, the VM's definition then (a restore brings it back).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Row {
    pub(crate) snapshot: Snapshot,
    pub(crate) disks: Vec<DiskConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) config: Option<ferro_api::VmConfig>,
}

fn corrupt() -> DaemonError {
    DaemonError::Store(rusqlite::Error::InvalidColumnType(
        0,
        "snapshots.data".into(),
        rusqlite::types::Type::Text,
    ))
}

fn no_such(vm: &str, snap: &str) -> DaemonError {
    DaemonError::NoSnapshot {
        vm: vm.to_string(),
        name: snap.to_string(),
    }
}

pub(crate) fn taken(vm: &str, snap: &str) -> DaemonError {
    DaemonError::Conflict(format!(
        "VM '{vm}' has a snapshot named '{snap}' already: pick another name or delete it first"
    ))
}

pub(crate) fn rows(s: &Store, vm: &str) -> Result<Vec<Row>, DaemonError> {
    let mut st = s
        .conn()
        .prepare("SELECT data FROM snapshots WHERE vm = ?1 ORDER BY created_ms, name")?;
    let it = st.query_map([vm], |r| r.get::<_, String>(0))?;
    it.map(|d| serde_json::from_str(&d?).map_err(|_| corrupt()))
        .collect()
}

pub(crate) fn row(s: &Store, vm: &str, snap: &str) -> Result<Row, DaemonError> {
    let data: Option<String> = s
        .conn()
        .query_row(
            "SELECT data FROM snapshots WHERE vm = ?1 AND name = ?2",
            [vm, snap],
            |r| r.get(0),
        )
        .optional()?;
    serde_json::from_str(&data.ok_or_else(|| no_such(vm, snap))?).map_err(|_| corrupt())
}

pub(crate) fn insert(tx: &Transaction<'_>, r: &Row) -> Result<(), DaemonError> {
    let data = serde_json::to_string(r).map_err(|e| DaemonError::BadRequest(e.to_string()))?;
    let res = tx.execute(
        "INSERT INTO snapshots (vm, name, data, created_ms) VALUES (?1, ?2, ?3, ?4)",
        params![
            r.snapshot.vm,
            r.snapshot.name,
            data,
            i64::try_from(r.snapshot.created_ms).unwrap_or(0)
        ],
    );
    match res {
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Err(taken(&r.snapshot.vm, &r.snapshot.name))
        }
        other => other.map(|_| ()).map_err(DaemonError::from),
    }
}

/// Every snapshot of VM `vm`, oldest first.
pub fn list(sup: &Supervisor, vm: &str) -> Result<Vec<Snapshot>, DaemonError> {
    sup.store(|s| {
        s.get(vm)?;
        Ok(rows(s, vm)?.into_iter().map(|r| r.snapshot).collect())
    })
}

fn stopped(rec: &VmRecord, verb: &str) -> Result<(), DaemonError> {
    if rec.state.has_vmm() {
        return Err(DaemonError::InvalidState(format!(
            "VM '{}' is {}: stop it before you {verb} (ferro vm stop {})",
            rec.name,
            rec.state.as_str(),
            rec.name
        )));
    }
    Ok(())
}

pub(crate) fn absolute(p: &Path) -> Result<PathBuf, DaemonError> {
    std::fs::canonicalize(p).map_err(|e| {
        DaemonError::Conflict(format!(
            "disk {} cannot be reached: {e} (repair or remove the disk first)",
            p.display()
        ))
    })
}

fn overlay_on(layer: &Path, top: &Path, like: &DiskConfig) -> Result<DiskConfig, DaemonError> {
    ferro_disk::create_qcow2_overlay(top, layer).map_err(|e| match e {
        ferro_disk::DiskError::ChainTooDeep { .. } => DaemonError::Conflict(format!(
            "disk {}: {e}: delete an older snapshot first",
            layer.display()
        )),
        e => DaemonError::Io {
            what: format!("cannot make an overlay on {}", layer.display()),
            source: std::io::Error::other(e.to_string()),
        },
    })?;
    Ok(DiskConfig {
        path: top.to_path_buf(),
        format: Some(DiskFormat::Qcow2),
        readonly: like.readonly,
        serial: like.serial.clone(),
        cache: like.cache,
    })
}

/// Fresh overlays on `layers` (read-only disks stay as they are) under `dir`; removes what it
/// made when one fails.
pub(crate) fn overlays(
    layers: &[DiskConfig],
    dir: &Path,
    stamp: u64,
) -> Result<Vec<DiskConfig>, DaemonError> {
    let mut made: Vec<PathBuf> = Vec::new();
    let mut out = Vec::new();
    for (i, d) in layers.iter().enumerate() {
        if d.readonly {
            out.push(d.clone());
            continue;
        }
        let r = absolute(&d.path).and_then(|base| {
            let top = dir.join(format!("disk{i}-snap-{stamp}.qcow2"));
            overlay_on(&base, &top, d)
        });
        match r {
            Ok(disk) => {
                made.push(disk.path.clone());
                out.push(disk);
            }
            Err(e) => {
                for p in &made {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e);
            }
        }
    }
    Ok(out)
}

/// Snapshots stopped VM `vm`'s disks.
pub async fn create(
    sup: &Supervisor,
    vm: &str,
    req: CreateSnapshot,
) -> Result<Snapshot, DaemonError> {
    check_name(&req.name)?;
    if req.memory {
        return crate::memsnap::create(sup, vm, req).await;
    }
    if req.dir.is_some() {
        return Err(DaemonError::BadRequest(
            "dir is for memory snapshots (memory: true)".into(),
        ));
    }
    let _guard = sup.vm_lock(vm).await;
    let mut rec = sup.store(|s| s.get(vm))?;
    stopped(&rec, "snapshot it")?;
    if sup.store(|s| row(s, vm, &req.name)).is_ok() {
        return Err(taken(vm, &req.name));
    }
    let dir = sup.dir(vm).0;
    std::fs::create_dir_all(&dir).map_err(DaemonError::io("cannot create the VM directory"))?;
    // The layers are the disks as they are now, by absolute path (overlays name them so).
    let mut layers = Vec::new();
    for d in &rec.config.disks {
        let mut l = d.clone();
        l.path = absolute(&d.path)?;
        layers.push(l);
    }
    let stamp = now_ms();
    let tops = overlays(&layers, &dir, stamp)?;
    let snapshot = Snapshot {
        name: req.name.clone(),
        vm: vm.to_string(),
        disks: layers.iter().map(|d| d.path.clone()).collect(),
        memory: false,
        created_ms: stamp,
        dir: None,
        bytes: None,
        paused_ms: None,
    };
    let r = Row {
        snapshot: snapshot.clone(),
        disks: layers.clone(),
        config: None,
    };
    rec.config.disks = tops.clone();
    let saved = sup.store(|s| {
        s.transaction(|tx| {
            insert(tx, &r)?;
            store::update_vm(tx, &rec)?;
            store::insert_event(
                tx,
                vm,
                "snapshot",
                &format!("disk snapshot '{}' taken", req.name),
            )
        })
    });
    if let Err(e) = saved {
        for t in tops.iter().filter(|t| !t.readonly) {
            let _ = std::fs::remove_file(&t.path);
        }
        return Err(e);
    }
    for l in layers.iter().filter(|l| !l.readonly) {
        let _ = std::fs::set_permissions(&l.path, std::fs::Permissions::from_mode(0o444));
    }
    Ok(snapshot)
}

/// Whether `path` is a file the daemon made for VM `vm` (under its directory).
pub(crate) fn owned(sup: &Supervisor, vm: &str, path: &Path) -> bool {
    let dir = sup.dir(vm).0;
    match (std::fs::canonicalize(path), std::fs::canonicalize(&dir)) {
        (Ok(p), Ok(d)) => p.starts_with(d),
        _ => false,
    }
}

/// Whether anything the daemon keeps still needs `path`: a VM's disk (or its backing chain),
/// a snapshot's layer (or its chain), a template's base. `skip` leaves out one VM.
pub(crate) fn in_use(s: &Store, path: &Path, skip: Option<&str>) -> Result<bool, DaemonError> {
    for vm in s.list()? {
        if skip == Some(vm.name.as_str()) {
            continue;
        }
        if vm.config.disks.iter().any(|d| chain_uses(&d.path, path)) {
            return Ok(true);
        }
        if rows(s, &vm.name)?
            .iter()
            .any(|r| r.disks.iter().any(|d| chain_uses(&d.path, path)))
        {
            return Ok(true);
        }
    }
    Ok(crate::templates::uses_any(s, &[path.to_path_buf()])?.is_some())
}

/// Reverts stopped VM `vm`'s disks to snapshot `snap`.
pub async fn revert(sup: &Supervisor, vm: &str, snap: &str) -> Result<Vm, DaemonError> {
    let _guard = sup.vm_lock(vm).await;
    let mut rec = sup.store(|s| s.get(vm))?;
    stopped(&rec, "revert it")?;
    let r = sup.store(|s| row(s, vm, snap))?;
    let dir = sup.dir(vm).0;
    std::fs::create_dir_all(&dir).map_err(DaemonError::io("cannot create the VM directory"))?;
    let tops = overlays(&r.disks, &dir, now_ms())?;
    let old = std::mem::replace(&mut rec.config.disks, tops.clone());
    let saved = sup.store(|s| {
        s.transaction(|tx| {
            store::update_vm(tx, &rec)?;
            store::insert_event(
                tx,
                vm,
                "reverted",
                &format!("disks reverted to snapshot '{snap}'"),
            )
        })
    });
    if let Err(e) = saved {
        for t in tops.iter().filter(|t| !t.readonly) {
            let _ = std::fs::remove_file(&t.path);
        }
        return Err(e);
    }
    // The tops the VM had are garbage unless something else is built on them.
    for d in old.iter().filter(|d| !d.readonly) {
        if owned(sup, vm, &d.path) && !sup.store(|s| in_use(s, &d.path, None))? {
            let _ = std::fs::remove_file(&d.path);
        }
    }
    ops::get(sup, vm)
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<Output, DaemonError> {
    Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(DaemonError::io("cannot run qemu-img (install qemu-utils)"))
}

/// Rebases `file` (qcow2) from its backing file onto `onto` (`None`: no backing file), keeping
/// what the guest sees: `qemu-img rebase` copies what differs into `file` (blocking).
fn rebase(file: &Path, onto: Option<(&Path, &str)>) -> Result<(), DaemonError> {
    let mode = std::fs::metadata(file)
        .map(|m| m.permissions().mode())
        .map_err(DaemonError::io(format!("cannot read {}", file.display())))?;
    let _ = std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode | 0o200));
    let mut args: Vec<&std::ffi::OsStr> = vec!["rebase".as_ref(), "-f".as_ref(), "qcow2".as_ref()];
    match onto {
        Some((b, fmt)) => {
            let more: [&std::ffi::OsStr; 4] =
                ["-b".as_ref(), b.as_os_str(), "-F".as_ref(), fmt.as_ref()];
            args.extend(more);
        }
        None => {
            let more: [&std::ffi::OsStr; 2] = ["-b".as_ref(), "".as_ref()];
            args.extend(more);
        }
    }
    args.push(file.as_os_str());
    let out = qemu_img(&args);
    let _ = std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode));
    let out = out?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DaemonError::Io {
            what: format!("cannot rebase {}", file.display()),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        })
    }
}

/// The image `file` is directly based on, with its format.
fn backing_of(file: &Path) -> Option<(PathBuf, &'static str)> {
    let info = ferro_disk::info(file).ok()?;
    let b = info.backing_chain.first()?;
    Some((b.path.clone(), b.format.as_str()))
}

/// Deletes snapshot `snap` of stopped VM `vm`, folding its layers into the files above them.
pub async fn remove(sup: &Supervisor, vm: &str, snap: &str) -> Result<(), DaemonError> {
    let _guard = sup.vm_lock(vm).await;
    let rec = sup.store(|s| s.get(vm))?;
    stopped(&rec, "delete its snapshots")?;
    let r = sup.store(|s| row(s, vm, snap))?;
    let others: Vec<Row> = sup
        .store(|s| rows(s, vm))?
        .into_iter()
        .filter(|o| o.snapshot.name != snap)
        .collect();
    // Files of this VM that may sit directly on one of the layers.
    let mut above: Vec<PathBuf> = rec.config.disks.iter().map(|d| d.path.clone()).collect();
    for o in &others {
        above.extend(o.disks.iter().map(|d| d.path.clone()));
    }
    let mut plan: Vec<(PathBuf, Option<(PathBuf, &'static str)>)> = Vec::new();
    let mut drop_files = Vec::new();
    for layer in r.disks.iter().filter(|d| !d.readonly).map(|d| &d.path) {
        if above.iter().any(|a| same_file(a, layer)) {
            continue; // still a disk, or another snapshot's layer, as it is
        }
        if !owned(sup, vm, layer) || sup.store(|s| in_use(s, layer, Some(vm)))? {
            // Not the daemon's (the VM's original disk), or a linked clone or template is
            // based on it: it stays as a base, and the chains on it stay as they are.
            continue;
        }
        let onto = backing_of(layer);
        for a in &above {
            if backing_of(a).is_some_and(|(b, _)| same_file(&b, layer)) {
                plan.push((a.clone(), onto.clone()));
            }
        }
        drop_files.push(layer.clone());
    }
    // Rebasing keeps each file's contents, so a failure part way leaves every disk and
    // snapshot as it was (some merely no longer based on the layer).
    let work = plan.clone();
    tokio::task::spawn_blocking(move || {
        work.iter().try_for_each(|(file, onto)| {
            rebase(file, onto.as_ref().map(|(p, f)| (p.as_path(), *f)))
        })
    })
    .await
    .map_err(|e| DaemonError::Vmm(format!("the snapshot task failed: {e}")))??;
    sup.store(|s| {
        s.transaction(|tx| {
            tx.execute(
                "DELETE FROM snapshots WHERE vm = ?1 AND name = ?2",
                [vm, snap],
            )?;
            store::insert_event(
                tx,
                vm,
                "snapshot_deleted",
                &format!("snapshot '{snap}' deleted"),
            )
        })
    })?;
    for f in &drop_files {
        if !sup.store(|s| in_use(s, f, None))? {
            let _ = std::fs::remove_file(f);
        }
    }
    if let Some(dir) = &r.snapshot.dir {
        crate::memsnap::remove_dir(dir);
    }
    Ok(())
}

type ApiResult<T> = Result<T, DaemonError>;

fn bad_json(e: JsonRejection) -> DaemonError {
    DaemonError::BadRequest(format!("invalid request body: {}", e.body_text()))
}

/// A VM's disk snapshots, oldest first.
#[utoipa::path(get, path = "/v1/vms/{name}/snapshots", params(("name" = String, Path)), responses(
    (status = 200, body = Vec<Snapshot>), (status = 404, body = ApiErrorBody)))]
async fn list_snapshots(
    State(sup): State<Supervisor>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Json<Vec<Snapshot>>> {
    Ok(Json(list(&sup, &name)?))
}

/// Snapshots a stopped VM's disks (qcow2 overlays), or with `memory: true` a running or
/// paused VM's memory, device state and disks at one instant (the VM runs on).
#[utoipa::path(post, path = "/v1/vms/{name}/snapshots", params(("name" = String, Path)), request_body = CreateSnapshot, responses(
    (status = 201, body = Snapshot), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody),
    (status = 409, body = ApiErrorBody), (status = 500, body = ApiErrorBody)))]
async fn create_snapshot(
    State(sup): State<Supervisor>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<CreateSnapshot>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Snapshot>)> {
    let Json(req) = body.map_err(bad_json)?;
    Ok((StatusCode::CREATED, Json(create(&sup, &name, req).await?)))
}

/// Reverts a stopped VM's disks to a snapshot (later snapshots are kept).
#[utoipa::path(post, path = "/v1/vms/{name}/snapshots/{snapshot}/revert",
    params(("name" = String, Path), ("snapshot" = String, Path)), responses(
    (status = 200, body = Vm), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn revert_snapshot(
    State(sup): State<Supervisor>,
    UrlPath((name, snap)): UrlPath<(String, String)>,
) -> ApiResult<Json<Vm>> {
    Ok(Json(revert(&sup, &name, &snap).await?))
}

/// Deletes a snapshot of a stopped VM (its data is folded into the files above it).
#[utoipa::path(delete, path = "/v1/vms/{name}/snapshots/{snapshot}",
    params(("name" = String, Path), ("snapshot" = String, Path)), responses(
    (status = 204), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn delete_snapshot(
    State(sup): State<Supervisor>,
    UrlPath((name, snap)): UrlPath<(String, String)>,
) -> ApiResult<StatusCode> {
    remove(&sup, &name, &snap).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Runs a stopped VM from one of its memory snapshots (`snapshot`) or a snapshot directory
/// (`from`): its guest carries on where it was saved, on the disks as they were then. A
/// directory that is missing, corrupt or of another format version is a 422 and leaves the
/// VM stopped and unchanged.
#[utoipa::path(post, path = "/v1/vms/{name}/restore", params(("name" = String, Path)), request_body = RestoreVm, responses(
    (status = 200, body = Vm), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody),
    (status = 409, body = ApiErrorBody),
    (status = 422, description = "not a snapshot this ferro-vmm runs (bad_snapshot, unsupported_snapshot)", body = ApiErrorBody),
    (status = 500, body = ApiErrorBody)))]
async fn restore_vm(
    State(sup): State<Supervisor>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<RestoreVm>, JsonRejection>,
) -> ApiResult<Json<Vm>> {
    let Json(req) = body.map_err(bad_json)?;
    Ok(Json(crate::memsnap::restore(&sup, &name, req).await?))
}

/// The OpenAPI part of the snapshot routes (merged into the daemon's document).
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        list_snapshots,
        create_snapshot,
        revert_snapshot,
        delete_snapshot,
        restore_vm
    ),
    components(schemas(Snapshot, CreateSnapshot, RestoreVm))
)]
pub struct SnapshotDoc;

/// The snapshot routes.
pub fn router() -> Router<Supervisor> {
    Router::new()
        .route(
            "/v1/vms/{name}/snapshots",
            get(list_snapshots).post(create_snapshot),
        )
        .route(
            "/v1/vms/{name}/snapshots/{snapshot}/revert",
            post(revert_snapshot),
        )
        .route(
            "/v1/vms/{name}/snapshots/{snapshot}",
            delete(delete_snapshot),
        )
        .route("/v1/vms/{name}/restore", post(restore_vm))
}
