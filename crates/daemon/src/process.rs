//! `ferro-vmm` processes: starting one detached, finding it again after a daemon restart, its
//! control socket, and ending it.
//!
//! A VMM runs in its own session (setsid), so it outlives the daemon and no terminal signal
//! reaches it. Its files live in `DATA/vms/NAME/`: `config.json` (what it runs), `control.sock`,
//! `console.sock` and `vmm.log` (its stderr).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use ferro_api::control::{ControlRequest, ControlResponse, VmmStatus};
use ferro_api::{SerialMode, VmConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use crate::error::DaemonError;

/// How long a starting VMM may take to answer on its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The files of one VM.
#[derive(Debug, Clone)]
pub struct VmDir(pub PathBuf);

impl VmDir {
    /// `DATA/vms/NAME`.
    pub fn new(data_dir: &Path, name: &str) -> Self {
        Self(data_dir.join("vms").join(name))
    }
    /// The control socket.
    pub fn control(&self) -> PathBuf {
        self.0.join("control.sock")
    }
    /// The console socket.
    pub fn console(&self) -> PathBuf {
        self.0.join("console.sock")
    }
    /// An incoming VMM's one-time migration token (mode 0600; gone once the VM arrived).
    pub fn migration_token(&self) -> PathBuf {
        self.0.join("migration.token")
    }
    /// The VMM's stderr.
    pub fn log(&self) -> PathBuf {
        self.0.join("vmm.log")
    }
    /// The console output the daemon kept of the last run.
    pub fn console_log(&self) -> PathBuf {
        self.0.join("console.log")
    }
    /// What the VMM runs.
    pub fn config(&self) -> PathBuf {
        self.0.join("config.json")
    }
}

/// The start time of `pid` in clock ticks since boot, which tells a process from a later one
/// that reuses its pid. `None` when there is no such process.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22; fields after the command name (which may hold spaces) start after ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether `pid` is still the process that started at `start`, and not a zombie.
pub fn is_alive(pid: u32, start: u64) -> bool {
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .and_then(|i| s.get(i + 2..i + 3).map(str::to_string))
        });
    start_time(pid) == Some(start) && state.as_deref() != Some("Z")
}

/// Sends SIGKILL to `pid` if it is still the process that started at `start`.
pub fn kill(pid: u32, start: u64) {
    if is_alive(pid, start) {
        if let Ok(p) = libc::pid_t::try_from(pid) {
            // SAFETY: kill(2) only sends a signal; the pid was checked to be our VMM (same
            // start time) just before, so it is not a stranger that reused the number.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
}

/// A started VMM: its child handle, pid and start time.
pub struct Started {
    /// The child (the daemon reaps it).
    pub child: Child,
    /// Its pid.
    pub pid: u32,
    /// Its start time (see [`start_time`]).
    pub start: u64,
    /// For [`Boot::Incoming`]: the `HOST:PORT` it listens on.
    pub listening: Option<String>,
}

/// The line `ferro-vmm --incoming` prints first on stderr.
const LISTENING: &str = "ferro-vmm: incoming listening on ";

/// The address in the VMM log's `incoming listening on` line written after `from`.
fn listening(log: &Path, from: u64) -> Option<String> {
    let text = std::fs::read(log).ok()?;
    let tail = String::from_utf8_lossy(text.get(usize::try_from(from).ok()?..)?).into_owned();
    tail.lines()
        .find_map(|l| l.strip_prefix(LISTENING))
        .map(|a| a.trim().to_string())
}

/// How a VMM gets its guest.
#[derive(Debug, Clone, Copy)]
pub enum Boot<'a> {
    /// Boots the guest from the config (`--config`), restarting in place on a guest reboot.
    Fresh,
    /// Runs the VM saved in a snapshot directory (`--restore DIR`). A guest reboot ends the
    /// VMM (exit 0, reason reboot): restarting in place would restore the snapshot again.
    Restore(&'a Path),
    /// Waits for a migrating VM on `tcp:HOST:0` (`--incoming`); the real address is in
    /// [`Started::listening`]. A guest reboot ends the VMM, as with `Restore`. With a folder,
    /// the source copies its storage there (`--incoming-storage`).
    Incoming(&'a str, Option<&'a Path>),
}

/// Writes the VMM's config and starts `vmm` on it, detached; returns once it answers on its
/// control socket, or the error it printed if it ended first.
pub async fn spawn(
    vmm: &Path,
    dir: &VmDir,
    config: &VmConfig,
    boot: Boot<'_>,
) -> Result<Started, DaemonError> {
    std::fs::create_dir_all(&dir.0).map_err(DaemonError::io("cannot create the VM directory"))?;
    for stale in [dir.control(), dir.console()] {
        let _ = std::fs::remove_file(stale);
    }
    let mut cfg = config.clone();
    cfg.serial = SerialMode::Socket(dir.console());
    let json = serde_json::to_vec_pretty(&cfg).map_err(|e| DaemonError::Vmm(e.to_string()))?;
    std::fs::write(dir.config(), json).map_err(DaemonError::io("cannot write the VM config"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.log())
        .map_err(DaemonError::io("cannot open the VMM log"))?;
    let log2 = log
        .try_clone()
        .map_err(DaemonError::io("cannot open the VMM log"))?;
    let log_len = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut serial = std::ffi::OsString::from("socket:");
    serial.push(dir.console());
    let mut cmd = Command::new(vmm);
    match boot {
        Boot::Fresh => {
            cmd.arg("--config")
                .arg(dir.config())
                .args(["--on-reboot", "restart"]);
        }
        Boot::Restore(from) => {
            cmd.arg("--restore").arg(from).arg("--serial").arg(serial);
        }
        Boot::Incoming(host, storage) => {
            let at = if host.contains(':') {
                format!("tcp:[{host}]:0")
            } else {
                format!("tcp:{host}:0")
            };
            cmd.arg("--incoming")
                .arg(at)
                .arg("--serial")
                .arg(serial)
                .arg("--incoming-token-file")
                .arg(dir.migration_token());
            if let Some(dir) = storage {
                cmd.arg("--incoming-storage").arg(dir);
            }
        }
    }
    cmd.arg("--control")
        .arg(dir.control())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(false);
    // SAFETY: the closure runs in the child between fork and exec and calls only setsid(2),
    // which is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        DaemonError::Vmm(format!(
            "cannot run {}: {e} (pass --vmm PATH to `ferro daemon`)",
            vmm.display()
        ))
    })?;
    let pid = child
        .id()
        .ok_or_else(|| DaemonError::Vmm("the VMM ended at once".into()))?;
    let start = start_time(pid).unwrap_or(0);
    let t = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            // 0, 2 and 3 are the guest's own ends (power-off, triple fault, panic): the VMM
            // ran it, only faster than this loop asked. The VM started; its supervisor sees
            // the end at once and applies the restart policy, as for any later crash.
            if !matches!(boot, Boot::Incoming(..)) && matches!(status.code(), Some(0 | 2 | 3)) {
                return Ok(Started {
                    child,
                    pid,
                    start,
                    listening: None,
                });
            }
            let text = std::fs::read(dir.log()).unwrap_or_default();
            let tail = String::from_utf8_lossy(&text[text.len().min(log_len as usize)..])
                .trim()
                .lines()
                .last()
                .unwrap_or("")
                .to_string();
            return Err(DaemonError::Vmm(format!(
                "the VMM failed to start ({status}): {tail}"
            )));
        }
        // Raw JSON: an incoming VMM's status has fields and states of its own.
        let up = request_value(
            &dir.control(),
            &serde_json::json!({"cmd": "status"}),
            Duration::from_secs(10),
        )
        .await
        .is_ok();
        let listening = listening(&dir.log(), log_len);
        if up && (listening.is_some() || !matches!(boot, Boot::Incoming(..))) {
            return Ok(Started {
                child,
                pid,
                start,
                listening,
            });
        }
        if t.elapsed() > START_TIMEOUT {
            let _ = child.start_kill();
            return Err(DaemonError::Vmm(format!(
                "the VMM did not answer on {} within {START_TIMEOUT:?}",
                dir.control().display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Sends one control request given as JSON (for requests and answers the daemon does not
/// type: `migrate`, a migration's status) and returns the `ok` answer as JSON; an `error`
/// answer is [`DaemonError::InvalidState`] with the VMM's message. Waits up to `limit` for it.
pub async fn request_value(
    socket: &Path,
    req: &serde_json::Value,
    limit: Duration,
) -> Result<serde_json::Value, DaemonError> {
    let fail = |e: std::io::Error| DaemonError::Vmm(format!("control socket: {e}"));
    let stream = tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(socket))
        .await
        .map_err(|_| DaemonError::Vmm("control socket: timed out".into()))?
        .map_err(fail)?;
    let mut stream = BufReader::new(stream);
    let mut line = serde_json::to_vec(req).map_err(|e| DaemonError::Vmm(e.to_string()))?;
    line.push(b'\n');
    stream.get_mut().write_all(&line).await.map_err(fail)?;
    let mut text = String::new();
    loop {
        text.clear();
        let n = tokio::time::timeout(limit, stream.read_line(&mut text))
            .await
            .map_err(|_| DaemonError::Vmm("control socket: no answer".into()))?
            .map_err(fail)?;
        if n == 0 {
            return Err(DaemonError::Vmm("the VMM closed its control socket".into()));
        }
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| DaemonError::Vmm(format!("control socket: {e}")))?;
        match v["result"].as_str() {
            Some("ok") => return Ok(v),
            Some(_) => {
                return Err(DaemonError::InvalidState(
                    v["message"]
                        .as_str()
                        .unwrap_or("the VMM refused")
                        .to_string(),
                ))
            }
            None => continue, // an event
        }
    }
}

/// Sends one control request and returns the VMM's status, and console text if asked for.
pub async fn request(
    socket: &Path,
    req: &ControlRequest,
) -> Result<(VmmStatus, Option<String>), DaemonError> {
    let req = serde_json::to_value(req).map_err(|e| DaemonError::Vmm(e.to_string()))?;
    let answer = request_value(socket, &req, Duration::from_secs(10)).await?;
    match serde_json::from_value::<ControlResponse>(answer) {
        Ok(ControlResponse::Ok { status, console }) => Ok((status, console)),
        Ok(ControlResponse::Error { message, .. }) => Err(DaemonError::InvalidState(message)),
        Err(e) => Err(DaemonError::Vmm(format!("control socket: {e}"))),
    }
}
