//! Live migration between two daemons: `POST /v1/vms/{name}/migrate` on the source, the
//! `/v1/migrations/incoming` routes on the destination. By default disks are not copied: both
//! hosts see them at the same paths (shared storage); the VMMs move memory and device state.
//! With `copy_storage` the VMMs copy the disks (while the guest runs), the kernel and the
//! initrd too, into the destination's `DATA/vms/NAME/` (`disk{i}.raw`, `kernel`, `initrd`);
//! once the destination has taken the VM over, the source deletes the disk files it kept in
//! its own `DATA/vms/NAME/`.
//!
//! ```text
//! source daemon                                   destination daemon
//!  POST /v1/vms/web/migrate {"to": "http://B"}  (202, operation)
//!  ├─ POST B/v1/migrations/incoming {name, config, restart, host}
//!  │                                              define `web` in state incoming, start
//!  │                                              ferro-vmm --incoming tcp:HOST:0
//!  │   <── {"address": "HOST:PORT"} ─────────────
//!  ├─ control: {"cmd":"migrate","to":"HOST:PORT"}  (polls `status` for the progress)
//!  ├─ ok: the source VMM exits (reason migrated)
//!  │   POST B/v1/migrations/incoming/web/complete  web: running, supervised here
//!  │   forget `web` (its disks stay: they are the destination's now)
//!  └─ error: the source VM runs on
//!      DELETE B/v1/migrations/incoming/web         kill the incoming VMM, forget `web`
//! ```
//! The daemons talk HTTP on their TCP listeners with a bearer token: the source sends its
//! peer token (`ferro daemon --peer-token-file`, default its own `--token-file`).
//!
//! The last-message problem (the destination runs the VM once it has sent its ACK; if the
//! ACK is lost the source VMM resumes too) is fenced here: a source whose VMM reports a
//! failure deletes the destination's half, which kills that VMM whatever it got. Disk writes
//! the destination guest made in those milliseconds are lost to the source's guest's view.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use ferro_api::rest::{
    ApiErrorBody, IncomingMigration, IncomingVm, MigrateVm, MigrationResult, Operation, Vm, VmState,
};
use serde_json::{json, Value};

use crate::error::DaemonError;
use crate::operations::Tracker;
use crate::ops::{self, check_name};
use crate::process;
use crate::store::{self, now_ms, VmRecord};
use crate::supervisor::Supervisor;

/// The longest a migration may take.
const MIGRATE_LIMIT: Duration = Duration::from_secs(30 * 60);
/// How long one call to a peer daemon may take.
const PEER_LIMIT: Duration = Duration::from_secs(30);
/// How long the destination of a storage migration may take to write the copied files back
/// to its disk (its `complete` answers only then; the source keeps its copy until it does).
const WRITEBACK_LIMIT: Duration = Duration::from_secs(30 * 60);

/// `http://HOST:PORT` → (`HOST:PORT`, `HOST`).
fn peer_address(to: &str) -> Result<(String, String), DaemonError> {
    let bad = || {
        DaemonError::BadRequest(format!(
            "to '{to}' is not http://HOST:PORT (the destination daemon's TCP listener)"
        ))
    };
    let rest = to.strip_prefix("http://").ok_or_else(bad)?;
    let hostport = rest.trim_end_matches('/');
    if hostport.contains('/') {
        return Err(bad());
    }
    let (host, port) = hostport.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((hostport.to_string(), host.to_string()))
}

/// One call to a peer daemon's API; its answer's status and JSON body.
async fn peer_call(
    at: &str,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value), DaemonError> {
    peer_call_within(PEER_LIMIT, at, token, method, path, body).await
}

/// [`peer_call`] with its own time limit.
async fn peer_call_within(
    limit: Duration,
    at: &str,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value), DaemonError> {
    let unreachable = |e: String| {
        DaemonError::Peer(format!(
            "cannot reach the destination daemon at http://{at}: {e}"
        ))
    };
    let call = async {
        let stream = tokio::net::TcpStream::connect(at)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, at)
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        let body = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let req = req.body(body).map_err(|e| unreachable(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let bytes = axum::body::to_bytes(Body::new(resp.into_body()), 1 << 20)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Ok((status, v))
    };
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| unreachable(format!("no answer within {limit:?}")))?
}

/// A peer's answer as a result: success, or its error message as [`DaemonError::Peer`].
fn peer_ok(at: &str, (status, v): (StatusCode, Value)) -> Result<Value, DaemonError> {
    if status.is_success() {
        return Ok(v);
    }
    let msg = v["message"].as_str().unwrap_or("no message");
    let code = v["code"].as_str().unwrap_or("error");
    Err(DaemonError::Peer(format!(
        "the destination daemon at http://{at} refused ({status}, {code}): {msg}"
    )))
}

/// The checks a migration must pass before it starts (repeated under the VM's lock).
fn precheck(sup: &Supervisor, name: &str, req: &MigrateVm) -> Result<String, DaemonError> {
    let token = sup.peer_token().ok_or_else(|| {
        DaemonError::BadRequest(
            "this daemon has no token for its peers: start it with --token-file (TCP) or --peer-token-file".into(),
        )
    })?;
    peer_address(&req.to)?;
    let rec = sup.store(|s| s.get(name))?;
    if rec.state != VmState::Running || sup.pid(name).is_none() {
        return Err(DaemonError::InvalidState(format!(
            "VM '{name}' is {}: only a running VM migrates",
            rec.state.as_str()
        )));
    }
    if !sup.store(|s| crate::snapshots::rows(s, name))?.is_empty() {
        return Err(DaemonError::Conflict(format!(
            "VM '{name}' has snapshots, which stay with this daemon: delete them before migrating it"
        )));
    }
    Ok(token)
}

/// Reads the migration figures out of a VMM status answer.
fn figures(v: &Value) -> (u32, u64, u64, u64, Option<u64>, String) {
    let m = &v["status"]["migration"];
    (
        u32::try_from(m["rounds"].as_u64().unwrap_or(0)).unwrap_or(u32::MAX),
        m["bytes"].as_u64().unwrap_or(0),
        m["remaining_dirty_pages"].as_u64().unwrap_or(0),
        m["total_ms"].as_u64().unwrap_or(0),
        m["downtime_ms"].as_u64(),
        m["phase"].as_str().unwrap_or("").to_string(),
    )
}

/// Shows the source VMM's migration progress in the operation until `done`; `total_bytes` is
/// what round 0 carries at most (the memory, and the disks of a storage migration).
async fn follow(sup: Supervisor, name: String, total_bytes: u64, t: Tracker) {
    let control = sup.dir(&name).control();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(v) =
            process::request_value(&control, &json!({"cmd": "status"}), Duration::from_secs(2))
                .await
        else {
            continue;
        };
        if v["status"]["migration"].is_null() {
            continue;
        }
        let (rounds, bytes, dirty, _, downtime, phase) = figures(&v);
        // Round 0 carries the memory (and disks) once; later rounds and the final one the rest.
        let pct = 10.0 + 85.0 * (bytes as f64 / total_bytes.max(1) as f64).min(1.0);
        let mut msg = format!(
            "{phase}: round {rounds}, {} KiB sent, {dirty} dirty pages left",
            bytes >> 10
        );
        let m = &v["status"]["migration"];
        if let Some(disk) = m["disk_bytes"].as_u64() {
            let left = m["remaining_dirty_disk_bytes"].as_u64().unwrap_or(0);
            msg.push_str(&format!(
                ", disks: {} MiB sent, {} KiB written since",
                disk >> 20,
                left >> 10
            ));
        }
        if let Some(d) = downtime {
            msg.push_str(&format!(", downtime {d} ms"));
        }
        t.set(pct, &msg);
    }
}

/// Migrates running VM `name` to the daemon at `req.to` (see the module docs).
pub async fn migrate(
    sup: &Supervisor,
    name: &str,
    req: MigrateVm,
    t: Tracker,
) -> Result<MigrationResult, DaemonError> {
    let t0 = Instant::now();
    let _guard = sup.vm_lock(name).await;
    let token = precheck(sup, name, &req)?;
    let (at, host) = peer_address(&req.to)?;
    let rec = sup.store(|s| s.get(name))?;
    t.set(1.0, "the destination prepares");
    let incoming = IncomingVm {
        name: name.to_string(),
        config: rec.config.clone(),
        restart: rec.restart,
        host: Some(host.clone()),
        from: sup.0.data_dir.display().to_string(),
        nics: ops::view(sup, &rec).nics,
        copy_storage: req.copy_storage,
    };
    let body = serde_json::to_value(&incoming).map_err(|e| DaemonError::Vmm(e.to_string()))?;
    let answer = peer_ok(
        &at,
        peer_call(
            &at,
            &token,
            Method::POST,
            "/v1/migrations/incoming",
            Some(body),
        )
        .await?,
    )?;
    let answer: IncomingMigration = serde_json::from_value(answer).map_err(|e| {
        DaemonError::Peer(format!("the destination's answer is not understood: {e}"))
    })?;
    // The destination may listen on a wildcard address: reach it where its daemon is.
    let port = answer.address.rsplit(':').next().unwrap_or_default();
    let vmm_to = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    t.set(10.0, &format!("sending the VM to {vmm_to}"));
    let abort = |why: DaemonError| {
        let token = token.clone();
        let at = at.clone();
        async move {
            let _ = peer_call(
                &at,
                &token,
                Method::DELETE,
                &format!("/v1/migrations/incoming/{name}"),
                None,
            )
            .await;
            why
        }
    };
    sup.set_migrating(name, true);
    // Also tells a restarted daemon not to restart a VMM that ended meanwhile.
    sup.store(|s| s.event(name, "migrating", &format!("migrating to {}", req.to)))?;
    let mut cmd = json!({"cmd": "migrate", "to": vmm_to});
    if req.copy_storage {
        cmd["copy_storage"] = json!(true);
    }
    if let Some(t) = &answer.token {
        cmd["token"] = json!(t);
    }
    if let Some(d) = req.downtime_ms {
        cmd["downtime_ms"] = json!(d);
    }
    if let Some(r) = req.max_rounds {
        cmd["max_rounds"] = json!(r);
    }
    let disk_bytes: u64 = if req.copy_storage {
        rec.config
            .disks
            .iter()
            .filter_map(|d| ferro_disk::info(&d.path).ok())
            .map(|i| i.virtual_size)
            .sum()
    } else {
        0
    };
    let progress = tokio::spawn(follow(
        sup.clone(),
        name.to_string(),
        (rec.config.memory_mib << 20) + disk_bytes,
        t.clone(),
    ));
    let r = process::request_value(&sup.dir(name).control(), &cmd, MIGRATE_LIMIT).await;
    progress.abort();
    let done = match r {
        Ok(v) => v,
        Err(e) => {
            sup.set_migrating(name, false);
            let e = DaemonError::Vmm(format!(
                "the migration of VM '{name}' to {} failed: {e}; the VM runs on here",
                req.to
            ));
            let _ = sup.store(|s| s.event(name, "migration_failed", &e.to_string()));
            return Err(abort(e).await);
        }
    };
    let (rounds, bytes, _, total_ms, downtime_ms, _) = figures(&done);
    t.set(97.0, "the destination takes over");
    // The source VMM exits by itself once it answered.
    if !sup.wait_ended(name, Duration::from_secs(10)).await {
        let _ = sup.retire_locked(name).await;
    }
    if req.copy_storage {
        t.set(
            98.0,
            "the destination writes the copied storage back to its disk",
        );
    }
    let completed = peer_call_within(
        WRITEBACK_LIMIT + PEER_LIMIT,
        &at,
        &token,
        Method::POST,
        &format!("/v1/migrations/incoming/{name}/complete"),
        None,
    )
    .await
    .and_then(|r| peer_ok(&at, r));
    // The guest runs there now, whatever the answer: this daemon forgets it, and its disks
    // only when they were copied and the destination confirmed it has the VM.
    sup.store(|s| s.transaction(|tx| store::delete_vm(tx, name)))?;
    if req.copy_storage && completed.is_ok() {
        forget_own_disks(sup, &rec.config, name);
    }
    forget_files(sup, name);
    completed.map_err(|e| {
        DaemonError::Peer(format!(
            "VM '{name}' was migrated and runs at {}, but its daemon did not take it over: {e}",
            req.to
        ))
    })?;
    Ok(MigrationResult {
        vm: name.to_string(),
        to: req.to.clone(),
        rounds,
        bytes,
        total_ms,
        downtime_ms,
        daemon_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// Deletes the destination's half of a migration of `name` to `to` that a restarted daemon
/// found abandoned (best effort: the destination's watchdog removes it anyway).
pub(crate) async fn abort_remote(sup: Supervisor, to: String, name: String) {
    // The peer token is set once the daemon is up, after the re-adoption that calls this.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (Some(token), Ok((at, _))) = (sup.peer_token(), peer_address(&to)) else {
        return;
    };
    let _ = peer_call(
        &at,
        &token,
        Method::DELETE,
        &format!("/v1/migrations/incoming/{name}"),
        None,
    )
    .await;
}

/// After a storage migration: deletes the disk files of `config` that lie in this daemon's
/// folder for VM `name` (overlays and full clones it made); disks elsewhere (a template's
/// base, a file the user named) stay.
fn forget_own_disks(sup: &Supervisor, config: &ferro_api::VmConfig, name: &str) {
    let dir = sup.dir(name).0;
    for d in &config.disks {
        if d.path.parent() == Some(dir.as_path()) {
            let _ = std::fs::remove_file(&d.path);
        }
    }
}

/// Removes what the daemon and the VMM kept in `DATA/vms/NAME` for a VM that left: their own
/// files only, never a disk (the directory goes if that emptied it).
fn forget_files(sup: &Supervisor, name: &str) {
    let dir = sup.dir(name);
    for f in [
        dir.config(),
        dir.control(),
        dir.console(),
        dir.log(),
        dir.console_log(),
        dir.console().with_extension("sock.replay"),
    ] {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_dir_all(dir.0.join(".restore"));
    let _ = std::fs::remove_dir(dir.0.join("snapshots"));
    let _ = std::fs::remove_dir(&dir.0);
}

/// Defines VM `req.name` in state `incoming` and starts its incoming VMM; nothing is left
/// when that fails.
pub async fn incoming(sup: &Supervisor, req: IncomingVm) -> Result<IncomingMigration, DaemonError> {
    check_name(&req.name)?;
    let config = if req.copy_storage {
        // The files come in the stream, into this daemon's folder for the VM.
        req.config
            .validate()
            .map_err(|e| DaemonError::BadRequest(format!("{e} on the destination")))?;
        req.config.relocated(&sup.dir(&req.name).0)
    } else {
        ops::check_config(&req.config).map_err(|e| {
            DaemonError::BadRequest(format!(
                "{e} on the destination (migration needs the kernel and disks at the same paths on both hosts, or copy_storage)"
            ))
        })?;
        req.config
    };
    let _guard = sup.vm_lock(&req.name).await;
    if req.copy_storage && sup.dir(&req.name).0.exists() {
        // Leftovers of a VM of this name that is not defined here (it would be in the
        // store): refused rather than overwritten or deleted.
        return Err(DaemonError::Conflict(format!(
            "{} exists on the destination: the copied storage would go there",
            sup.dir(&req.name).0.display()
        )));
    }
    let mut rec = VmRecord {
        name: req.name.clone(),
        config,
        restart: req.restart,
        state: VmState::Incoming,
        pid: None,
        restarts: 0,
        created_ms: now_ms(),
    };
    let from = if req.from.is_empty() {
        "another daemon".to_string()
    } else {
        req.from.clone()
    };
    sup.store(|s| {
        s.transaction(|tx| {
            // The source's taps and addresses where nobody here has them: `sync` keeps a
            // NIC's row by MAC.
            for n in &req.nics {
                let ip = n.address.as_deref().and_then(|a| a.split('/').next());
                tx.execute(
                    "INSERT OR IGNORE INTO nics (vm, idx, mac, tap, ip) VALUES (?1, ?2, ?3, ?4, ?5)",
                    rusqlite::params![rec.name, i64::from(n.index), n.mac, n.tap, ip],
                )?;
            }
            crate::net::sync(tx, &sup.0.net, &rec.name, &mut rec.config.nets)?;
            store::insert_vm(tx, &rec)?;
            store::insert_event(
                tx,
                &rec.name,
                "created",
                &format!("incoming migration from {from}"),
            )
        })
    })?;
    let host = req.host.as_deref().unwrap_or("0.0.0.0");
    match sup.launch_incoming(&rec, host, req.copy_storage).await {
        Ok((address, token)) => {
            let pid = sup.store(|s| s.get(&rec.name))?.pid;
            tokio::spawn(watchdog(sup.clone(), rec.name.clone(), pid));
            Ok(IncomingMigration {
                vm: rec.name,
                address,
                token: Some(token),
            })
        }
        Err(e) => {
            let _ = sup.store(|s| s.transaction(|tx| store::delete_vm(tx, &rec.name)));
            let _ = std::fs::remove_dir_all(sup.dir(&rec.name).0);
            Err(e)
        }
    }
}

/// How long an incoming VMM may go without receiving anything before it is given up.
const INCOMING_IDLE: Duration = Duration::from_secs(120);
/// How long a VM that arrived may wait for the source's `complete` before it is taken over
/// anyway (the source daemon would have deleted it within this time had the migration
/// failed there).
const UNCONFIRMED: Duration = Duration::from_secs(60);

/// Watches an incoming VM whose source daemon may never call again: one that receives
/// nothing for [`INCOMING_IDLE`] is aborted; one that has arrived and runs is taken over
/// after [`UNCONFIRMED`].
async fn watchdog(sup: Supervisor, name: String, pid: Option<(u32, u64)>) {
    let control = sup.dir(&name).control();
    let mut last = (0u64, Instant::now());
    let mut arrived: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        match sup.store(|s| s.get(&name)) {
            Ok(r) if r.state == VmState::Incoming && r.pid == pid => {}
            _ => return,
        }
        let Ok(v) =
            process::request_value(&control, &json!({"cmd": "status"}), Duration::from_secs(5))
                .await
        else {
            continue;
        };
        if v["status"]["state"] == "incoming" {
            let bytes = v["status"]["migration"]["bytes"].as_u64().unwrap_or(0);
            if bytes != last.0 {
                last = (bytes, Instant::now());
            } else if last.1.elapsed() > INCOMING_IDLE {
                let _ =
                    sup.store(|s| s.event(&name, "migration_failed", "nothing arrived: given up"));
                let _ = abort(&sup, &name).await;
                return;
            }
        } else if arrived.get_or_insert_with(Instant::now).elapsed() > UNCONFIRMED {
            let _ = complete(&sup, &name).await;
            return;
        }
    }
}

fn not_incoming(name: &str, rec: &VmRecord) -> DaemonError {
    DaemonError::InvalidState(format!(
        "VM '{name}' is {}, not an incoming migration",
        rec.state.as_str()
    ))
}

/// The source says the migration of `name` completed: the VM runs here from now on.
pub async fn complete(sup: &Supervisor, name: &str) -> Result<Vm, DaemonError> {
    let guard = sup.vm_lock(name).await;
    let rec = sup.store(|s| s.get(name))?;
    if rec.state != VmState::Incoming || !sup.watches(name) {
        return Err(not_incoming(name, &rec));
    }
    let control = sup.dir(name).control();
    let t = Instant::now();
    let state = loop {
        let v = process::request_value(&control, &json!({"cmd": "status"}), Duration::from_secs(5))
            .await?;
        match v["status"]["state"].as_str() {
            Some("running") => break VmState::Running,
            Some("paused") => break VmState::Paused,
            _ if t.elapsed() > Duration::from_secs(10) => {
                return Err(DaemonError::InvalidState(format!(
                    "VM '{name}' has not arrived: its VMM still waits"
                )))
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    // The token has served: the VM is here.
    let _ = std::fs::remove_file(sup.dir(name).migration_token());
    sup.store(|s| {
        s.set_state(name, state, rec.pid)?;
        s.event(
            name,
            "migrated",
            &format!(
                "migrated in: runs in VMM pid {}",
                rec.pid.map(|p| p.0).unwrap_or(0)
            ),
        )
    })?;
    sup.reset_history(name);
    drop(guard);
    // A storage migration: the source deletes its copy once this answers, so the copied files
    // must be on this host's disk first (the VM runs meanwhile; its lock is free).
    let t = Instant::now();
    loop {
        let v = process::request_value(&control, &json!({"cmd": "status"}), Duration::from_secs(5))
            .await?;
        match v["status"]["storage_synced"].as_bool() {
            None | Some(true) => break,
            Some(false) if t.elapsed() > WRITEBACK_LIMIT => {
                return Err(DaemonError::Vmm(format!(
                    "VM '{name}' runs here, but its copied storage was not written back to disk within {WRITEBACK_LIMIT:?} (see its VMM log): the source keeps its copy"
                )))
            }
            Some(false) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    ops::get(sup, name)
}

/// The source gave up: the incoming VMM is killed and `name` forgotten.
pub async fn abort(sup: &Supervisor, name: &str) -> Result<(), DaemonError> {
    let _guard = sup.vm_lock(name).await;
    let rec = sup.store(|s| s.get(name))?;
    if rec.state != VmState::Incoming {
        return Err(not_incoming(name, &rec));
    }
    sup.stop_locked(name, Duration::ZERO, true).await?;
    sup.store(|s| s.transaction(|tx| store::delete_vm(tx, name)))?;
    let _ = std::fs::remove_dir_all(sup.dir(name).0);
    Ok(())
}

type ApiResult<T> = Result<T, DaemonError>;

fn bad_json(e: JsonRejection) -> DaemonError {
    DaemonError::BadRequest(format!("invalid request body: {}", e.body_text()))
}

/// Live-migrates a running VM to another daemon (disks on shared storage): answers 202 with
/// an operation whose message shows the rounds, bytes and dirty pages, and whose result is a
/// `MigrationResult`. On success the VM is the destination's; on failure it runs on here.
#[utoipa::path(post, path = "/v1/vms/{name}/migrate", params(("name" = String, Path)), request_body = MigrateVm, responses(
    (status = 202, description = "started: poll the operation", body = Operation),
    (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody),
    (status = 409, body = ApiErrorBody)))]
async fn migrate_vm(
    State(sup): State<Supervisor>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<MigrateVm>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(req) = body.map_err(bad_json)?;
    precheck(&sup, &name, &req)?;
    let (op, tracker) = sup.0.operations.begin("vm_migrate", &name);
    let ops = sup.0.operations.clone();
    let s = sup.clone();
    tokio::spawn(async move {
        let r = migrate(&s, &name, req, tracker.clone())
            .await
            .and_then(|v| serde_json::to_value(v).map_err(|e| DaemonError::Vmm(e.to_string())));
        ops.finish(&tracker, r);
    });
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/operations/{}", op.id))],
        Json(op),
    )
        .into_response())
}

/// Daemon to daemon: define an incoming VM and start the VMM that receives it.
#[utoipa::path(post, path = "/v1/migrations/incoming", request_body = IncomingVm, responses(
    (status = 201, body = IncomingMigration), (status = 400, body = ApiErrorBody),
    (status = 409, body = ApiErrorBody), (status = 500, body = ApiErrorBody)))]
async fn incoming_vm(
    State(sup): State<Supervisor>,
    body: Result<Json<IncomingVm>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<IncomingMigration>)> {
    let Json(req) = body.map_err(bad_json)?;
    Ok((StatusCode::CREATED, Json(incoming(&sup, req).await?)))
}

/// Daemon to daemon: the migration completed; the VM is running here.
#[utoipa::path(post, path = "/v1/migrations/incoming/{name}/complete", params(("name" = String, Path)), responses(
    (status = 200, body = Vm), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn complete_incoming(
    State(sup): State<Supervisor>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Json<Vm>> {
    Ok(Json(complete(&sup, &name).await?))
}

/// Daemon to daemon: the migration failed; the incoming VMM is killed and the VM forgotten.
#[utoipa::path(delete, path = "/v1/migrations/incoming/{name}", params(("name" = String, Path)), responses(
    (status = 204), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
async fn abort_incoming(
    State(sup): State<Supervisor>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<StatusCode> {
    abort(&sup, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The OpenAPI part of the migration routes.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(migrate_vm, incoming_vm, complete_incoming, abort_incoming),
    components(schemas(MigrateVm, IncomingVm, IncomingMigration, MigrationResult))
)]
pub struct MigrateDoc;

/// The migration routes.
pub fn router() -> Router<Supervisor> {
    Router::new()
        .route("/v1/vms/{name}/migrate", post(migrate_vm))
        .route("/v1/migrations/incoming", post(incoming_vm))
        .route(
            "/v1/migrations/incoming/{name}/complete",
            post(complete_incoming),
        )
        .route(
            "/v1/migrations/incoming/{name}",
            axum::routing::delete(abort_incoming),
        )
}

#[cfg(test)]
mod tests {
    use super::peer_address;

    #[test]
    fn peer_addresses() {
        assert_eq!(
            peer_address("http://10.0.0.2:7000").unwrap(),
            ("10.0.0.2:7000".to_string(), "10.0.0.2".to_string())
        );
        assert_eq!(
            peer_address("http://[::1]:7000/").unwrap(),
            ("[::1]:7000".to_string(), "::1".to_string())
        );
        for bad in [
            "10.0.0.2:7000",
            "http://h",
            "http://h:x",
            "http://:1",
            "http://h:1/v1",
        ] {
            assert!(peer_address(bad).is_err(), "{bad}");
        }
    }
}
