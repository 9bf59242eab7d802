//! The daemon rows: how fast `ferro daemon` stamps out VMs from a template, against the same
//! work done by hand with QEMU (qemu-img overlay + tap on the bridge + qemu-system).
//!
//! Everything runs in a network namespace of its own (`ferro-bench-d`) with a bridge
//! (`fbbr0`, 10.79.0.1/24) the daemon creates, so nothing touches the host's interfaces. The
//! guest is the probe in `net=on` mode with a 16 MiB qcow2 disk from the template: "its service
//! answers" means an ICMP echo reply from the address the daemon gave it, seen by `ping` in the
//! namespace. Per round:
//! - ferro: a fresh daemon and data dir; `ferro vm create NAME --template probe --net auto --start`, then
//!   `ferro vm show` for the address, then ping until the first reply — for 1 VM, then for 20
//!   VMs at once (20 client threads); the daemon's VmHWM at the end.
//! - QEMU: per VM `qemu-img create -b base` (overlay), a tap on the bridge, `qemu-system-x86_64
//!   -M microvm,pcie=on` with the probe, its disk and NIC, then ping until the first reply —
//!   the same steps a script without a daemon has to take.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::stats::{fmt_ratio, median, min_max};
use crate::Env;

const NS: &str = "ferro-bench-d";
const BRIDGE: &str = "fbbr0";
const BRIDGE_ADDR: &str = "10.79.0.1/24";
const MANY: usize = 20;
const GUEST_MIB: &str = "64";

/// What one run of the daemon rows measured: per metric and system, one sample per round.
#[derive(Default)]
pub struct DaemonOutcome {
    one_ms: [Vec<f64>; 2],
    many_ms: [Vec<f64>; 2],
    per_sec: [Vec<f64>; 2],
    daemon_hwm_mib: Vec<f64>,
    notes: Vec<String>,
}

const FERRO: usize = 0;
const QEMU: usize = 1;

fn run_ok(cmd: &mut Command, what: &str) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .lines()
                .last()
                .unwrap_or("failed")
        );
    }
    Ok(out)
}

fn in_ns(prog: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", NS, prog]);
    c
}

/// The namespace, removed (with every process left in it) when dropped.
struct Netns;

impl Netns {
    fn create() -> Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", NS]).output();
        run_ok(
            Command::new("ip").args(["netns", "add", NS]),
            "ip netns add",
        )?;
        let ns = Netns;
        run_ok(
            in_ns("ip").args(["link", "set", "lo", "up"]),
            "ip link set lo up",
        )?;
        Ok(ns)
    }

    fn kill_all(&self) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", NS]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill(2) with a pid read from `ip netns pids` has no memory effects.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.kill_all();
        let _ = Command::new("ip").args(["netns", "del", NS]).output();
    }
}

/// Pings `addr` from the namespace until the first reply (at most `limit`).
fn ping_until_reply(addr: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        // -c 1 -w 2: keep sending (every 2 ms) until one reply or 2 s.
        let out = in_ns("ping")
            .args(["-n", "-q", "-c", "1", "-i", "0.002", "-w", "2", addr])
            .output()
            .context("run ping")?;
        if out.status.success() {
            return Ok(());
        }
    }
    bail!("no echo reply from {addr} within {limit:?}")
}

struct Daemon {
    ferro: PathBuf,
    sock: String,
    pid: u32,
}

impl Daemon {
    fn start(env: &Env, ferro: &Path, data: &Path) -> Result<Self> {
        std::fs::create_dir_all(data)?;
        let child = in_ns(&ferro.to_string_lossy())
            .arg("daemon")
            .arg("--data-dir")
            .arg(data)
            .arg("--vmm")
            .arg(&env.ferro)
            .args(["--bridge", BRIDGE, "--bridge-address", BRIDGE_ADDR])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(data.join("daemon.log"))?)
            .spawn()
            .context("start ferro daemon")?;
        let d = Daemon {
            ferro: ferro.to_path_buf(),
            sock: format!("unix:{}", data.join("ferro.sock").display()),
            pid: child.id(),
        };
        let t = Instant::now();
        while d.cli(&["vm", "list"]).is_err() {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("the daemon did not answer within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    fn cli(&self, args: &[&str]) -> Result<String> {
        let out = run_ok(
            Command::new(&self.ferro)
                .arg("--host")
                .arg(&self.sock)
                .args(args),
            &format!("ferro {}", args.join(" ")),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The first NIC's address of `vm`, without its prefix.
    fn address(&self, vm: &str) -> Result<String> {
        let v: serde_json::Value = serde_json::from_str(&self.cli(&["--json", "vm", "show", vm])?)
            .context("vm show --json")?;
        v["nics"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .map(str::to_string)
            .with_context(|| format!("no address for {vm} in {v}"))
    }

    /// Creates, starts and pings one VM from the template; returns when it answered.
    fn stamp(&self, vm: &str) -> Result<()> {
        self.cli(&[
            "vm",
            "create",
            vm,
            "--template",
            "probe",
            "--net",
            "auto",
            "--start",
        ])?;
        let addr = self.address(vm)?;
        ping_until_reply(&addr, Duration::from_secs(30))
    }

    fn hwm_mib(&self) -> Option<f64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let kb: f64 = s
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    }
}

fn probe_cmdline() -> &'static str {
    "net=on net_secs=300 exit=poweroff smp=off"
}

/// One round of the ferro rows; returns (one VM ms, 20 VMs ms, daemon VmHWM MiB).
fn ferro_round(env: &Env, ferro: &Path, work: &Path) -> Result<(f64, f64, Option<f64>)> {
    let ns = Netns::create()?;
    let data = work.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let d = Daemon::start(env, ferro, &data)?;
    let seed = work.join("seed.qcow2");
    let _ = std::fs::remove_file(&seed);
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&seed)
            .arg("16M"),
        "qemu-img create",
    )?;
    d.cli(&[
        "vm",
        "create",
        "seed",
        "--kernel",
        &env.probe.to_string_lossy(),
        "--cmdline",
        probe_cmdline(),
        "--memory",
        GUEST_MIB,
        "--disk",
        &format!("path={}", seed.display()),
        "--net",
        "auto",
    ])?;
    d.cli(&["template", "create", "probe", "--from-vm", "seed"])?;

    let t = Instant::now();
    d.stamp("one")?;
    let one = t.elapsed().as_secs_f64() * 1e3;

    let d = Arc::new(d);
    let t = Instant::now();
    let handles: Vec<_> = (0..MANY)
        .map(|i| {
            let d = Arc::clone(&d);
            std::thread::spawn(move || d.stamp(&format!("vm{i}")))
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
    }
    let many = t.elapsed().as_secs_f64() * 1e3;
    let hwm = d.hwm_mib();
    drop(ns);
    Ok((one, many, hwm))
}

/// Starts one QEMU VM the way a script would; returns when it answered.
fn qemu_stamp(env: &Env, qemu: &Path, base: &Path, work: &Path, i: usize) -> Result<()> {
    let overlay = work.join(format!("q{i}.qcow2"));
    let _ = std::fs::remove_file(&overlay);
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(base)
            .arg(&overlay),
        "qemu-img create overlay",
    )?;
    let tap = format!("fbq{i}");
    run_ok(
        in_ns("ip").args(["tuntap", "add", "dev", &tap, "mode", "tap"]),
        "ip tuntap add",
    )?;
    run_ok(
        in_ns("ip").args(["link", "set", &tap, "master", BRIDGE, "up"]),
        "ip link set master",
    )?;
    let addr = format!("10.79.0.{}", 100 + i);
    let mac = format!("52:54:00:79:00:{:02x}", 100 + i);
    let append = format!("{} pci_ecam=0xe0000000 net_ip={addr}", probe_cmdline());
    in_ns(&qemu.to_string_lossy())
        .args(["-accel", "kvm", "-cpu", "host,-arch-capabilities"])
        .args([
            "-M",
            "microvm,x-option-roms=off,rtc=on,pcie=on",
            "-m",
            GUEST_MIB,
            "-smp",
            "1",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "null",
        ])
        .arg("-kernel")
        .arg(&env.probe)
        .args(["-append", &append])
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=d0,format=qcow2",
            overlay.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d0,disable-legacy=on"])
        .args([
            "-netdev",
            &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        ])
        .args([
            "-device",
            &format!("virtio-net-pci,netdev=n0,mac={mac},disable-legacy=on"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start qemu-system-x86_64")?;
    ping_until_reply(&addr, Duration::from_secs(30))
}

/// One round of the QEMU rows; returns (one VM ms, 20 VMs ms).
fn qemu_round(env: &Env, qemu: &Path, work: &Path) -> Result<(f64, f64)> {
    let ns = Netns::create()?;
    run_ok(
        in_ns("ip").args(["link", "add", BRIDGE, "type", "bridge"]),
        "ip link add bridge",
    )?;
    run_ok(
        in_ns("ip").args(["addr", "add", BRIDGE_ADDR, "dev", BRIDGE]),
        "ip addr add",
    )?;
    run_ok(
        in_ns("ip").args(["link", "set", BRIDGE, "up"]),
        "ip link set up",
    )?;
    let base = work.join("qbase.qcow2");
    let _ = std::fs::remove_file(&base);
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("16M"),
        "qemu-img create",
    )?;
    let t = Instant::now();
    qemu_stamp(env, qemu, &base, work, 0)?;
    let one = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let base = base.as_path();
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = (1..=MANY)
            .map(|i| s.spawn(move || qemu_stamp(env, qemu, base, work, i)))
            .collect();
        for h in hs {
            h.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        }
        Ok(())
    })?;
    let many = t.elapsed().as_secs_f64() * 1e3;
    drop(ns);
    Ok((one, many))
}

/// Runs `runs` alternating rounds (ferro, then QEMU), after one warm-up round of each.
pub fn run(env: &Env, runs: usize) -> DaemonOutcome {
    let mut o = DaemonOutcome::default();
    let ferro_cli = env.repo.join("target/release/ferro");
    if !ferro_cli.exists() {
        o.notes.push(format!(
            "not measured: {} is missing (cargo build --release -p ferro-cli)",
            ferro_cli.display()
        ));
        return o;
    }
    let work = env.work.join("daemon");
    if let Err(e) = std::fs::create_dir_all(&work) {
        o.notes
            .push(format!("not measured: {}: {e}", work.display()));
        return o;
    }
    for round in 0..=runs {
        match ferro_round(env, &ferro_cli, &work) {
            Ok((one, many, hwm)) if round > 0 => {
                o.one_ms[FERRO].push(one);
                o.many_ms[FERRO].push(many);
                o.per_sec[FERRO].push(MANY as f64 / (many / 1e3));
                o.daemon_hwm_mib.extend(hwm);
            }
            Ok(_) => {}
            Err(e) => o.notes.push(format!("ferro round {round} failed: {e:#}")),
        }
        eprintln!("daemon: round {round}/{runs} ferro done");
        if let Some(q) = &env.qemu {
            match qemu_round(env, q, &work) {
                Ok((one, many)) if round > 0 => {
                    o.one_ms[QEMU].push(one);
                    o.many_ms[QEMU].push(many);
                    o.per_sec[QEMU].push(MANY as f64 / (many / 1e3));
                }
                Ok(_) => {}
                Err(e) => o.notes.push(format!("QEMU round {round} failed: {e:#}")),
            }
            eprintln!("daemon: round {round}/{runs} QEMU done");
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    o
}

fn cell(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(v) if unit == "ms" => format!("{v:.0} ms"),
        Some(v) if unit == "/s" => format!("{v:.1} /s"),
        Some(v) => format!("{v:.1} {unit}"),
        None => "—".into(),
    }
}

/// The docs/benchmarks.md section.
pub fn section(o: &DaemonOutcome, runs: usize, date: &str, head: &str) -> String {
    let mut s = String::from("## The daemon: VMs from a template\n\n");
    let _ = writeln!(
        s,
        "Measured {date} at commit {head}; {runs} alternating rounds per system after one warm-up \
         each. Guest: the probe (`{}`), {GUEST_MIB} MiB, a 16 MiB qcow2 disk from the template, \
         one NIC on a bridge in a network namespace of the bench's own. Time runs from the \
         client's first command to the first ICMP echo reply from the VM's address. ferro: \
         `ferro vm create NAME --template probe --net auto --start`, `ferro vm show` (address), ping. QEMU: \
         the same done by hand — `qemu-img create -b` overlay, a tap on the bridge, \
         `qemu-system-x86_64 -M microvm,pcie=on` with the probe, its disk and NIC, ping. \
         {MANY} VMs: {MANY} clients at once, until the last answers.\n",
        probe_cmdline()
    );
    s.push_str("| metric | ferro median | QEMU by hand median | ratio | target | pass/fail |\n");
    s.push_str("| --- | --- | --- | --- | --- | --- |\n");
    let rows: [(&str, &[Vec<f64>; 2], &str, bool); 3] = [
        ("1 VM: create to service answering", &o.one_ms, "ms", false),
        (
            "20 VMs at once: create to the last answering",
            &o.many_ms,
            "ms",
            false,
        ),
        (
            "VMs started per second (20 at once)",
            &o.per_sec,
            "/s",
            true,
        ),
    ];
    for (label, v, unit, higher) in rows {
        let a = median(&v[FERRO]);
        let b = median(&v[QEMU]);
        let ratio = match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let (target, verdict) = match ratio {
            Some(r) if higher => ("≥ 1.00×", if r >= 1.0 { "pass" } else { "FAIL" }),
            Some(r) => ("≤ 1.00×", if r <= 1.0 { "pass" } else { "FAIL" }),
            None => ("—", "not measured"),
        };
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {} | {target} | {verdict} |",
            cell(a, unit),
            cell(b, unit),
            ratio.map(fmt_ratio).unwrap_or_else(|| "—".into())
        );
    }
    let _ = writeln!(
        s,
        "| daemon peak RSS (VmHWM, after {} VMs) | {} | — | — | — | info |",
        MANY + 1,
        cell(median(&o.daemon_hwm_mib), "MiB")
    );
    s.push_str("\nAll samples:\n\n| metric | system | runs | min | median | max |\n");
    s.push_str("| --- | --- | --- | --- | --- | --- |\n");
    for (label, v, unit) in [
        ("1 VM", &o.one_ms, "ms"),
        ("20 VMs", &o.many_ms, "ms"),
        ("VMs/s", &o.per_sec, "/s"),
    ] {
        for (sys, xs) in [("ferro", &v[FERRO]), ("QEMU by hand", &v[QEMU])] {
            let (lo, hi) = min_max(xs).map_or((None, None), |(a, b)| (Some(a), Some(b)));
            let _ = writeln!(
                s,
                "| {label} | {sys} | {} | {} | {} | {} |",
                xs.len(),
                cell(lo, unit),
                cell(median(xs), unit),
                cell(hi, unit)
            );
        }
    }
    if !o.notes.is_empty() {
        s.push('\n');
        for n in &o.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}
