//! The snapshot and live-migration rows: ferro-vmm against QEMU microvm with the same probe
//! guest (its `beat=` heartbeat, 512 MiB, 1 vCPU), run after run.
//!
//! - Live migration over loopback TCP: ferro-vmm `--incoming tcp:127.0.0.1:0` and a control
//!   `migrate` request on the source; QEMU `-incoming tcp:127.0.0.1:PORT` and QMP `migrate` on
//!   the source, with `downtime-limit` 50 ms (ferro's `downtime_ms` 50) and no bandwidth cap.
//!   For an idle guest and one that dirties memory at a steady rate. The guest prints `hb=<seq>`
//!   every millisecond of its clock from user mode: the downtime seen from the guest's side is
//!   the largest gap in the console bytes the host receives from the source and then from the
//!   destination. The loopback TCP bandwidth is measured in the same rounds.
//! - Snapshots: ferro-vmm's `snapshot` control request (`resume: true`) and `--restore DIR`;
//!   QEMU `stop`, `migrate "exec:cat > FILE"`, `cont`, and `-incoming "exec:cat FILE"`.
//! - Storage migration (no shared storage, [`storage`]): ferro-vmm's `copy_storage` against
//!   QEMU's drive-mirror into an NBD export of the destination, then migrate (libvirt's
//!   `--copy-storage-all`), with an idle guest and one writing its disk; every destination
//!   copy is checked byte for byte.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

mod storage;

use crate::report::{self, Metric, Results, Row, Sut};
use crate::stats::Target;
use crate::Env;

/// Rounds when --runs is not given (each round starts 28 VMs, moves 448 MiB four times and a
/// 512 MiB disk four times).
pub const DEFAULT_RUNS: usize = 5;
/// Guest memory, MiB.
pub const MEM_MIB: u64 = 512;
/// The downtime both VMMs are asked to aim for, ms.
pub const DOWNTIME_MS: u64 = 50;
/// Heartbeat period, µs of guest clock.
const BEAT_US: u64 = 1000;
/// The dirtying guest: MiB of pages dirtied per second, and the region they cycle through.
pub const DIRTY_MIBS: u64 = 128;
pub const DIRTY_MIB: u64 = 128;
/// The populated guest: MiB of RAM it fills (one non-zero word per page) before it idles.
pub const FULL_MIB: u64 = 448;
/// Beats the source prints before a migration or snapshot starts.
const WARM_BEATS: u64 = 500;
/// Beats the destination prints before the run ends.
const AFTER_BEATS: u64 = 100;

/// The guests of the migration rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Only the heartbeat: nearly all of its RAM is zero.
    Idle,
    /// `FULL_MIB` filled with non-zero pages first, then only the heartbeat.
    Full,
    /// The heartbeat and `DIRTY_MIBS` of pages dirtied per second.
    Dirty,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Idle => "idle",
            Kind::Full => "populated",
            Kind::Dirty => "dirtying",
        }
    }

    fn metrics(self) -> &'static [Metric; 8] {
        match self {
            Kind::Idle => &IDLE,
            Kind::Full => &FULL,
            Kind::Dirty => &DIRTY,
        }
    }
}

fn cmdline(kind: Kind) -> String {
    // At most a few minutes of beats: a VMM that outlives its run powers off by itself.
    let mut s = format!("beat=300000 beat_us={BEAT_US} smp=off exit=poweroff");
    match kind {
        Kind::Idle => {}
        Kind::Full => s.push_str(&format!(" beat_fill=on dirty_mib={FULL_MIB}")),
        Kind::Dirty => s.push_str(&format!(
            " beat_fill=on dirty_mibs={DIRTY_MIBS} dirty_mib={DIRTY_MIB}"
        )),
    }
    s
}

/// How long a fresh guest may take to reach `WARM_BEATS` (filling 448 MiB page by page takes
/// seconds on a PVM host).
const WARM_LIMIT: Duration = Duration::from_secs(60);

fn log(msg: impl AsRef<str>) {
    eprintln!("ferro-bench: migrate: {}", msg.as_ref());
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Console bytes and when they arrived.
type Chunk = (Instant, Vec<u8>);

/// A VMM process whose console bytes are kept with the time they arrived; killed (with its
/// process group) when dropped.
struct Vm {
    child: Child,
    out: Arc<Mutex<Vec<Chunk>>>,
    err: Arc<Mutex<String>>,
    spawned: Instant,
    deadline: Instant,
}

impl Vm {
    fn spawn(program: &Path, args: &[String], limit: Duration) -> Result<Vm> {
        let mut cmd = Command::new(program);
        cmd.args(args).process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours; between fork and
        // exec it only asks the kernel to kill the child if ferro-bench dies (an interrupted
        // run leaves no VMM behind).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", program.display()))?;
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(String::new()));
        let mut so = child.stdout.take().context("no stdout")?;
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = so.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let at = Instant::now();
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((at, buf[..n].to_vec()));
            }
        });
        let mut se = child.stderr.take().context("no stderr")?;
        let sink = err.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = se.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Ok(Vm {
            child,
            out,
            err,
            spawned,
            deadline: spawned + limit,
        })
    }

    fn chunks(&self) -> Vec<(Instant, Vec<u8>)> {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn stdout(&self) -> String {
        let c = self.chunks();
        let bytes: Vec<u8> = c.into_iter().flat_map(|(_, b)| b).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn stderr(&self) -> String {
        self.err.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn first_byte(&self) -> Option<Instant> {
        self.out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first()
            .map(|c| c.0)
    }

    /// The last complete `hb=` sequence number on the console.
    fn last_beat(&self) -> Option<u64> {
        beats(&self.stdout()).last().copied()
    }

    /// Why the process is no use any more, if it is not.
    fn check_alive(&mut self, what: &str) -> Result<()> {
        if let Ok(Some(st)) = self.child.try_wait() {
            bail!(
                "{what} ended early ({st}): {}",
                crate::parse::last_lines(&(self.stdout() + &self.stderr()), 3)
            );
        }
        if Instant::now() >= self.deadline {
            bail!("{what} overran its time limit");
        }
        Ok(())
    }

    /// Waits until `cond` holds, the process ends or `limit` passes.
    fn wait(&mut self, what: &str, limit: Duration, cond: impl Fn(&Vm) -> bool) -> Result<()> {
        let until = (Instant::now() + limit).min(self.deadline);
        loop {
            if cond(self) {
                return Ok(());
            }
            self.check_alive(what)?;
            if Instant::now() >= until {
                bail!(
                    "{what}: gave up waiting after {limit:?}: {}",
                    crate::parse::last_lines(&(self.stdout() + &self.stderr()), 3)
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn wait_beat(&mut self, what: &str, n: u64, limit: Duration) -> Result<()> {
        self.wait(what, limit, |v| v.last_beat().is_some_and(|b| b >= n))
    }

    /// Waits for the process to end; its exit code.
    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: plain syscalls on our own child's pid and the process group it leads
        // (spawned with process_group(0)); no memory is passed.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// The `hb=` sequence numbers of the complete lines in `text`.
fn beats(text: &str) -> Vec<u64> {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| {
            l.strip_prefix("hb=")?
                .split(' ')
                .next()?
                .trim_end_matches('\r')
                .parse()
                .ok()
        })
        .collect()
}

/// `dirtied=` and `clock=` of the `hb=` lines in `text`: (pages, guest ns).
fn dirtied(text: &str) -> Vec<(f64, f64)> {
    text.lines()
        .filter(|l| l.starts_with("hb="))
        .filter_map(|l| {
            let d = crate::parse::kv_num(l, "dirtied")?;
            let ns = crate::parse::kv_num(l, "clock")?;
            Some((d, ns))
        })
        .collect()
}

/// Where the sequence of beats breaks (a beat missing or repeated), if it does.
fn beat_break(seq: &[u64]) -> Option<(u64, u64)> {
    seq.windows(2)
        .find(|w| w[1] != w[0] + 1)
        .map(|w| (w[0], w[1]))
}

/// The largest gap between the arrival times of consecutive console chunks, counting only
/// chunks from `from` on and stopping at `until`.
fn largest_gap(times: &[Instant], from: Instant, until: Instant) -> Option<Duration> {
    let mut t: Vec<Instant> = times.iter().copied().filter(|&x| x <= until).collect();
    t.sort();
    // Start from the last arrival before `from` (the gap that spans `from` counts too).
    let start = t.iter().rposition(|&x| x < from).unwrap_or(0);
    t[start..].windows(2).map(|w| w[1] - w[0]).max()
}

/// A line-JSON client of a ferro-vmm control socket.
fn ferro_request(sock: &Path, req: &Value, limit: Duration) -> Result<Value> {
    let mut s =
        UnixStream::connect(sock).with_context(|| format!("connect to {}", sock.display()))?;
    s.set_read_timeout(Some(limit))?;
    s.write_all(format!("{req}\n").as_bytes())?;
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).context("read the control answer")? == 0 {
            bail!("the control socket closed without an answer");
        }
        let v: Value =
            serde_json::from_str(line.trim()).with_context(|| format!("control line {line:?}"))?;
        if v.get("event").is_some() {
            continue;
        }
        if v["result"] != "ok" {
            bail!("control request {req} failed: {v}");
        }
        return Ok(v);
    }
}

/// A QMP client (QEMU's machine protocol) on a unix socket.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    /// The events read so far (they arrive between the answers).
    events: Vec<Value>,
}

impl Qmp {
    /// Connects (the socket appears once QEMU is up) and leaves capabilities negotiation.
    fn connect(path: &Path, limit: Duration) -> Result<Qmp> {
        let until = Instant::now() + limit;
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= until => {
                    return Err(e).with_context(|| format!("QMP {}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
            events: Vec::new(),
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting)?;
        if !greeting.contains("QMP") {
            bail!("no QMP greeting: {greeting:?}");
        }
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn cmd(&mut self, execute: &str, arguments: Value) -> Result<Value> {
        let req = json!({"execute": execute, "arguments": arguments});
        self.w.write_all(format!("{req}\n").as_bytes())?;
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                bail!("QMP closed during {execute}");
            }
            let v: Value =
                serde_json::from_str(line.trim()).with_context(|| format!("QMP line {line:?}"))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {execute}: {e}");
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// No bandwidth cap (QEMU's default is 128 MiB/s) and ferro's downtime target.
    fn migration_parameters(&mut self) -> Result<()> {
        self.cmd(
            "migrate-set-parameters",
            json!({"downtime-limit": DOWNTIME_MS, "max-bandwidth": 1u64 << 40}),
        )?;
        Ok(())
    }

    /// Polls `query-migrate` until the migration has ended; its last answer.
    fn wait_migration(&mut self, limit: Duration) -> Result<Value> {
        let until = Instant::now() + limit;
        loop {
            let v = self.cmd("query-migrate", json!({}))?;
            match v["status"].as_str() {
                Some("completed") => return Ok(v),
                Some("failed") | Some("cancelled") => bail!("QEMU migration failed: {v}"),
                _ => {}
            }
            if Instant::now() >= until {
                bail!("QEMU migration not done after {limit:?}: {v}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn ferro_args(env: &Env, cmdline: &str, control: &Path) -> Vec<String> {
    let mut a = strings(&["--kernel"]);
    a.push(env.probe.display().to_string());
    a.extend(strings(&[
        "--cmdline",
        cmdline,
        "--cpus",
        "1",
        "--memory",
        &MEM_MIB.to_string(),
        "--serial",
        "stdio",
        "--control",
    ]));
    a.push(control.display().to_string());
    a
}

/// The QEMU machine of these rows.
const MICROVM: &str = "microvm,x-option-roms=off,rtc=on";

fn qemu_args(env: &Env, cmdline: &str, qmp: &Path, incoming: Option<&str>) -> Vec<String> {
    let mut a = strings(&[
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-M",
        MICROVM,
        "-m",
        &MEM_MIB.to_string(),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        // A restored VM starts by itself (the saved one was stopped before the save, and
        // with the run state in the stream the destination would stay paused).
        "-global",
        "migration.store-global-state=off",
        "-qmp",
    ]);
    a.push(format!("unix:{},server=on,wait=off", qmp.display()));
    a.push("-kernel".into());
    a.push(env.probe.display().to_string());
    a.push("-append".into());
    a.push(cmdline.into());
    if let Some(i) = incoming {
        a.push("-incoming".into());
        a.push(i.into());
    }
    a
}

/// What one live migration measured.
#[derive(Debug, Default)]
struct Migration {
    total_ms: f64,
    guest_gap_ms: f64,
    /// From the last console byte of the source to the first of the destination.
    switch_ms: f64,
    vmm_downtime_ms: Option<f64>,
    bytes: f64,
    rounds: Option<f64>,
    /// Guest's dirtying rate around the migration, MiB/s (dirtying guest only).
    dirty_mibs: Option<f64>,
    note: Option<String>,
    /// More of the VMM's own figures, for the log.
    detail: String,
}

/// The guest-side figures of a migration from the two consoles: the largest gap after
/// `from`, the beats' continuity, the dirtying rate.
fn guest_side(src: &Vm, dst: &Vm, from: Instant, m: &mut Migration) -> Result<()> {
    let (s, d) = (src.chunks(), dst.chunks());
    let until = d
        .last()
        .map(|c| c.0)
        .context("no console output from the destination")?;
    let times: Vec<Instant> = s.iter().chain(d.iter()).map(|c| c.0).collect();
    m.guest_gap_ms = largest_gap(&times, from, until).map(ms).unwrap_or(0.0);
    if let (Some(last), Some(first)) = (s.last(), d.first()) {
        m.switch_ms = ms(first.0.saturating_duration_since(last.0));
    }
    let text = src.stdout() + &dst.stdout();
    let seq = beats(&text);
    if let Some((a, b)) = beat_break(&seq) {
        m.note = Some(format!("the beats jump from {a} to {b}"));
    }
    // Pages per second of the guest's clock from before the migration to after it.
    let d = dirtied(&text);
    if let (Some(first), Some(last)) = (d.first(), d.last()) {
        if last.1 > first.1 {
            let secs = (last.1 - first.1) / 1e9;
            m.dirty_mibs = Some((last.0 - first.0) * 4096.0 / secs / (1 << 20) as f64);
        }
    }
    Ok(())
}

fn migrate_ferro(env: &Env, dir: &Path, kind: Kind, limit: Duration) -> Result<Migration> {
    let ctl = dir.join("src.sock");
    let _ = std::fs::remove_file(&ctl);
    let dst_args = strings(&["--incoming", "tcp:127.0.0.1:0", "--serial", "stdio"]);
    let mut dst = Vm::spawn(&env.ferro, &dst_args, limit)?;
    dst.wait("destination ferro-vmm", Duration::from_secs(10), |v| {
        listening(&v.stderr()).is_some()
    })?;
    let addr = listening(&dst.stderr()).context("no listening address")?;
    let mut src = Vm::spawn(&env.ferro, &ferro_args(env, &cmdline(kind), &ctl), limit)?;
    src.wait_beat("source ferro-vmm", WARM_BEATS, WARM_LIMIT)?;
    let from = Instant::now();
    let req = json!({"cmd": "migrate", "to": addr, "downtime_ms": DOWNTIME_MS});
    let answer = ferro_request(&ctl, &req, limit)?;
    let mig = &answer["status"]["migration"];
    let num = |k: &str| mig[k].as_f64();
    let mut m = Migration {
        total_ms: num("total_ms").context("no total_ms in the answer")?,
        vmm_downtime_ms: num("downtime_ms"),
        bytes: num("bytes").context("no bytes in the answer")?,
        rounds: num("rounds"),
        ..Default::default()
    };
    m.detail = format!(
        "final dirty pages {:?}, bandwidth {:?} MiB/s",
        num("final_dirty_pages"),
        num("bandwidth_bps").map(|b| (b / (1 << 20) as f64).round())
    );
    match src.wait_exit(Duration::from_secs(10)) {
        Some(0) => {}
        other => bail!(
            "the source did not exit 0 after the migration ({other:?}): {}",
            crate::parse::last_lines(&src.stderr(), 2)
        ),
    }
    let at = src.last_beat().unwrap_or(0);
    dst.wait_beat(
        "destination ferro-vmm",
        at + AFTER_BEATS,
        Duration::from_secs(20),
    )?;
    guest_side(&src, &dst, from, &mut m)?;
    if let Some(built) = dst
        .stderr()
        .lines()
        .find_map(|l| l.split("(built in ").nth(1))
    {
        m.detail.push_str(&format!(
            ", destination built in {}",
            built.trim_end_matches(')')
        ));
    }
    Ok(m)
}

/// The address in a complete `ferro-vmm: incoming listening on HOST:PORT` line of `stderr`.
fn listening(stderr: &str) -> Option<String> {
    let (_, rest) = stderr.split_once("incoming listening on ")?;
    let (addr, _) = rest.split_once('\n')?;
    Some(addr.trim().to_string()).filter(|a| !a.is_empty())
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn migrate_qemu(
    env: &Env,
    qemu: &Path,
    dir: &Path,
    kind: Kind,
    limit: Duration,
) -> Result<Migration> {
    let (sq, dq) = (dir.join("qsrc.qmp"), dir.join("qdst.qmp"));
    let _ = std::fs::remove_file(&sq);
    let _ = std::fs::remove_file(&dq);
    let port = free_port()?;
    let uri = format!("tcp:127.0.0.1:{port}");
    let line = cmdline(kind);
    let dst = Vm::spawn(qemu, &qemu_args(env, &line, &dq, Some(&uri)), limit)?;
    let mut dqmp = Qmp::connect(&dq, Duration::from_secs(10))?;
    dqmp.migration_parameters()?;
    let mut src = Vm::spawn(qemu, &qemu_args(env, &line, &sq, None), limit)?;
    let mut sqmp = Qmp::connect(&sq, Duration::from_secs(10))?;
    sqmp.migration_parameters()?;
    src.wait_beat("source QEMU", WARM_BEATS, WARM_LIMIT)?;
    let from = Instant::now();
    sqmp.cmd("migrate", json!({"uri": uri}))?;
    let v = sqmp.wait_migration(limit)?;
    let mut m = Migration {
        total_ms: v["total-time"].as_f64().context("no total-time")?,
        vmm_downtime_ms: v["downtime"].as_f64(),
        bytes: v["ram"]["transferred"]
            .as_f64()
            .context("no ram.transferred")?,
        rounds: v["ram"]["dirty-sync-count"].as_f64(),
        detail: format!(
            "setup {:?} ms, {:?} MB/s",
            v["setup-time"].as_f64(),
            v["ram"]["mbps"].as_f64().map(|b| (b / 8.0).round())
        ),
        ..Default::default()
    };
    let _ = sqmp.cmd("quit", json!({}));
    src.wait_exit(Duration::from_secs(5));
    let at = src.last_beat().unwrap_or(0);
    let mut dst = dst;
    dst.wait_beat(
        "destination QEMU",
        at + AFTER_BEATS,
        Duration::from_secs(20),
    )?;
    guest_side(&src, &dst, from, &mut m)?;
    Ok(m)
}

/// Bytes a directory's files take on disk.
fn disk_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(p) else {
        return 0;
    };
    if md.is_file() {
        return md.blocks() * 512;
    }
    std::fs::read_dir(p)
        .map(|rd| rd.flatten().map(|e| disk_bytes(&e.path())).sum())
        .unwrap_or(0)
}

/// What one snapshot and restore measured.
struct Snapshot {
    save_ms: f64,
    size_mib: f64,
    restore_ms: f64,
}

fn snapshot_ferro(env: &Env, dir: &Path, kind: Kind, limit: Duration) -> Result<Snapshot> {
    let ctl = dir.join("snap.sock");
    let snap = dir.join("ferro-snap");
    let _ = std::fs::remove_file(&ctl);
    let _ = std::fs::remove_dir_all(&snap);
    let mut src = Vm::spawn(&env.ferro, &ferro_args(env, &cmdline(kind), &ctl), limit)?;
    src.wait_beat("ferro-vmm", WARM_BEATS, WARM_LIMIT)?;
    let t = Instant::now();
    ferro_request(
        &ctl,
        &json!({"cmd": "snapshot", "dir": snap, "resume": true}),
        limit,
    )?;
    let save_ms = ms(t.elapsed());
    // It runs on after the snapshot.
    let at = src.last_beat().unwrap_or(0);
    src.wait_beat(
        "ferro-vmm after the snapshot",
        at + 10,
        Duration::from_secs(10),
    )?;
    drop(src);
    let size_mib = disk_bytes(&snap) as f64 / (1 << 20) as f64;
    let args = vec![
        "--restore".to_string(),
        snap.display().to_string(),
        "--serial".into(),
        "stdio".into(),
    ];
    let mut r = Vm::spawn(&env.ferro, &args, limit)?;
    r.wait_beat("restored ferro-vmm", at + 20, Duration::from_secs(20))?;
    let restore_ms = ms(r.first_byte().context("no output")? - r.spawned);
    Ok(Snapshot {
        save_ms,
        size_mib,
        restore_ms,
    })
}

fn snapshot_qemu(
    env: &Env,
    qemu: &Path,
    dir: &Path,
    kind: Kind,
    limit: Duration,
) -> Result<Snapshot> {
    let qmp = dir.join("qsnap.qmp");
    let file = dir.join("qemu-state.bin");
    let _ = std::fs::remove_file(&qmp);
    let _ = std::fs::remove_file(&file);
    let line = cmdline(kind);
    let mut src = Vm::spawn(qemu, &qemu_args(env, &line, &qmp, None), limit)?;
    let mut q = Qmp::connect(&qmp, Duration::from_secs(10))?;
    q.migration_parameters()?;
    src.wait_beat("QEMU", WARM_BEATS, WARM_LIMIT)?;
    let t = Instant::now();
    q.cmd("stop", json!({}))?;
    q.cmd(
        "migrate",
        json!({"uri": format!("exec:cat > {}", file.display())}),
    )?;
    q.wait_migration(limit)?;
    q.cmd("cont", json!({}))?;
    let save_ms = ms(t.elapsed());
    let at = src.last_beat().unwrap_or(0);
    src.wait_beat("QEMU after the save", at + 10, Duration::from_secs(10))?;
    drop(q);
    drop(src);
    let size_mib = disk_bytes(&file) as f64 / (1 << 20) as f64;
    let qmp2 = dir.join("qrestore.qmp");
    let _ = std::fs::remove_file(&qmp2);
    let incoming = format!("exec:cat {}", file.display());
    let mut r = Vm::spawn(qemu, &qemu_args(env, &line, &qmp2, Some(&incoming)), limit)?;
    r.wait_beat("restored QEMU", at + 20, Duration::from_secs(20))?;
    let restore_ms = ms(r.first_byte().context("no output")? - r.spawned);
    Ok(Snapshot {
        save_ms,
        size_mib,
        restore_ms,
    })
}

/// Loopback TCP bandwidth: 512 MiB through one connection in 1 MiB writes, MiB/s.
fn loopback_mibs() -> Result<f64> {
    const TOTAL: usize = (MEM_MIB as usize) << 20;
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let rx = std::thread::spawn(move || -> Result<usize> {
        let (mut s, _) = l.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        loop {
            let k = s.read(&mut buf)?;
            if k == 0 {
                return Ok(n);
            }
            n += k;
        }
    });
    let buf: Vec<u8> = (0..1usize << 20).map(|i| (i * 7 + 1) as u8).collect();
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut sent = 0;
    while sent < TOTAL {
        s.write_all(&buf)?;
        sent += buf.len();
    }
    drop(s);
    let got = rx
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver panicked"))??;
    let secs = t.elapsed().as_secs_f64();
    if got != TOTAL {
        bail!("the receiver got {got} of {TOTAL} bytes");
    }
    Ok(TOTAL as f64 / (1 << 20) as f64 / secs)
}

/// Metrics of the idle and dirtying migration rows, in that order:
/// total, guest gap, VMM downtime, bytes, copy ratio, rounds, guest dirtying rate.
const IDLE: [Metric; 8] = [
    Metric::MigTotal,
    Metric::MigGap,
    Metric::MigDowntime,
    Metric::MigBytes,
    Metric::MigCopyRatio,
    Metric::MigRounds,
    Metric::MigDirtyRate,
    Metric::MigSwitch,
];
const FULL: [Metric; 8] = [
    Metric::MigFullTotal,
    Metric::MigFullGap,
    Metric::MigFullDowntime,
    Metric::MigFullBytes,
    Metric::MigFullCopyRatio,
    Metric::MigFullRounds,
    Metric::MigFullDirtyRate,
    Metric::MigFullSwitch,
];
const DIRTY: [Metric; 8] = [
    Metric::MigDirtyTotal,
    Metric::MigDirtyGap,
    Metric::MigDirtyDowntime,
    Metric::MigDirtyBytes,
    Metric::MigDirtyCopyRatio,
    Metric::MigDirtyRounds,
    Metric::MigDirtyDirtyRate,
    Metric::MigDirtySwitch,
];
const SNAP: [Metric; 3] = [Metric::SnapSize, Metric::SnapSave, Metric::SnapRestore];
const SNAP_FULL: [Metric; 3] = [
    Metric::SnapFullSize,
    Metric::SnapFullSave,
    Metric::SnapFullRestore,
];

/// What the section reports besides the samples.
#[derive(Default)]
pub struct MigrateOutcome {
    pub notes: Vec<String>,
    pub runs: usize,
    pub load_start: String,
    pub load_end: String,
    /// Whether this ferro-vmm has `--incoming` (the live-migration rows need it).
    pub ferro_migrates: bool,
    /// Whether it has `--incoming-storage` (the storage-migration rows need it).
    pub ferro_stores: bool,
    /// Runs whose destination ended up with a copy of the disk that differs from what it must
    /// hold: ferro-bench fails on any.
    pub copy_mismatches: Vec<String>,
}

fn ferro_has_option(env: &Env, option: &str) -> bool {
    crate::proc::output(&env.ferro, &strings(&["--help"]), Duration::from_secs(10))
        .is_ok_and(|o| o.stdout.contains(option))
}

fn record_storage(
    r: &mut Results,
    g: storage::Guest,
    sut: Sut,
    round: usize,
    s: &storage::StoreRun,
) {
    let [total, run, gap, down, bytes, disk] = g.metrics();
    let mib = (1u64 << 20) as f64;
    for (m, v) in [
        (total, Some(s.total_ms)),
        (run, Some(s.run_ms)),
        (gap, s.gap_ms),
        (down, s.downtime_ms),
        (bytes, Some(s.bytes / mib)),
        (disk, Some(s.disk_bytes / mib)),
    ] {
        if let (Some(m), Some(v)) = (m, v) {
            r.add(m, sut, round, v);
        }
    }
}

fn record_migration(
    r: &mut Results,
    metrics: &[Metric; 8],
    sut: Sut,
    round: usize,
    m: &Migration,
    bw: Option<f64>,
) {
    r.add(metrics[0], sut, round, m.total_ms);
    r.add(metrics[1], sut, round, m.guest_gap_ms);
    r.add(metrics[7], sut, round, m.switch_ms);
    if let Some(d) = m.vmm_downtime_ms {
        r.add(metrics[2], sut, round, d);
    }
    r.add(metrics[3], sut, round, m.bytes / (1 << 20) as f64);
    if let Some(bw) = bw {
        let ideal_ms = MEM_MIB as f64 / bw * 1e3;
        r.add(metrics[4], sut, round, m.total_ms / ideal_ms);
    }
    if let Some(n) = m.rounds {
        r.add(metrics[5], sut, round, n);
    }
    if let Some(d) = m.dirty_mibs {
        r.add(metrics[6], sut, round, d);
    }
}

/// Runs `runs` alternating rounds after one warm-up round.
pub fn run(env: &Env, runs: usize, timeout: Duration, r: &mut Results) -> MigrateOutcome {
    let mut o = MigrateOutcome {
        runs,
        load_start: crate::fmt_load(crate::loadavg()),
        ..Default::default()
    };
    let dir = env.work.join("migrate");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        o.notes
            .push(format!("not measured: {}: {e}", dir.display()));
        return o;
    }
    o.ferro_migrates = ferro_has_option(env, "--incoming");
    if !o.ferro_migrates {
        let why = "this ferro-vmm has no --incoming (live migration not built yet)";
        for m in IDLE.iter().chain(FULL.iter()).chain(DIRTY.iter()) {
            r.skip(*m, Sut::Ferro, why);
        }
    }
    o.ferro_stores = ferro_has_option(env, "--incoming-storage");
    if !o.ferro_stores {
        for m in storage::all_metrics() {
            r.skip(m, Sut::Ferro, "this ferro-vmm has no --incoming-storage");
        }
    }
    let images = match storage::make_images(&dir) {
        Ok(i) => Some(i),
        Err(e) => {
            let why = format!("cannot write the disk images: {e:#}");
            log(&why);
            for m in storage::all_metrics() {
                r.skip(m, Sut::Ferro, &why);
                r.skip(m, Sut::Microvm, &why);
            }
            None
        }
    };
    if env.qemu.is_none() {
        for m in IDLE
            .iter()
            .chain(FULL.iter())
            .chain(DIRTY.iter())
            .chain(SNAP.iter())
            .chain(SNAP_FULL.iter())
            .chain(storage::all_metrics().iter())
        {
            r.skip(*m, Sut::Microvm, "qemu-system-x86_64 not found on PATH");
        }
    }
    let limit = timeout.max(Duration::from_secs(60));
    for round in 0..=runs {
        let tag = if round == 0 {
            "warm-up".to_string()
        } else {
            format!("{round}/{runs}")
        };
        let bw = match loopback_mibs() {
            Ok(bw) => {
                log(format!("{tag}: loopback TCP {bw:.0} MiB/s"));
                if round > 0 {
                    r.add(Metric::LoopbackBw, Sut::Loopback, round, bw);
                }
                Some(bw)
            }
            Err(e) => {
                o.notes
                    .push(format!("loopback bandwidth, round {round}: {e:#}"));
                None
            }
        };
        for guest in [Kind::Idle, Kind::Full, Kind::Dirty] {
            let metrics = guest.metrics();
            let kind = guest.name();
            let mut systems: Vec<(Sut, Option<&PathBuf>)> = Vec::new();
            if o.ferro_migrates {
                systems.push((Sut::Ferro, None));
            }
            if let Some(q) = &env.qemu {
                systems.push((Sut::Microvm, Some(q)));
            }
            for (sut, qemu) in systems {
                let res = match qemu {
                    None => migrate_ferro(env, &dir, guest, limit),
                    Some(q) => migrate_qemu(env, q, &dir, guest, limit),
                };
                match res {
                    Ok(m) => {
                        log(format!(
                            "{tag} {kind} migration {}: total {:.0} ms, guest gap {:.1} ms, \
                             switch-over {:.1} ms, VMM downtime {:?} ms, {:.1} MiB, rounds {:?}, dirtying {:?} MiB/s, \
                             {}{}",
                            sut.label(),
                            m.total_ms,
                            m.guest_gap_ms,
                            m.switch_ms,
                            m.vmm_downtime_ms,
                            m.bytes / (1 << 20) as f64,
                            m.rounds,
                            m.dirty_mibs.map(|d| d.round()),
                            m.detail,
                            m.note
                                .as_deref()
                                .map(|n| format!(" ({n})"))
                                .unwrap_or_default()
                        ));
                        if let Some(n) = &m.note {
                            o.notes.push(format!(
                                "{kind} migration, {}, round {round}: {n}",
                                sut.label()
                            ));
                        }
                        if round > 0 {
                            record_migration(r, metrics, sut, round, &m, bw);
                        }
                    }
                    Err(e) => {
                        log(format!(
                            "{tag} {kind} migration {}: FAILED: {e:#}",
                            sut.label()
                        ));
                        if round > 0 {
                            for m in metrics.iter() {
                                r.fail(*m, sut, format!("{e:#}"));
                            }
                        }
                    }
                }
            }
        }
        let mut systems: Vec<(Sut, Option<&PathBuf>)> = vec![(Sut::Ferro, None)];
        if let Some(q) = &env.qemu {
            systems.push((Sut::Microvm, Some(q)));
        }
        for (guest, sut, qemu) in [Kind::Idle, Kind::Full]
            .into_iter()
            .flat_map(|k| systems.iter().map(move |(s, q)| (k, *s, *q)))
        {
            let snap = if guest == Kind::Full {
                &SNAP_FULL
            } else {
                &SNAP
            };
            let kind = guest.name();
            let res = match qemu {
                None => snapshot_ferro(env, &dir, guest, limit),
                Some(q) => snapshot_qemu(env, q, &dir, guest, limit),
            };
            match res {
                Ok(s) => {
                    log(format!(
                        "{tag} {kind} snapshot {}: save {:.1} ms, {:.1} MiB on disk, restore to output {:.1} ms",
                        sut.label(),
                        s.save_ms,
                        s.size_mib,
                        s.restore_ms
                    ));
                    if round > 0 {
                        r.add(snap[0], sut, round, s.size_mib);
                        r.add(snap[1], sut, round, s.save_ms);
                        r.add(snap[2], sut, round, s.restore_ms);
                    }
                }
                Err(e) => {
                    log(format!(
                        "{tag} {kind} snapshot {}: FAILED: {e:#}",
                        sut.label()
                    ));
                    if round > 0 {
                        for &m in snap {
                            r.fail(m, sut, format!("{e:#}"));
                        }
                    }
                }
            }
        }
        if let Some(img) = &images {
            storage_round(env, &dir, img, round, &tag, limit, r, &mut o);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    o.load_end = crate::fmt_load(crate::loadavg());
    o
}

/// One round of the storage rows: each guest on ferro-vmm, then on QEMU.
#[allow(clippy::too_many_arguments)]
fn storage_round(
    env: &Env,
    dir: &Path,
    img: &storage::Images,
    round: usize,
    tag: &str,
    limit: Duration,
    r: &mut Results,
    o: &mut MigrateOutcome,
) {
    for guest in [storage::Guest::Idle, storage::Guest::Writing] {
        let kind = guest.name();
        let mut systems: Vec<(Sut, Option<&PathBuf>)> = Vec::new();
        if o.ferro_stores {
            systems.push((Sut::Ferro, None));
        }
        if let Some(q) = &env.qemu {
            systems.push((Sut::Microvm, Some(q)));
        }
        for (sut, qemu) in systems {
            let res = match qemu {
                None => storage::migrate_ferro(env, dir, img, guest, limit),
                Some(q) => storage::migrate_qemu(env, q, dir, img, guest, limit),
            };
            match res {
                Ok(s) => {
                    log(format!(
                        "{tag} {kind} storage migration {}: total {:.0} ms, destination runs after \
                         {:.0} ms, guest gap {:?} ms, VMM downtime {:?} ms, {:.1} MiB ({:.1} MiB of disk), \
                         copy checked; {}{}",
                        sut.label(),
                        s.total_ms,
                        s.run_ms,
                        s.gap_ms.map(|g| (g * 10.0).round() / 10.0),
                        s.downtime_ms,
                        s.bytes / (1 << 20) as f64,
                        s.disk_bytes / (1 << 20) as f64,
                        s.detail,
                        s.note
                            .as_deref()
                            .map(|n| format!(" ({n})"))
                            .unwrap_or_default()
                    ));
                    if let Some(n) = &s.note {
                        o.notes.push(format!(
                            "{kind} storage migration, {}, round {round}: {n}",
                            sut.label()
                        ));
                    }
                    if round > 0 {
                        record_storage(r, guest, sut, round, &s);
                    }
                }
                Err(e) => {
                    log(format!(
                        "{tag} {kind} storage migration {}: FAILED: {e:#}",
                        sut.label()
                    ));
                    if storage::is_copy_mismatch(&e) {
                        o.copy_mismatches.push(format!(
                            "{kind} storage migration, {}, round {round}: {e:#}",
                            sut.label()
                        ));
                    }
                    if round > 0 {
                        for m in guest.metrics().into_iter().flatten() {
                            r.fail(m, sut, format!("{e:#}"));
                        }
                    }
                }
            }
        }
    }
}

const ROWS: [Row; 39] = [
    Row::new(Metric::MigTotal, Sut::Microvm, Target::Info),
    Row::new(Metric::MigGap, Sut::Microvm, Target::ValueAtMost(50.0)),
    Row::new(Metric::MigSwitch, Sut::Microvm, Target::Info),
    Row::new(Metric::MigDowntime, Sut::Microvm, Target::Info),
    Row::new(Metric::MigBytes, Sut::Microvm, Target::Info),
    Row::new(Metric::MigCopyRatio, Sut::Microvm, Target::ValueAtMost(1.5)),
    Row::new(Metric::MigRounds, Sut::Microvm, Target::Info),
    Row::new(Metric::MigFullTotal, Sut::Microvm, Target::Info),
    Row::new(Metric::MigFullGap, Sut::Microvm, Target::Info),
    Row::new(Metric::MigFullSwitch, Sut::Microvm, Target::Info),
    Row::new(Metric::MigFullDowntime, Sut::Microvm, Target::Info),
    Row::new(Metric::MigFullBytes, Sut::Microvm, Target::Info),
    Row::new(
        Metric::MigFullCopyRatio,
        Sut::Microvm,
        Target::ValueAtMost(1.5),
    ),
    Row::new(Metric::MigFullRounds, Sut::Microvm, Target::Info),
    Row::new(Metric::MigDirtyTotal, Sut::Microvm, Target::Info),
    Row::new(Metric::MigDirtyGap, Sut::Microvm, Target::Info),
    Row::new(Metric::MigDirtySwitch, Sut::Microvm, Target::Info),
    Row::new(Metric::MigDirtyDowntime, Sut::Microvm, Target::Info),
    Row::new(Metric::MigDirtyBytes, Sut::Microvm, Target::Info),
    Row::new(
        Metric::MigDirtyCopyRatio,
        Sut::Microvm,
        Target::ValueAtMost(1.5),
    ),
    Row::new(Metric::MigDirtyRounds, Sut::Microvm, Target::Info),
    Row::new(Metric::MigDirtyDirtyRate, Sut::Microvm, Target::Info),
    Row::new(Metric::SnapSize, Sut::Microvm, Target::Info),
    Row::new(Metric::SnapSave, Sut::Microvm, Target::Info),
    Row::new(Metric::SnapRestore, Sut::Microvm, Target::ValueAtMost(20.0)),
    Row::new(Metric::SnapFullSize, Sut::Microvm, Target::Info),
    Row::new(Metric::SnapFullSave, Sut::Microvm, Target::Info),
    Row::new(
        Metric::SnapFullRestore,
        Sut::Microvm,
        Target::ValueAtMost(20.0),
    ),
    Row::new(Metric::StoreTotal, Sut::Microvm, Target::Info),
    Row::new(Metric::StoreRun, Sut::Microvm, Target::Info),
    Row::new(Metric::StoreGap, Sut::Microvm, Target::Info),
    Row::new(Metric::StoreDowntime, Sut::Microvm, Target::Info),
    Row::new(Metric::StoreBytes, Sut::Microvm, Target::Info),
    Row::new(Metric::StoreDiskBytes, Sut::Microvm, Target::Info),
    Row::new(Metric::StoreWriteTotal, Sut::Microvm, Target::Info),
    Row::new(Metric::StoreWriteRun, Sut::Microvm, Target::Info),
    Row::new(Metric::StoreWriteDowntime, Sut::Microvm, Target::Info),
    Row::new(Metric::StoreWriteBytes, Sut::Microvm, Target::Info),
    Row::new(Metric::StoreWriteDiskBytes, Sut::Microvm, Target::Info),
];

/// The docs/benchmarks.md section.
pub fn section(r: &Results, o: &MigrateOutcome, date: &str, head: &str) -> String {
    let mut s = format!(
        "## Snapshots and live migration, probe guest on /dev/kvm\n\n\
         Measured {date} at commit {head}; {} alternating runs per system after one warm-up each \
         (ferro-vmm, then QEMU microvm, for each kind of run); {MEM_MIB} MiB, 1 vCPU, the same \
         probe binary on both VMMs.\n\n",
        o.runs
    );
    s.push_str(&format!(
        "- **Guest**: probe cmdline `{}` (idle), `{}` (populated) and `{}` (dirtying): from \
         user mode the probe prints `hb=<seq>` on COM1 every {BEAT_US} µs of its kvmclock; the \
         populated guest first writes a non-zero word into every 4 KiB page of {FULL_MIB} MiB \
         (so that much memory cannot travel as zero pages), then only beats; the dirtying guest fills \
         a {DIRTY_MIB} MiB region the same way, then writes one word into {DIRTY_MIBS} MiB worth \
         of its 4 KiB pages per second, cycling through it (the row \"guest's dirtying rate\" is \
         what it achieved, from its own page count, over the beats from before the migration to \
         after it: the write faults of dirty-page tracking slow it down while it is migrated). Each run starts a fresh VM and \
         waits for beat {WARM_BEATS} first.\n",
        cmdline(Kind::Idle),
        cmdline(Kind::Full),
        cmdline(Kind::Dirty)
    ));
    s.push_str(&format!(
        "- **Live migration** over loopback TCP on this host. ferro-vmm: destination \
         `ferro-vmm --incoming tcp:127.0.0.1:0 --serial stdio`, source control request \
         `{{\"cmd\":\"migrate\",\"to\":ADDR,\"downtime_ms\":{DOWNTIME_MS}}}`; its total time, \
         downtime, rounds and bytes are the figures of the answer (`status.migration`). QEMU: \
         destination `-incoming tcp:127.0.0.1:PORT`, source QMP `migrate-set-parameters` \
         (`downtime-limit` {DOWNTIME_MS} ms, `max-bandwidth` 1 TiB/s: QEMU's default cap of \
         128 MiB/s and default downtime limit of 300 ms are changed) then `migrate`, polled \
         with `query-migrate`; its `total-time`, `downtime`, `ram.transferred` and \
         `ram.dirty-sync-count` (rounds). The two VMMs' own downtimes end at different points: \
         ferro-vmm's runs from pausing the vCPUs to the destination's acknowledgement that it \
         has built the VM, QEMU's ends when the source has sent the last bytes (before the \
         destination has loaded them and started), so only the guest-side row compares like \
         with like. **Downtime, guest \
         side**: the largest gap between the arrival of consecutive console bytes the host \
         reads from the source and then from the destination, from the migrate request until \
         the destination has printed {AFTER_BEATS} more beats (so it includes up to one beat \
         period and the console path; every run also checks that the beats go on without a \
         missing or repeated number). It is the larger of the **switch-over gap** (from the \
         last byte the source printed to the first byte of the destination: the guest's pause \
         itself) and any stall of the guest while its memory is copied (when dirty logging is \
         switched on, say, or the copy takes the CPU its vCPU needs: 2 CPUs here). **total time / (memory ÷ loopback bandwidth)**: the \
         total time over the time {MEM_MIB} MiB take through one loopback TCP connection (1 MiB \
         writes, measured by ferro-bench at the start of each round; \"loopback TCP bandwidth\" \
         row); both VMMs skip or compress zero pages, so an idle guest can be well under 1; the \
         populated guest is the one where it means something.\n"
    ));
    s.push_str(
        "- **Snapshots** of the idle and the populated guest to the host's disk (target/ferro-bench, page cache \
         warm; nothing is synced). ferro-vmm: control request `{\"cmd\":\"snapshot\",\"dir\":D,\
         \"resume\":true}`, then `ferro-vmm --restore D --serial stdio` in a new process. QEMU \
         has no savevm without a qcow2 disk for the state, so the equivalent is a migration to \
         a file: QMP `stop`, `migrate \"exec:cat > FILE\"` (polled until completed), `cont`; \
         restore with a new QEMU with the same options and `-incoming \"exec:cat FILE\"` (the \
         source runs with `-global migration.store-global-state=off` so that the restored VM \
         starts by itself rather than paused like the saved one). **save time**: from sending \
         the request (ferro) or `stop` (QEMU) to the answer of the request or of `cont`: the \
         guest's pause, the write, the resume. **size on disk**: blocks of the snapshot \
         directory or file (ferro's memory file is sparse). **restore to the guest's next \
         output**: from just before the spawn of the restoring VMM to the first console byte \
         it prints (the guest prints a beat at most 1 ms of its own time after it runs again). \
         ferro-vmm maps the snapshot's memory file lazily, so its pages come in from the page \
         cache as the guest touches them, after this point (the beating guest touches few); \
         QEMU reads the whole state before the guest runs.\n",
    );
    s.push_str(&format!(
        "- **Storage migration** (no shared storage) of the probe guest with a raw disk of \
         {disk} MiB, which the host fills with non-zero pseudo-random data first (each VMM \
         gets its own copy of the same image under target/ferro-bench for each run; both VMMs \
         open it with the host's page cache, their default). Two guests: the idle one above \
         (`{idle}`; it never touches its disk), and a **writing** one, `{write}`, which writes \
         the probe's test pattern over the first {wmib} MiB of its disk in 64 KiB requests, one \
         at a time, then flushes and reads it all back; the migration starts as soon as the \
         probe has found its disk, so the copy races its writes (when the guest has finished \
         writing before the switch-over, a note says so: it then reads back on the destination \
         what the copy brought). ferro-vmm: \
         destination `ferro-vmm --incoming tcp:127.0.0.1:0 --incoming-storage DIR` (it writes \
         DIR/disk0.raw and DIR/kernel, and makes them durable before it runs the VM), source \
         control request `{{\"cmd\":\"migrate\",\"to\":ADDR,\"downtime_ms\":{DOWNTIME_MS},\
         \"copy_storage\":true}}`. QEMU, the way libvirt's `--copy-storage-all` drives it \
         (QEMU 7.2 here still has the deprecated `migrate -b`; later QEMUs removed it): the destination is started \
         paused (`-S`) with `-incoming tcp:127.0.0.1:PORT` and a blank (sparse) image of the same \
         size as `-drive file=F,if=none,id=d0,format=raw -device virtio-blk-pci,drive=d0` on \
         `-M microvm,pcie=on` (the writing guest's cmdline gets `pci_ecam=0xe0000000` in front \
         for QEMU: the probe finds QEMU 7.2 microvm's ECAM only so); its QMP `nbd-server-start` (a unix socket) and \
         `nbd-server-add` (`d0`, writable) are done before the measurement starts. Then on the \
         source QMP `drive-mirror` (`d0` into `nbd:unix:SOCK:exportname=d0`, sync `full`, mode \
         `existing`, format `raw`), `query-block-jobs` polled until the job is ready, \
         `migrate-set-parameters` as above with the capability `pause-before-switchover` on, \
         `migrate`, `query-migrate` polled until `pre-switchover` (the source's vCPUs are \
         stopped, its devices' state not sent yet), `block-job-cancel` (a ready mirror \
         cancelled ends with the target a copy of the stopped source; BLOCK_JOB_COMPLETED is \
         awaited), `migrate-continue`, `query-migrate` polled until completed; then \
         `nbd-server-stop` and `cont` on the destination. That is libvirt's order \
         (qemuMigrationSrcRun); cancelling the mirror only after the migration has completed \
         lost a source QEMU once in this bench's runs (its QMP socket reset during those \
         steps). **total time**: host clock, ferro-vmm from the migrate request to its \
         answer, QEMU from `drive-mirror` to `query-migrate` saying completed; **total time \
         until the destination runs**: ferro-vmm the same (its answer comes once the destination \
         runs the VM), QEMU until `cont` has answered (block job ended, NBD server stopped). \
         **downtime the VMM reports**: `status.migration.downtime_ms` and QEMU's `downtime` \
         (from stopping the vCPUs, so it holds the mirror's cancel too); the \
         guest-side gap (idle guest only, as above) also holds QEMU's block-job end and `cont`. \
         **bytes sent**: ferro-vmm's `bytes` (memory, disk, kernel), QEMU's `ram.transferred` \
         plus the mirror job's final `offset` (the disk bytes it copied, without NBD's headers); \
         **disk bytes sent**: ferro-vmm's `disk_bytes` (it counts the kernel file, 0.1 MiB, \
         too), the mirror's `offset`. After every run \
         the destination's disk is compared byte for byte with the source's image (idle guest) \
         or with what the writing guest must leave (its pattern over {wmib} MiB, the original \
         data after it; the guest's own read-back on the destination must say \
         `blk_verify=ok` too): a copy that differs fails the run and ferro-bench.\n",
        disk = storage::DISK_MIB,
        idle = cmdline(Kind::Idle),
        write = storage::write_cmdline(),
        wmib = storage::WRITE_MIB,
    ));
    s.push_str(&format!(
        "\nHost load average (1, 5, 15 min) at the start of this section: {}; at its end: {} \
         (2 CPUs; other engineers' builds and tests share them: per-round ratios are the \
         steadier column).\n\n",
        o.load_start, o.load_end
    ));
    if !o.copy_mismatches.is_empty() {
        s.push_str(&format!(
            "**FAIL: {} storage migration(s) left a destination disk that differs from the \
             source's** (see the notes).\n\n",
            o.copy_mismatches.len()
        ));
    }
    s.push_str(&report::summary_table(r, &ROWS));
    if let Some(bw) = r.median(Metric::LoopbackBw, Sut::Loopback) {
        s.push_str(&format!(
            "\nLoopback TCP bandwidth measured in the same rounds: {} (median): {MEM_MIB} MiB \
             take {} through it.\n",
            crate::stats::fmt_value(bw, "MiB/s"),
            crate::stats::fmt_value(MEM_MIB as f64 / bw * 1e3, "ms")
        ));
    }
    if !o.ferro_migrates {
        s.push_str(
            "\nThe ferro-vmm binary measured has no `--incoming`: its live-migration rows wait \
             for the migration engine.\n",
        );
    }
    s.push_str("\nAll samples:\n\n");
    let mut metrics: Vec<Metric> = IDLE
        .iter()
        .chain(FULL.iter())
        .chain(DIRTY.iter())
        .chain(SNAP.iter())
        .chain(SNAP_FULL.iter())
        .copied()
        .chain(storage::all_metrics())
        .collect();
    metrics.push(Metric::LoopbackBw);
    s.push_str(&report::spread_table(r, &metrics));
    if !o.notes.is_empty() || !o.copy_mismatches.is_empty() {
        s.push('\n');
        for n in o.copy_mismatches.iter().chain(o.notes.iter()) {
            s.push_str(&format!("- {}\n", n.replace('\n', " ")));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beat_lines() {
        let t = "probe=start\nhb=1\nhb=2\nhb=3 dirtied=7\nhb=4\nhb=";
        assert_eq!(beats(t), vec![1, 2, 3, 4]);
        assert_eq!(beats("hb=1\nhb=2"), vec![1]);
        assert_eq!(beat_break(&[1, 2, 3, 4]), None);
        assert_eq!(beat_break(&[1, 2, 4]), Some((2, 4)));
        assert_eq!(beat_break(&[1, 2, 2, 3]), Some((2, 2)));
        assert_eq!(
            dirtied("hb=100 dirtied=3277 clock=5\nhb=101\nhb=200 dirtied=6554 clock=9\n"),
            vec![(3277.0, 5.0), (6554.0, 9.0)]
        );
    }

    #[test]
    fn gaps() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let times = [at(0), at(1), at(2), at(40), at(41), at(50), at(55), at(100)];
        // The 38 ms gap spans `from` = 10 ms; the 45 ms one comes after `until`.
        assert_eq!(
            largest_gap(&times, at(10), at(60)),
            Some(Duration::from_millis(38))
        );
        assert_eq!(
            largest_gap(&times, at(10), at(100)),
            Some(Duration::from_millis(45))
        );
        assert_eq!(largest_gap(&times[..1], at(0), at(0)), None);
    }

    #[test]
    fn listening_line() {
        let l = "ferro-vmm: incoming listening on 127.0.0.1:4321\nmore";
        assert_eq!(listening(l).as_deref(), Some("127.0.0.1:4321"));
        assert_eq!(
            listening("ferro-vmm: incoming listening on 127.0.0.1:43"),
            None
        );
        assert_eq!(listening("nothing\n"), None);
    }

    #[test]
    fn commands() {
        assert!(cmdline(Kind::Dirty).contains("dirty_mibs=128"));
        assert!(cmdline(Kind::Full).contains("beat_fill=on dirty_mib=448"));
        assert!(!cmdline(Kind::Idle).contains("dirty"));
    }
}
