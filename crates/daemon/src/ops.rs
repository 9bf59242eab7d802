//! The API's operations on VMs, in terms of the store and the supervisor. The HTTP routes
//! (`routes.rs`) are thin wrappers around these.

use std::time::Duration;

use ferro_api::control::ControlRequest;
use ferro_api::rest::{CreateVm, EditVm, Vm, VmEvent, VmState};
use ferro_api::VmConfig;

use crate::error::DaemonError;
use crate::net;
use crate::process;
use crate::store::{self, now_ms, VmRecord};
use crate::supervisor::Supervisor;
use crate::templates;

/// The API view of a stored VM.
pub fn view(sup: &Supervisor, rec: &VmRecord) -> Vm {
    Vm {
        name: rec.name.clone(),
        state: rec.state,
        pid: if rec.state.has_vmm() {
            sup.pid(&rec.name).or(rec.pid.map(|p| p.0))
        } else {
            None
        },
        restarts: rec.restarts,
        restart: rec.restart,
        cpus: rec.config.cpus,
        memory_mib: rec.config.memory_mib,
        kernel: rec.config.kernel.clone(),
        initrd: rec.config.initrd.clone(),
        cmdline: rec.config.cmdline.clone(),
        disks: rec.config.disks.clone(),
        nets: rec.config.nets.clone(),
        nics: net::view(
            &sup.0.net,
            &rec.config.nets,
            &sup.store(|s| net::rows(s.conn(), &rec.name))
                .unwrap_or_default(),
        ),
        console_socket: sup.dir(&rec.name).console(),
        created_ms: rec.created_ms,
    }
}

pub(crate) fn check_name(name: &str) -> Result<(), DaemonError> {
    let ok = (1..=63).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(DaemonError::BadRequest(format!(
            "'{name}' is not a valid name: use 1 to 63 of a-z A-Z 0-9 - _ . (not starting with . or -)"
        )))
    }
}

fn check_file(what: &str, path: &std::path::Path) -> Result<(), DaemonError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(DaemonError::BadRequest(format!(
            "{what} {} is not a regular file",
            path.display()
        ))),
        Err(e) => Err(DaemonError::BadRequest(format!(
            "{what} {} cannot be read: {e}",
            path.display()
        ))),
    }
}

/// Checks what a VMM would refuse, before anything is stored.
pub(crate) fn check_config(cfg: &VmConfig) -> Result<(), DaemonError> {
    cfg.validate().map_err(|e| {
        DaemonError::BadRequest(
            e.to_string()
                .replace("--memory", "memory_mib")
                .replace("--cpus", "cpus"),
        )
    })?;
    check_file("kernel", &cfg.kernel)?;
    if let Some(i) = &cfg.initrd {
        check_file("initrd", i)?;
    }
    for d in &cfg.disks {
        check_file("disk", &d.path)?;
    }
    Ok(())
}

/// Defines a VM (and starts it if asked). Nothing is left behind when it fails.
pub async fn create(sup: &Supervisor, req: CreateVm) -> Result<Vm, DaemonError> {
    check_name(&req.name)?;
    let mut config = VmConfig::new(req.kernel);
    config.initrd = req.initrd;
    config.cmdline = req.cmdline;
    config.cpus = req.cpus.unwrap_or(config.cpus);
    config.memory_mib = req.memory_mib.unwrap_or(config.memory_mib);
    config.disks = req.disks;
    config.nets = req.nets;
    let template = match &req.template {
        Some(t) => Some(sup.store(|s| templates::get(s, t))?),
        None => None,
    };
    if let Some(t) = &template {
        templates::fill(t, &mut config, req.cpus.is_none(), req.memory_mib.is_none())?;
        // The overlays are made under the VM lock below; check the rest first.
        let mut without = config.clone();
        without.disks.clear();
        check_config(&without)?;
    } else {
        check_config(&config)?;
    }
    let mut rec = VmRecord {
        name: req.name.clone(),
        config,
        restart: req.restart,
        state: VmState::Stopped,
        pid: None,
        restarts: 0,
        created_ms: now_ms(),
    };
    let _guard = sup.vm_lock(&rec.name).await;
    let dir = sup.dir(&rec.name);
    if let Some(t) = &template {
        if sup.store(|s| s.get(&rec.name)).is_ok() {
            return Err(DaemonError::Exists(rec.name.clone()));
        }
        std::fs::create_dir_all(&dir.0)
            .map_err(DaemonError::io("cannot create the VM directory"))?;
        let made = templates::overlays(t, &dir.0).and_then(|mut disks| {
            disks.append(&mut rec.config.disks);
            rec.config.disks = disks;
            check_config(&rec.config)?;
            sup.store(|s| {
                s.transaction(|tx| {
                    net::sync(tx, &sup.0.net, &rec.name, &mut rec.config.nets)?;
                    store::insert_vm(tx, &rec)?;
                    store::insert_event(
                        tx,
                        &rec.name,
                        "created",
                        &format!("VM defined from template '{}'", t.name),
                    )
                })
            })
        });
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&dir.0);
            return Err(e);
        }
    } else {
        sup.store(|s| {
            s.transaction(|tx| {
                net::sync(tx, &sup.0.net, &rec.name, &mut rec.config.nets)?;
                store::insert_vm(tx, &rec)?;
                store::insert_event(tx, &rec.name, "created", "VM defined")?;
                // Last step, so a failure before it leaves no directory behind.
                std::fs::create_dir_all(&dir.0)
                    .map_err(DaemonError::io("cannot create the VM directory"))
            })
        })?;
    }
    if req.start {
        sup.start_locked(&rec, false).await?;
    }
    get(sup, &rec.name)
}

/// One VM.
pub fn get(sup: &Supervisor, name: &str) -> Result<Vm, DaemonError> {
    let rec = sup.store(|s| s.get(name))?;
    Ok(view(sup, &rec))
}

/// Every VM.
pub fn list(sup: &Supervisor) -> Result<Vec<Vm>, DaemonError> {
    Ok(sup
        .store(|s| s.list())?
        .iter()
        .map(|r| view(sup, r))
        .collect())
}

/// Starts a stopped or crashed VM.
pub async fn start(sup: &Supervisor, name: &str) -> Result<Vm, DaemonError> {
    let _guard = sup.vm_lock(name).await;
    let rec = sup.store(|s| s.get(name))?;
    Supervisor::check(name, rec.state, VmState::Running, "start")?;
    if rec.state.has_vmm() {
        return Err(DaemonError::InvalidState(format!(
            "VM '{name}' is {} already",
            rec.state.as_str()
        )));
    }
    sup.reset_history(name);
    sup.start_locked(&rec, false).await?;
    get(sup, name)
}

/// Stops a VM: ACPI power button, then a forced stop after `timeout` (or at once with `force`).
pub async fn stop(
    sup: &Supervisor,
    name: &str,
    timeout: Duration,
    force: bool,
) -> Result<Vm, DaemonError> {
    let _guard = sup.vm_lock(name).await;
    let rec = sup.store(|s| s.get(name))?;
    Supervisor::check(name, rec.state, VmState::Stopped, "stop")?;
    if rec.state == VmState::Crashed {
        sup.store(|s| {
            s.set_state(name, VmState::Stopped, None)?;
            s.event(name, "stopped", "crashed VM marked stopped")
        })?;
    } else {
        sup.stop_locked(name, timeout, force).await?;
    }
    get(sup, name)
}

async fn control(
    sup: &Supervisor,
    name: &str,
    req: ControlRequest,
    to: VmState,
    verb: &str,
    kind: &str,
) -> Result<Vm, DaemonError> {
    let _guard = sup.vm_lock(name).await;
    let rec = sup.store(|s| s.get(name))?;
    Supervisor::check(name, rec.state, to, verb)?;
    if !rec.state.has_vmm() || sup.pid(name).is_none() {
        return Err(DaemonError::InvalidState(format!(
            "cannot {verb} VM '{name}': it is {}",
            rec.state.as_str()
        )));
    }
    process::request(&sup.dir(name).control(), &req).await?;
    sup.store(|s| {
        s.set_state(name, to, rec.pid)?;
        s.event(name, kind, &format!("VM {kind}"))
    })?;
    get(sup, name)
}

/// Pauses a running VM.
pub async fn pause(sup: &Supervisor, name: &str) -> Result<Vm, DaemonError> {
    control(
        sup,
        name,
        ControlRequest::Pause,
        VmState::Paused,
        "pause",
        "paused",
    )
    .await
}

/// Resumes a paused VM.
pub async fn resume(sup: &Supervisor, name: &str) -> Result<Vm, DaemonError> {
    let rec = sup.store(|s| s.get(name))?;
    if rec.state != VmState::Paused {
        return Err(DaemonError::InvalidState(format!(
            "cannot resume VM '{name}': it is {}",
            rec.state.as_str()
        )));
    }
    control(
        sup,
        name,
        ControlRequest::Resume,
        VmState::Running,
        "resume",
        "resumed",
    )
    .await
}

/// Resets a running VM; its VMM starts the guest again in place (same pid).
pub async fn reboot(sup: &Supervisor, name: &str) -> Result<Vm, DaemonError> {
    let rec = sup.store(|s| s.get(name))?;
    if rec.state != VmState::Running {
        return Err(DaemonError::InvalidState(format!(
            "cannot reboot VM '{name}': it is {}",
            rec.state.as_str()
        )));
    }
    control(
        sup,
        name,
        ControlRequest::Reset,
        VmState::Running,
        "reboot",
        "rebooted",
    )
    .await
}

/// Removes the entries at `remove` (indices into `list`, each at most once) from `list`.
fn remove_indices<T>(list: &mut Vec<T>, remove: &[u32], what: &str) -> Result<(), DaemonError> {
    let mut idx: Vec<usize> = Vec::with_capacity(remove.len());
    for &i in remove {
        let i = usize::try_from(i).unwrap_or(usize::MAX);
        if i >= list.len() {
            return Err(DaemonError::BadRequest(format!(
                "there is no {what} {i}: the VM has {} (numbered from 0)",
                list.len()
            )));
        }
        if idx.contains(&i) {
            return Err(DaemonError::BadRequest(format!(
                "{what} {i} is named twice for removal"
            )));
        }
        idx.push(i);
    }
    idx.sort_unstable();
    for i in idx.into_iter().rev() {
        list.remove(i);
    }
    Ok(())
}

/// Changes a stopped VM (the restart policy may change at any time). The change is checked
/// like a create and applied in one transaction: a refused edit changes nothing.
pub async fn edit(sup: &Supervisor, name: &str, req: EditVm) -> Result<Vm, DaemonError> {
    let _guard = sup.vm_lock(name).await;
    let mut rec = sup.store(|s| s.get(name))?;
    let hw = req.cpus.is_some()
        || req.memory_mib.is_some()
        || req.cmdline.is_some()
        || req.disks.is_some()
        || req.nets.is_some()
        || !req.remove_disks.is_empty()
        || !req.add_disks.is_empty()
        || !req.remove_nets.is_empty()
        || !req.add_nets.is_empty();
    if hw && rec.state.has_vmm() {
        return Err(DaemonError::InvalidState(format!(
            "VM '{name}' is {}: stop it before changing its CPUs, memory, command line, disks or NICs",
            rec.state.as_str()
        )));
    }
    if req.disks.is_some() && !(req.remove_disks.is_empty() && req.add_disks.is_empty()) {
        return Err(DaemonError::BadRequest(
            "give either disks (a new list) or remove_disks/add_disks, not both".into(),
        ));
    }
    if req.nets.is_some() && !(req.remove_nets.is_empty() && req.add_nets.is_empty()) {
        return Err(DaemonError::BadRequest(
            "give either nets (a new list) or remove_nets/add_nets, not both".into(),
        ));
    }
    let mut changes = Vec::new();
    if let Some(n) = req.cpus {
        rec.config.cpus = n;
        changes.push(format!("cpus={n}"));
    }
    if let Some(m) = req.memory_mib {
        rec.config.memory_mib = m;
        changes.push(format!("memory_mib={m}"));
    }
    if let Some(c) = req.cmdline {
        changes.push("cmdline".to_string());
        rec.config.cmdline = c;
    }
    if let Some(d) = req.disks {
        changes.push(format!("{} disks", d.len()));
        rec.config.disks = d;
    }
    if let Some(n) = req.nets {
        changes.push(format!("{} nics", n.len()));
        rec.config.nets = n;
    }
    remove_indices(&mut rec.config.disks, &req.remove_disks, "disk")?;
    for i in &req.remove_disks {
        changes.push(format!("removed disk {i}"));
    }
    for d in req.add_disks {
        changes.push(format!("added disk {}", d.path.display()));
        rec.config.disks.push(d);
    }
    remove_indices(&mut rec.config.nets, &req.remove_nets, "NIC")?;
    for i in &req.remove_nets {
        changes.push(format!("removed nic {i}"));
    }
    for n in req.add_nets {
        changes.push("added a nic".to_string());
        rec.config.nets.push(n);
    }
    if let Some(r) = req.restart {
        rec.restart = r;
        changes.push(format!("restart={}", r.as_str()));
    }
    if changes.is_empty() {
        return Err(DaemonError::BadRequest("the edit changes nothing".into()));
    }
    check_config(&rec.config)?;
    sup.store(|s| {
        s.transaction(|tx| {
            net::sync(tx, &sup.0.net, name, &mut rec.config.nets)?;
            store::update_vm(tx, &rec)?;
            store::insert_event(
                tx,
                name,
                "edited",
                &format!("changed {}", changes.join(", ")),
            )
        })
    })?;
    if req.restart.is_some() {
        sup.reset_history(name);
    }
    get(sup, name)
}

/// Deletes a VM; a running one only with `force` (it is stopped at once first).
pub async fn delete(sup: &Supervisor, name: &str, force: bool) -> Result<(), DaemonError> {
    let _guard = sup.vm_lock(name).await;
    let rec = sup.store(|s| s.get(name))?;
    if rec.state.has_vmm() {
        if !force {
            return Err(DaemonError::InvalidState(format!(
                "VM '{name}' is {}: stop it first, or delete with --force",
                rec.state.as_str()
            )));
        }
        sup.stop_locked(name, Duration::ZERO, true).await?;
    }
    // Memory snapshots kept outside the VM's directory (`--to DIR`) go with it too.
    let dirs: Vec<_> = sup
        .store(|s| crate::snapshots::rows(s, name))?
        .into_iter()
        .filter_map(|r| r.snapshot.dir)
        .collect();
    sup.store(|s| s.transaction(|tx| store::delete_vm(tx, name)))?;
    let _ = std::fs::remove_dir_all(sup.dir(name).0);
    for d in &dirs {
        crate::memsnap::remove_dir(d);
    }
    Ok(())
}

/// A VM's event log.
pub fn events(sup: &Supervisor, name: &str) -> Result<Vec<VmEvent>, DaemonError> {
    sup.store(|s| {
        s.get(name)?;
        s.events(name)
    })
}
