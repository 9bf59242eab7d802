//! The supervisor: starts VMMs, watches them, applies the restart policy, and re-adopts the
//! VMMs that outlived a daemon restart. Every lifecycle change goes through
//! [`VmState::can_become`] and is written to the store with an event.
//!
//! Concurrency: one async lock per VM serialises its lifecycle operations; the watcher of a
//! VMM ([`watch`]) does not take it, so `stop` can wait for the watcher while holding it.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferro_api::control::{ControlEvent, ControlLine, ControlRequest, VmmRunState};
use ferro_api::rest::{RestartPolicy, VmState};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::Child;
use tokio::sync::watch;

use crate::error::DaemonError;
use crate::net::{self, NetSettings};
use crate::process::{self, is_alive, VmDir};
use crate::restart::{Decision, History, Outcome};
use crate::store::{Store, VmRecord};

/// How long a VMM handing its VM over (a memory snapshot) may take to end after `quit`.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(120);
/// Console bytes the daemon keeps per VM.
const CONSOLE_KEEP: usize = 64 * 1024;

/// A VMM the daemon watches.
struct Live {
    pid: u32,
    start: u64,
    /// The daemon asked it to end: its end is a stop, not a crash.
    stopping: bool,
    /// The daemon ends it to run the VM on in another VMM at once (a memory snapshot, a
    /// migration): its end changes neither the state nor the event log.
    replacing: bool,
    exited: watch::Receiver<bool>,
    console: Arc<Mutex<VecDeque<u8>>>,
    /// The daemon's taps of its NICs, checked gone when it ends.
    taps: Vec<String>,
    /// Being migrated away: an exit with reason `migrated` is the migration's end, not a
    /// power-off.
    migrating: bool,
    /// Why it ended: the `reason` of the `exit` event on its control socket.
    reason: Arc<Mutex<Option<String>>>,
}

/// How the watcher learns that a VMM ended.
enum Watch {
    /// Our child: reaped with its exit status.
    Child(Child),
    /// Adopted after a daemon restart: its control socket tells.
    Adopted {
        pid: u32,
        start: u64,
        control: PathBuf,
    },
}

pub(crate) struct Inner {
    pub(crate) data_dir: PathBuf,
    vmm: PathBuf,
    pub(crate) net: NetSettings,
    pub(crate) operations: crate::operations::Operations,
    store: Mutex<Store>,
    live: Mutex<HashMap<String, Live>>,
    history: Mutex<HashMap<String, History>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The bearer token sent to other daemons.
    peer_token: Mutex<Option<String>>,
}

/// The supervisor; cheap to clone.
#[derive(Clone)]
pub struct Supervisor(pub(crate) Arc<Inner>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Supervisor {
    /// Opens the store under `data_dir` and re-adopts the VMMs still running.
    pub async fn open(
        data_dir: &Path,
        vmm: PathBuf,
        net: NetSettings,
    ) -> Result<Self, DaemonError> {
        std::fs::create_dir_all(data_dir.join("vms")).map_err(DaemonError::io(format!(
            "cannot create {}",
            data_dir.display()
        )))?;
        let store = Store::open(&data_dir.join("ferro.db"))?;
        let sup = Self(Arc::new(Inner {
            data_dir: data_dir.to_path_buf(),
            vmm,
            net,
            operations: Default::default(),
            store: Mutex::new(store),
            live: Mutex::new(HashMap::new()),
            history: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            peer_token: Mutex::new(None),
        }));
        sup.adopt_all().await?;
        Ok(sup)
    }

    /// Sets the bearer token sent to other daemons.
    pub fn set_peer_token(&self, token: Option<String>) {
        *lock(&self.0.peer_token) = token;
    }

    /// The bearer token sent to other daemons.
    pub fn peer_token(&self) -> Option<String> {
        lock(&self.0.peer_token).clone()
    }

    /// Runs `f` on the store.
    pub fn store<T>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, DaemonError>,
    ) -> Result<T, DaemonError> {
        f(&mut lock(&self.0.store))
    }

    /// The files of VM `name`.
    pub fn dir(&self, name: &str) -> VmDir {
        VmDir::new(&self.0.data_dir, name)
    }

    /// The per-VM operation lock.
    pub async fn vm_lock(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let l = lock(&self.0.locks)
            .entry(name.to_string())
            .or_default()
            .clone();
        l.lock_owned().await
    }

    /// The pid of VM `name`'s VMM, if one runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        lock(&self.0.live).get(name).map(|l| l.pid)
    }

    fn event(&self, name: &str, kind: &str, message: &str) {
        // The event log is best effort: a full disk must not stop the VM's lifecycle.
        let _ = self.store(|s| s.event(name, kind, message));
    }

    fn set_state(
        &self,
        name: &str,
        state: VmState,
        pid: Option<(u32, u64)>,
    ) -> Result<(), DaemonError> {
        self.store(|s| s.set_state(name, state, pid))
    }

    /// Checks the lifecycle table.
    pub fn check(name: &str, from: VmState, to: VmState, verb: &str) -> Result<(), DaemonError> {
        if from.can_become(to) {
            Ok(())
        } else {
            Err(DaemonError::InvalidState(format!(
                "cannot {verb} VM '{name}': it is {}",
                from.as_str()
            )))
        }
    }

    /// Starts the VMM of `rec` (caller holds the VM's lock and checked the transition).
    pub async fn start_locked(&self, rec: &VmRecord, restart: bool) -> Result<(), DaemonError> {
        self.launch(rec, restart, None).await
    }

    /// Starts the VMM of `rec`: a fresh boot, or (`from`) the VM saved in a snapshot
    /// directory, run on `rec`'s disks and NICs (see [`crate::memsnap::restore_dir`]).
    pub async fn launch(
        &self,
        rec: &VmRecord,
        restart: bool,
        from: Option<&Path>,
    ) -> Result<(), DaemonError> {
        let dir = self.dir(&rec.name);
        let netcfg = &self.0.net;
        let rows = self.store(|s| {
            s.transaction(|tx| {
                let mut fixed = rec.clone();
                let rows = net::sync(tx, netcfg, &rec.name, &mut fixed.config.nets)?;
                if fixed.config.nets != rec.config.nets {
                    // A VM defined before the daemon kept NICs gets its MACs now.
                    crate::store::update_vm(tx, &fixed)?;
                }
                Ok(rows)
            })
        })?;
        let taps = net::taps(&rows);
        if !taps.is_empty() {
            net::ensure_bridge(netcfg).await?;
            net::release_taps(&taps).await;
        }
        let mut config = rec.config.clone();
        for (n, r) in config.nets.iter_mut().zip(&rows) {
            n.mac = Some(r.mac);
        }
        let config = net::runtime_config(netcfg, &config, &rows);
        let started = match from {
            None => process::spawn(&self.0.vmm, &dir, &config, process::Boot::Fresh).await?,
            Some(snap) => {
                let work = crate::memsnap::restore_dir(&dir, snap, &config)?;
                let r =
                    process::spawn(&self.0.vmm, &dir, &config, process::Boot::Restore(&work)).await;
                // The VMM has read the state and mapped the memory once it answers.
                let _ = std::fs::remove_dir_all(&work);
                r?
            }
        };
        let pid = (started.pid, started.start);
        self.set_state(&rec.name, VmState::Running, Some(pid))?;
        if restart {
            self.store(|s| s.count_restart(&rec.name))?;
        }
        let (kind, what) = match (from, restart) {
            (Some(snap), _) => ("started", format!(" from {}", snap.display())),
            (None, true) => ("restarted", String::new()),
            (None, false) => ("started", String::new()),
        };
        self.event(
            &rec.name,
            kind,
            &format!("VMM started (pid {}){what}", started.pid),
        );
        self.watch(&rec.name, Watch::Child(started.child), pid, taps);
        Ok(())
    }

    fn watch(&self, name: &str, how: Watch, (pid, start): (u32, u64), taps: Vec<String>) {
        let (tx, rx) = watch::channel(false);
        let console = Arc::new(Mutex::new(VecDeque::new()));
        let reason = Arc::new(Mutex::new(None));
        lock(&self.0.live).insert(
            name.to_string(),
            Live {
                pid,
                start,
                stopping: false,
                replacing: false,
                exited: rx,
                console: console.clone(),
                taps,
                reason: reason.clone(),
                migrating: false,
            },
        );
        tokio::spawn(follow_console(self.clone(), name.to_string(), pid, console));
        tokio::spawn(follow_control(self.clone(), name.to_string(), pid, reason));
        let sup = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let outcome = wait(how).await;
            sup.ended(&name, pid, outcome).await;
            let _ = tx.send(true);
        });
    }

    /// A VMM ended: record it and apply the restart policy.
    async fn ended(&self, name: &str, pid: u32, outcome: Outcome) {
        let live = {
            let mut map = lock(&self.0.live);
            match map.get(name) {
                Some(l) if l.pid == pid => map.remove(name),
                _ => None,
            }
        };
        let stopping = live.as_ref().is_some_and(|l| l.stopping);
        let why = || live.as_ref().and_then(|l| lock(&l.reason).clone());
        let mut reason = why();
        for _ in 0..10 {
            if live.is_none() || reason.is_some() || outcome != Outcome::Clean {
                break;
            }
            // The exit event may still be on its way to the control follower.
            tokio::time::sleep(Duration::from_millis(10)).await;
            reason = why();
        }
        if let Some(l) = &live {
            let text: Vec<u8> = lock(&l.console).iter().copied().collect();
            let _ = std::fs::write(self.dir(name).console_log(), text);
            net::release_taps(&l.taps).await;
            let migrated = l.migrating && reason.as_deref() == Some("migrated");
            if l.replacing || migrated {
                return;
            }
        }
        let Ok(rec) = self.store(|s| s.get(name)) else {
            return; // deleted
        };
        if reason.as_deref() == Some("migrated") {
            // Migrated away while this daemon did not drive it (it restarted meanwhile).
            let _ = self.set_state(name, VmState::Stopped, None);
            self.event(
                name,
                "migrated_away",
                "the VMM handed the VM to a migration's destination: it runs there; not restarted here",
            );
            return;
        }
        if rec.state == VmState::Incoming {
            // Its incoming VMM ended before the migration completed: the VM never came here.
            let _ = self.store(|s| s.transaction(|tx| crate::store::delete_vm(tx, name)));
            let _ = std::fs::remove_dir_all(self.dir(name).0);
            return;
        }
        if stopping {
            let _ = self.set_state(name, VmState::Stopped, None);
            self.event(name, "stopped", "VM stopped");
            return;
        }
        if outcome == Outcome::Clean && reason.as_deref() == Some("reboot") {
            // A VMM that runs a restored or migrated VM does not restart in place (it would
            // load the old state again): the guest's reboot is a fresh boot.
            let _ = self.set_state(name, VmState::Stopped, None);
            self.event(name, "rebooted", "the guest rebooted: booting it afresh");
            tokio::spawn(self.clone().restart_after(
                name.to_string(),
                VmState::Stopped,
                Duration::ZERO,
            ));
            return;
        }
        let what = match outcome {
            Outcome::Clean => "the guest powered off".to_string(),
            Outcome::Failed(code) => format!("the VMM exited with status {code}"),
            Outcome::Killed => "the VMM was killed".to_string(),
        };
        let decision = lock(&self.0.history)
            .entry(name.to_string())
            .or_default()
            .decide(rec.restart, outcome, Instant::now());
        let kind = if outcome == Outcome::Clean {
            "powered_off"
        } else {
            "crashed"
        };
        let state = if outcome == Outcome::Clean {
            VmState::Stopped
        } else {
            VmState::Crashed
        };
        let _ = self.set_state(name, state, None);
        match decision {
            Decision::Stop | Decision::Crashed => self.event(name, kind, &what),
            Decision::GiveUp => {
                let _ = self.set_state(name, VmState::Crashed, None);
                self.event(
                    name,
                    "crash_loop",
                    &format!(
                        "{what}; restarted {} times within {:?}: giving up (start it by hand)",
                        crate::restart::LOOP_LIMIT,
                        crate::restart::LOOP_WINDOW
                    ),
                );
            }
            Decision::Restart(delay) => {
                self.event(
                    name,
                    kind,
                    &format!(
                        "{what}; restarting (policy {}) in {delay:?}",
                        rec.restart.as_str()
                    ),
                );
                tokio::spawn(self.clone().restart_after(name.to_string(), state, delay));
            }
        }
    }

    /// Restarts VM `name` after `delay` unless someone changed it meanwhile (it is no longer
    /// in `state`). A VMM that fails again before it answers counts as another crash, so a
    /// crash loop ends at the limit either way.
    async fn restart_after(self, name: String, state: VmState, mut delay: Duration) {
        loop {
            tokio::time::sleep(delay).await;
            let _guard = self.vm_lock(&name).await;
            let Ok(rec) = self.store(|s| s.get(&name)) else {
                return; // deleted
            };
            if rec.state != state || self.pid(&name).is_some() {
                return;
            }
            let Err(e) = self.start_locked(&rec, true).await else {
                return;
            };
            let _ = self.store(|s| s.count_restart(&name));
            let decision = lock(&self.0.history)
                .entry(name.clone())
                .or_default()
                .decide(rec.restart, Outcome::Failed(-1), Instant::now());
            let _ = self.set_state(&name, VmState::Crashed, None);
            match decision {
                Decision::Restart(d) => {
                    self.event(&name, "crashed", &format!("{e}; restarting in {d:?}"));
                    delay = d;
                }
                _ => {
                    self.event(
                        &name,
                        "crash_loop",
                        &format!(
                            "{e}; restarted {} times within {:?}: giving up (start it by hand)",
                            crate::restart::LOOP_LIMIT,
                            crate::restart::LOOP_WINDOW
                        ),
                    );
                    return;
                }
            }
        }
    }

    /// Stops VM `name` (caller holds its lock): power button, then after `timeout` a forced
    /// stop. With `force`, the forced stop comes at once.
    pub async fn stop_locked(
        &self,
        name: &str,
        timeout: Duration,
        force: bool,
    ) -> Result<(), DaemonError> {
        let Some(mut exited) = ({
            let mut map = lock(&self.0.live);
            map.get_mut(name).map(|l| {
                l.stopping = true;
                l.exited.clone()
            })
        }) else {
            return Ok(());
        };
        let control = self.dir(name).control();
        let ended = |rx: &mut watch::Receiver<bool>, t: Duration| {
            let mut rx = rx.clone();
            async move { tokio::time::timeout(t, rx.wait_for(|e| *e)).await.is_ok() }
        };
        if !force {
            // A paused guest cannot answer the power button: let it run first (a VM that is
            // not paused refuses the resume, which is fine).
            let _ = process::request(&control, &ControlRequest::Resume).await;
            let _ = process::request(&control, &ControlRequest::Shutdown).await;
            if ended(&mut exited, timeout).await {
                return Ok(());
            }
            self.event(
                name,
                "stop_timeout",
                &format!("the guest did not power off within {timeout:?}: forcing"),
            );
        }
        let _ = process::request(&control, &ControlRequest::Quit).await;
        if ended(&mut exited, Duration::from_secs(2)).await {
            return Ok(());
        }
        if let Some((pid, start)) = lock(&self.0.live).get(name).map(|l| (l.pid, l.start)) {
            process::kill(pid, start);
        }
        if ended(&mut exited, Duration::from_secs(5)).await {
            Ok(())
        } else {
            Err(DaemonError::Vmm(format!("VM '{name}' did not stop")))
        }
    }

    /// Ends VM `name`'s VMM (caller holds its lock) so that another one can take the VM
    /// over: a `quit` (which flushes its disks), then SIGKILL; the VM's state and event log
    /// stay as they are.
    pub async fn retire_locked(&self, name: &str) -> Result<(), DaemonError> {
        let Some(start) = ({
            let mut map = lock(&self.0.live);
            map.get_mut(name).map(|l| {
                l.replacing = true;
                l.stopping = true;
                (l.pid, l.start)
            })
        }) else {
            return Ok(());
        };
        let _ = process::request(&self.dir(name).control(), &ControlRequest::Quit).await;
        // Its exit writes the disks back and syncs them: give that time (a kill would lose
        // qcow2 metadata the next VMM needs).
        if self.wait_ended(name, RETIRE_TIMEOUT).await {
            return Ok(());
        }
        process::kill(start.0, start.1);
        if self.wait_ended(name, Duration::from_secs(5)).await {
            Err(DaemonError::Vmm(format!(
                "the VMM of '{name}' did not end within {RETIRE_TIMEOUT:?} of a quit and was killed: its disks may miss writes"
            )))
        } else {
            Err(DaemonError::Vmm(format!("VM '{name}' did not stop")))
        }
    }

    /// Whether VM `name`'s last event says a migration of it was under way.
    fn was_migrating(&self, name: &str) -> bool {
        self.migrating_to(name).is_some()
    }

    /// The destination of the migration VM `name`'s last event says was under way.
    fn migrating_to(&self, name: &str) -> Option<String> {
        let events = self.store(|s| s.events(name)).ok()?;
        let last = events.last().filter(|e| e.kind == "migrating")?;
        Some(
            last.message
                .strip_prefix("migrating to ")
                .unwrap_or_default()
                .to_string(),
        )
    }

    /// Marks VM `name`'s VMM as being migrated away (or no longer).
    pub fn set_migrating(&self, name: &str, on: bool) {
        if let Some(l) = lock(&self.0.live).get_mut(name) {
            l.migrating = on;
        }
    }

    /// Waits up to `limit` for VM `name`'s VMM (the one watched now) to end; false if it
    /// did not.
    pub async fn wait_ended(&self, name: &str, limit: Duration) -> bool {
        let rx = lock(&self.0.live).get(name).map(|l| l.exited.clone());
        match rx {
            None => true,
            Some(mut rx) => tokio::time::timeout(limit, rx.wait_for(|e| *e))
                .await
                .is_ok(),
        }
    }

    /// Starts a `ferro-vmm --incoming` for `rec` (already stored in state `incoming`; the
    /// caller holds its lock) on `host`, and watches it; returns the `HOST:PORT` it listens
    /// on and the one-time token its source must send. With `storage`, the source copies
    /// the VM's files into its folder (`rec.config` names them there already).
    pub async fn launch_incoming(
        &self,
        rec: &VmRecord,
        host: &str,
        storage: bool,
    ) -> Result<(String, String), DaemonError> {
        let dir = self.dir(&rec.name);
        let config = net::runtime_config(&self.0.net, &rec.config, &[]);
        let rows = self.store(|s| net::rows(s.conn(), &rec.name))?;
        if rows.iter().any(|r| r.tap.is_some()) {
            // The VM's taps (the source's names) go on this host's bridge.
            net::ensure_bridge(&self.0.net).await?;
        }
        let into = storage.then_some(dir.0.as_path());
        // A one-time token: the incoming VMM takes the VM only from whoever sends it first,
        // and only the source daemon (which asked over the authenticated API) learns it.
        let token = new_token()?;
        std::fs::create_dir_all(&dir.0)
            .map_err(DaemonError::io("cannot create the VM directory"))?;
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(dir.migration_token())
                .map_err(DaemonError::io("cannot write the migration token"))?;
            f.write_all(token.as_bytes())
                .map_err(DaemonError::io("cannot write the migration token"))?;
        }
        let started = process::spawn(
            &self.0.vmm,
            &dir,
            &config,
            process::Boot::Incoming(host, into),
        )
        .await?;
        let Some(addr) = started.listening.clone() else {
            let mut child = started.child;
            let _ = child.start_kill();
            return Err(DaemonError::Vmm("the incoming VMM named no address".into()));
        };
        let pid = (started.pid, started.start);
        self.set_state(&rec.name, VmState::Incoming, Some(pid))?;
        self.event(
            &rec.name,
            "incoming",
            &format!("VMM pid {} waits for the VM on {addr}", started.pid),
        );
        self.watch(
            &rec.name,
            Watch::Child(started.child),
            pid,
            net::taps(&rows),
        );
        Ok((addr, token))
    }

    /// Whether VM `name`'s VMM is one this daemon watches.
    pub fn watches(&self, name: &str) -> bool {
        lock(&self.0.live).contains_key(name)
    }

    /// The console's recent output: from the running VMM, or what was kept of the last run.
    pub async fn console_log(&self, name: &str) -> Result<String, DaemonError> {
        if self.pid(name).is_some() {
            if let Ok((_, Some(text))) =
                process::request(&self.dir(name).control(), &ControlRequest::ConsoleLog).await
            {
                return Ok(text);
            }
        }
        let live = lock(&self.0.live).get(name).map(|l| l.console.clone());
        if let Some(c) = live {
            return Ok(
                String::from_utf8_lossy(&lock(&c).iter().copied().collect::<Vec<_>>()).into_owned(),
            );
        }
        Ok(std::fs::read(self.dir(name).console_log())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default())
    }

    /// Re-adopts the VMMs the store says run; VMs whose VMM is gone get their policy applied.
    async fn adopt_all(&self) -> Result<(), DaemonError> {
        let recs = self.store(|s| s.list())?;
        for rec in recs.into_iter().filter(|r| r.state.has_vmm()) {
            if rec.state == VmState::Incoming {
                // A migration this daemon took part in before its restart: void (the source
                // sees it fail and keeps the VM).
                if let Some((pid, start)) = rec.pid {
                    process::kill(pid, start);
                }
                self.store(|s| s.transaction(|tx| crate::store::delete_vm(tx, &rec.name)))?;
                let _ = std::fs::remove_dir_all(self.dir(&rec.name).0);
                continue;
            }
            let control = self.dir(&rec.name).control();
            let adopted = match rec.pid {
                Some((pid, start)) if is_alive(pid, start) => {
                    match process::request(&control, &ControlRequest::Status).await {
                        Ok((st, _)) if st.pid == pid => Some((pid, start, st.state)),
                        _ => None,
                    }
                }
                _ => None,
            };
            match adopted {
                Some((pid, start, run)) => {
                    if run != VmmRunState::Migrating {
                        if let Some(to) = self.migrating_to(&rec.name) {
                            // The migration never reached the VMM, or ended without a
                            // daemon to finish it: the VM stays here; void the other half.
                            self.event(
                                &rec.name,
                                "migration_failed",
                                &format!("the daemon restarted during a migration to {to}: the VM stays here"),
                            );
                            tokio::spawn(crate::migrate::abort_remote(
                                self.clone(),
                                to,
                                rec.name.clone(),
                            ));
                        }
                    }
                    let taps = self
                        .store(|s| net::rows(s.conn(), &rec.name))
                        .map(|r| net::taps(&r))
                        .unwrap_or_default();
                    let state = if run == VmmRunState::Paused {
                        VmState::Paused
                    } else {
                        VmState::Running
                    };
                    self.set_state(&rec.name, state, Some((pid, start)))?;
                    self.event(
                        &rec.name,
                        "adopted",
                        &format!("daemon restarted: re-adopted VMM pid {pid}"),
                    );
                    self.watch(
                        &rec.name,
                        Watch::Adopted {
                            pid,
                            start,
                            control,
                        },
                        (pid, start),
                        taps,
                    );
                }
                None if self.was_migrating(&rec.name) => {
                    // It may run at the destination now: starting it here too would run the
                    // guest twice on the same disks.
                    self.set_state(&rec.name, VmState::Stopped, None)?;
                    self.event(
                        &rec.name,
                        "lost",
                        "the VMM ended during a migration while the daemon was down: it may run at the destination; not restarted here",
                    );
                }
                None => {
                    self.event(&rec.name, "lost", "the VMM ended while the daemon was down");
                    self.ended(&rec.name, 0, Outcome::Killed).await;
                }
            }
        }
        Ok(())
    }

    /// The restart policy of a VM changed: forget its crash history.
    pub fn reset_history(&self, name: &str) {
        lock(&self.0.history).remove(name);
    }

    /// The policy of a VM.
    pub fn policy(&self, name: &str) -> Result<RestartPolicy, DaemonError> {
        Ok(self.store(|s| s.get(name))?.restart)
    }
}

/// Waits for a VMM to end and says how.
async fn wait(how: Watch) -> Outcome {
    match how {
        Watch::Child(mut child) => match child.wait().await {
            Ok(s) => match s.code() {
                Some(0) => Outcome::Clean,
                Some(c) => Outcome::Failed(c),
                None => Outcome::Killed,
            },
            Err(_) => Outcome::Killed,
        },
        Watch::Adopted {
            pid,
            start,
            control,
        } => loop {
            if let Ok(stream) = UnixStream::connect(&control).await {
                let mut lines = BufReader::new(stream).lines();
                let mut last = None;
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(ControlLine::Event(e)) = serde_json::from_str(&line) {
                        last = Some(e);
                    }
                }
                match last {
                    Some(ControlEvent::Exit { code: 0, .. }) => return Outcome::Clean,
                    Some(ControlEvent::Exit { code, .. }) => return Outcome::Failed(code),
                    _ => {}
                }
            }
            if !is_alive(pid, start) {
                return Outcome::Killed;
            }
            // Restarting in place, or not listening yet.
            tokio::time::sleep(Duration::from_millis(20)).await;
        },
    }
}

/// Keeps a control connection to a VMM while it runs, to learn why it ends (its `exit`
/// event).
async fn follow_control(
    sup: Supervisor,
    name: String,
    pid: u32,
    reason: Arc<Mutex<Option<String>>>,
) {
    let socket = sup.dir(&name).control();
    while sup.pid(&name) == Some(pid) {
        if let Ok(stream) = UnixStream::connect(&socket).await {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                // Untyped: a newer VMM may name reasons this daemon's types do not know.
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if v["event"] == "exit" {
                    *lock(&reason) = v["reason"].as_str().map(str::to_string);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Follows a VMM's console into the daemon's ring while that VMM runs (reconnecting across
/// in-place restarts).
async fn follow_console(sup: Supervisor, name: String, pid: u32, ring: Arc<Mutex<VecDeque<u8>>>) {
    let socket = sup.dir(&name).console();
    let running = || sup.pid(&name) == Some(pid);
    while running() {
        if let Ok(mut stream) = UnixStream::connect(&socket).await {
            // The VMM replays its ring first: it replaces ours.
            lock(&ring).clear();
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let mut r = lock(&ring);
                r.extend(&buf[..n]);
                let excess = r.len().saturating_sub(CONSOLE_KEEP);
                r.drain(..excess);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 128 random bits from the kernel, in hex: a one-time migration token.
fn new_token() -> Result<String, DaemonError> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(DaemonError::io("cannot make a migration token"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}
