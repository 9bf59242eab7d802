//! `ferro vm migrate NAME --to http://HOST:PORT` between two daemons on this host, each on its
//! own data directory and TCP port (one token file for both): the probe guest's `count=`
//! workload moves from A to B and carries on there, on the same (shared) disk; a migration to
//! a daemon that is down, or that refuses, fails and leaves the VM running on A.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferro_tests::{ferro, kvm_available, probe, Run};
use serde_json::Value;

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferro-mig-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `ferro daemon` on its own data directory, listening on HOST:PORT with a token; in a
/// network namespace if given one (its CLI calls run there too).
struct Peer {
    dir: PathBuf,
    host: String,
    port: u16,
    token: PathBuf,
    ns: Option<String>,
    child: Option<Child>,
}

/// `cmd` as is, or run in network namespace `ns`.
fn command(ns: Option<&str>, program: &Path) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

impl Peer {
    fn start(dir: PathBuf, token: &Path) -> Self {
        Self::start_in(dir, token, None, "127.0.0.1", &[])
    }

    fn start_in(dir: PathBuf, token: &Path, ns: Option<&str>, host: &str, extra: &[&str]) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
        let child = command(ns, ferro())
            .args(["daemon", "--data-dir"])
            .arg(&dir)
            .arg("--listen")
            .arg(format!("tcp:{host}:{port}"))
            .arg("--token-file")
            .arg(token)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Self {
            dir,
            host: host.to_string(),
            port,
            token: token.to_path_buf(),
            ns: ns.map(str::to_string),
            child: Some(child),
        };
        let t = Instant::now();
        while p.ferro(&["info"]).code != Some(0) {
            assert!(t.elapsed() < Duration::from_secs(20), "no daemon on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    fn ferro(&self, args: &[&str]) -> Run {
        command(self.ns.as_deref(), ferro())
            .args(args)
            .env("FERRO_HOST", self.url())
            .env("FERRO_TOKEN_FILE", &self.token)
            .stdin(Stdio::null())
            .output()
            .unwrap()
            .into()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let r = self.ferro(&a);
        assert_eq!(r.code, Some(0), "ferro {args:?}: {}{}", r.stdout, r.stderr);
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
    }

    fn names(&self) -> Vec<String> {
        self.json(&["vm", "list"])
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn ticks(&self, vm: &str) -> Vec<u64> {
        self.ferro(&["vm", "log", vm])
            .stdout
            .lines()
            .filter_map(|l| l.trim().strip_prefix("count="))
            .filter_map(|rest| rest.split(' ').next()?.parse().ok())
            .collect()
    }

    fn wait_tick(&self, vm: &str, n: u64) -> u64 {
        let t = Instant::now();
        loop {
            if let Some(&last) = self.ticks(vm).last() {
                if last >= n {
                    return last;
                }
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no tick {n}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_state(&self, vm: &str, state: &str) -> Value {
        let t = Instant::now();
        loop {
            let v = self.json(&["vm", "show", vm]);
            if v["state"] == state {
                return v;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "not {state}: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Ok(list) = std::panic::catch_unwind(|| self.names()) {
                for name in list {
                    let _ = self.ferro(&["vm", "delete", &name, "--force"]);
                }
            }
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ready(test: &str) -> bool {
    if !kvm_available(test) {
        return false;
    }
    if Command::new("qemu-img").arg("--version").output().is_err() {
        println!("SKIPPED: no qemu-img ({test}; run scripts/deps.sh)");
        return false;
    }
    true
}

fn setup(test: &str) -> (PathBuf, PathBuf, PathBuf) {
    let w = scratch(test);
    let token = w.join("token");
    std::fs::write(&token, "peers-share-this\n").unwrap();
    let disk = w.join("shared.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("4M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    (w, token, disk)
}

fn create(p: &Peer, vm: &str, disk: &Path, cmdline: &str) {
    p.json(&[
        "vm",
        "create",
        vm,
        "--kernel",
        probe().to_str().unwrap(),
        "--memory",
        "64",
        "--cmdline",
        cmdline,
        "--disk",
        &format!("path={}", disk.display()),
    ]);
}

#[test]
fn migrate_a_counting_guest_from_one_daemon_to_another() {
    if !ready("migrate_a_counting_guest_from_one_daemon_to_another") {
        return;
    }
    let (w, token, disk) = setup("move");
    let a = Peer::start(w.join("a"), &token);
    let b = Peer::start(w.join("b"), &token);
    create(&a, "m", &disk, "blk=write blk_seed=5 exit=poweroff");
    a.json(&["vm", "start", "m"]);
    a.wait_state("m", "stopped");
    let counting = "count=600 blk=verify blk_seed=5 exit=poweroff";
    a.json(&["vm", "edit", "m", "--cmdline", counting]);
    a.json(&["vm", "start", "m"]);
    let before = a.wait_tick("m", 30);

    let t = Instant::now();
    let r = a.json(&[
        "vm",
        "migrate",
        "m",
        "--to",
        &b.url(),
        "--downtime-ms",
        "50",
    ]);
    let took = t.elapsed();
    assert_eq!(r["vm"], "m", "{r}");
    assert!(r["rounds"].as_u64().unwrap() >= 1, "{r}");
    assert!(r["bytes"].as_u64().unwrap() > 0, "{r}");
    println!(
        "migrated a 64 MiB probe between daemons: {} rounds, {} KiB, VMM {} ms, downtime {} ms, daemon operation {} ms, CLI {took:?}",
        r["rounds"],
        r["bytes"].as_u64().unwrap() >> 10,
        r["total_ms"],
        r["downtime_ms"],
        r["daemon_ms"]
    );

    // B has it, running; A does not; the disk stays where it was.
    assert!(!a.names().contains(&"m".to_string()), "{:?}", a.names());
    assert!(!a.dir.join("vms/m").exists());
    assert!(disk.exists());
    let v = b.json(&["vm", "show", "m"]);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["cmdline"], counting);
    let kinds: Vec<String> = b
        .json(&["vm", "events", "m"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(kinds.iter().any(|k| k == "migrated"), "{kinds:?}");

    // The counter goes on there from where it was, and the guest finds its disk.
    let first = b.wait_tick("m", before);
    assert!(first >= before);
    b.wait_state("m", "stopped");
    let log = b.ferro(&["vm", "log", "m"]).stdout;
    let on_b = b.ticks("m");
    assert!(on_b.first().is_some_and(|&f| f >= before), "{log}");
    assert!(log.contains("count_done=600"), "{log}");
    assert!(
        log.contains("blk_verify=ok"),
        "the migrated guest does not see its disk: {log}"
    );
    // B supervises it as its own: it starts again there.
    b.json(&[
        "vm",
        "edit",
        "m",
        "--cmdline",
        "blk=verify blk_seed=5 exit=poweroff",
    ]);
    b.json(&["vm", "start", "m"]);
    b.wait_state("m", "stopped");
    assert!(b
        .ferro(&["vm", "log", "m"])
        .stdout
        .contains("blk_verify=ok"));
    drop(b);
    drop(a);
    let _ = std::fs::remove_dir_all(&w);
}

#[test]
fn migration_that_cannot_happen_leaves_the_vm_running_on_the_source() {
    if !ready("migration_that_cannot_happen_leaves_the_vm_running_on_the_source") {
        return;
    }
    let (w, token, disk) = setup("fail");
    let a = Peer::start(w.join("a"), &token);
    create(&a, "m", &disk, "count=100000 smp=off exit=poweroff");
    let pid = a.json(&["vm", "start", "m"])["pid"].as_u64();
    a.wait_tick("m", 5);

    // Nobody listens there.
    let down = format!("http://127.0.0.1:{}", free_port());
    let r = a.ferro(&["vm", "migrate", "m", "--to", &down]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(
        r.stderr.contains("[peer_failed]") && r.stderr.contains("cannot reach"),
        "{}",
        r.stderr
    );
    let r = a.ferro(&["vm", "migrate", "m", "--to", "127.0.0.1:1"]);
    assert!(r.stderr.contains("[bad_request]"), "{}", r.stderr);

    // B has a VM of that name: it refuses, and keeps its own.
    let b = Peer::start(w.join("b"), &token);
    let other = w.join("other.qcow2");
    std::fs::copy(&disk, &other).unwrap();
    create(&b, "m", &other, "exit=halt");
    let r = a.ferro(&["vm", "migrate", "m", "--to", &b.url()]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("[peer_failed]") && r.stderr.contains("exists"),
        "{}",
        r.stderr
    );
    assert_eq!(b.json(&["vm", "show", "m"])["state"], "stopped");
    b.json(&["vm", "delete", "m"]);

    // Through all of it the VM ran on in its first VMM, and B keeps nothing.
    let v = a.json(&["vm", "show", "m"]);
    assert_eq!(v["state"], "running");
    assert_eq!(v["pid"].as_u64(), pid, "the VM was restarted");
    let at = a.wait_tick("m", 10);
    a.wait_tick("m", at + 3);
    assert!(b.names().is_empty(), "{:?}", b.names());
    assert!(!b.dir.join("vms/m").exists());
    drop(b);
    drop(a);
    let _ = std::fs::remove_dir_all(&w);
}

/// Two network namespaces joined by a veth pair (10.79.0.1/24 and 10.79.0.2/24); deleted on
/// drop.
struct TwoHosts {
    a: String,
    b: String,
}

impl TwoHosts {
    fn make(test: &str) -> Option<Self> {
        let id = std::process::id() % 100_000;
        let h = Self {
            a: format!("fvma{id}{test}"),
            b: format!("fvmb{id}{test}"),
        };
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        let (va, vb) = (format!("fvma{id}"), format!("fvmb{id}"));
        let ok = ip(&["netns", "add", &h.a])
            && ip(&["netns", "add", &h.b])
            && ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])
            && ip(&["link", "set", &va, "netns", &h.a])
            && ip(&["link", "set", &vb, "netns", &h.b]);
        if !ok {
            println!("SKIPPED: cannot make network namespaces and a veth pair (needs root and iproute2) ({test})");
            return None;
        }
        for (ns, dev, addr) in [(&h.a, &va, "10.79.0.1/24"), (&h.b, &vb, "10.79.0.2/24")] {
            assert!(ip(&["-n", ns, "link", "set", "lo", "up"]));
            assert!(ip(&["-n", ns, "addr", "add", addr, "dev", dev]));
            assert!(ip(&["-n", ns, "link", "set", dev, "up"]));
        }
        Some(h)
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn migrate_a_guest_with_a_nic_between_two_network_namespaces() {
    if !ready("migrate_a_guest_with_a_nic_between_two_network_namespaces") {
        return;
    }
    let Some(hosts) = TwoHosts::make("nic") else {
        return;
    };
    let (w, token, disk) = setup("nic");
    let bridge = ["--bridge", "fvmbr0", "--bridge-address", "10.80.0.1/24"];
    let a = Peer::start_in(w.join("a"), &token, Some(&hosts.a), "10.79.0.1", &bridge);
    let b = Peer::start_in(w.join("b"), &token, Some(&hosts.b), "10.79.0.2", &bridge);
    a.json(&[
        "vm",
        "create",
        "n",
        "--kernel",
        probe().to_str().unwrap(),
        "--memory",
        "64",
        "--cmdline",
        "count=300 net=on net_secs=20 exit=poweroff",
        "--disk",
        &format!("path={}", disk.display()),
        "--net",
        "auto",
    ]);
    let v = a.json(&["vm", "start", "n"]);
    let addr = v["nics"][0]["address"].as_str().unwrap().to_string();
    let ip = addr.split('/').next().unwrap().to_string();
    let before = a.wait_tick("n", 20);
    let r = a.json(&["vm", "migrate", "n", "--to", &b.url()]);
    println!(
        "migrated across namespaces (veth): {} rounds, {} KiB, VMM {} ms, downtime {} ms, daemon {} ms",
        r["rounds"],
        r["bytes"].as_u64().unwrap() >> 10,
        r["total_ms"],
        r["downtime_ms"],
        r["daemon_ms"]
    );
    assert!(a.names().is_empty());
    let on_b = b.json(&["vm", "show", "n"]);
    assert_eq!(on_b["state"], "running");
    // B records the NIC as the guest has it: same MAC, tap and address.
    assert_eq!(
        on_b["nics"][0]["address"], v["nics"][0]["address"],
        "{on_b}"
    );
    assert_eq!(on_b["nics"][0]["mac"], v["nics"][0]["mac"]);
    assert_eq!(on_b["nics"][0]["tap"], v["nics"][0]["tap"]);
    assert!(b.wait_tick("n", before) >= before);
    // After its count the guest answers ping with the address it had, now on B's bridge.
    let t = Instant::now();
    loop {
        let ok = Command::new("ip")
            .args(["netns", "exec", &hosts.b, "ping", "-c", "1", "-W", "1", &ip])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(25),
            "the migrated guest does not answer ping at {ip} on B: {}",
            b.ferro(&["vm", "log", "n"]).stdout
        );
    }
    drop(b);
    drop(a);
    drop(hosts);
    let _ = std::fs::remove_dir_all(&w);
}

#[test]
fn destination_vmm_dying_mid_migration_leaves_the_vm_on_the_source() {
    if !ready("destination_vmm_dying_mid_migration_leaves_the_vm_on_the_source") {
        return;
    }
    let (w, token, disk) = setup("midway");
    let a = Peer::start(w.join("a"), &token);
    let b = Peer::start(w.join("b"), &token);
    // A guest that dirties memory faster than a 1 ms downtime allows: pre-copy goes on.
    create(
        &a,
        "m",
        &disk,
        "beat=10000000 beat_us=1000 dirty_mibs=400 dirty_mib=128 beat_fill=on",
    );
    a.json(&["vm", "edit", "m", "--memory", "512"]);
    let pid = a.json(&["vm", "start", "m"])["pid"].as_u64();
    std::thread::sleep(Duration::from_millis(500));
    let cli = command(None, ferro())
        .args(["vm", "migrate", "m", "--to", &b.url()])
        .args(["--downtime-ms", "1", "--max-rounds", "100000"])
        .env("FERRO_HOST", a.url())
        .env("FERRO_TOKEN_FILE", &token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The destination's VMM is killed as soon as it exists.
    let t = Instant::now();
    let incoming = loop {
        let r = b.ferro(&["vm", "show", "m", "--json"]);
        if r.code == Some(0) {
            let v: Value = serde_json::from_str(&r.stdout).unwrap();
            if v["state"] == "incoming" && v["pid"].is_u64() {
                break v["pid"].as_u64().unwrap();
            }
        }
        assert!(t.elapsed() < Duration::from_secs(20), "B never had it");
        std::thread::sleep(Duration::from_millis(10));
    };
    // At once: the source's VMM is connecting or in its first copy round (a loaded host may
    // let the guest dirty too little to keep pre-copy going for long); either way its
    // migration fails.
    let killed = Command::new("kill")
        .args(["-9", &incoming.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out: Run = cli.wait_with_output().unwrap().into();
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("runs on here"), "{}", out.stderr);
    // A still runs it, in the same VMM; B forgot it.
    let v = a.json(&["vm", "show", "m"]);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["pid"].as_u64(), pid);
    let beat = |p: &Peer| -> u64 {
        let log = p.ferro(&["vm", "log", "m"]).stdout;
        log.lines()
            .filter_map(|l| l.trim().strip_prefix("hb="))
            .filter_map(|n| n.split(' ').next()?.parse().ok())
            .next_back()
            .unwrap_or(0)
    };
    let seen = beat(&a);
    let t = Instant::now();
    while beat(&a) <= seen {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the guest stands still"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    while !b.names().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", b.names());
        std::thread::sleep(Duration::from_millis(20));
    }
    let kinds: Vec<String> = a
        .json(&["vm", "events", "m"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(kinds.iter().any(|k| k == "migration_failed"), "{kinds:?}");
    drop(b);
    drop(a);
    let _ = std::fs::remove_dir_all(&w);
}

#[test]
fn source_daemon_killed_mid_migration_does_not_start_the_vm_twice() {
    if !ready("source_daemon_killed_mid_migration_does_not_start_the_vm_twice") {
        return;
    }
    let (w, token, disk) = setup("srckill");
    let mut a = Peer::start(w.join("a"), &token);
    let b = Peer::start(w.join("b"), &token);
    create(
        &a,
        "m",
        &disk,
        "beat=10000000 beat_us=1000 dirty_mibs=200 dirty_mib=128 beat_fill=on",
    );
    a.json(&["vm", "edit", "m", "--memory", "512", "--restart", "always"]);
    a.json(&["vm", "start", "m"]);
    std::thread::sleep(Duration::from_millis(500));
    let mut cli = command(None, ferro())
        .args(["vm", "migrate", "m", "--to", &b.url()])
        .args(["--downtime-ms", "1", "--max-rounds", "3"])
        .env("FERRO_HOST", a.url())
        .env("FERRO_TOKEN_FILE", &token)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Once A has B's answer and turns to its VMM (event `migrating`). Before that B's
    // half is only removed by B's own watchdog, after 2 minutes without data.
    let t = Instant::now();
    while !a
        .json(&["vm", "events", "m"])
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "migrating")
    {
        assert!(t.elapsed() < Duration::from_secs(20), "A never migrated it");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The source daemon dies while its VMM migrates; a new one comes up on the same data.
    let port = a.port;
    a.kill();
    let _ = cli.kill();
    let _ = cli.wait();
    let dir = a.dir.clone();
    let source_vmm = || {
        Command::new("pgrep")
            .args(["-f", &format!("{}/vms/m/control.sock", dir.display())])
            .status()
            .is_ok_and(|s| s.success())
    };
    let t = Instant::now();
    while source_vmm() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let moved = !source_vmm();
    let a = Peer::start_in(dir.clone(), &token, None, "127.0.0.1", &[]);
    assert_ne!(a.port, port);
    std::thread::sleep(Duration::from_millis(500));
    let v = a.json(&["vm", "show", "m"]);
    let kinds: Vec<String> = a
        .json(&["vm", "events", "m"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    if moved {
        // The migration completed without its daemon: A does not start the VM again...
        assert_eq!(v["state"], "stopped", "{v}");
        assert!(
            kinds
                .last()
                .is_some_and(|k| k == "lost" || k == "migrated_away"),
            "{kinds:?}"
        );
        // ... and B takes it over once it has waited for a confirmation that cannot come.
        let t = Instant::now();
        loop {
            let v = b.json(&["vm", "show", "m"]);
            if v["state"] == "running" {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(90), "{v}");
            std::thread::sleep(Duration::from_millis(500));
        }
    } else {
        // The VMM gave the migration up when its client went: A adopts it running, B
        // forgets its half.
        assert_eq!(v["state"], "running", "{v} {kinds:?}");
        let t = Instant::now();
        while !b.names().is_empty() {
            assert!(t.elapsed() < Duration::from_secs(30), "{:?}", b.names());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!(
        "source daemon killed mid-migration: the migration {}",
        if moved { "completed" } else { "was given up" }
    );
    a.ferro(&["vm", "delete", "m", "--force"]);
    drop(b);
    drop(a);
    let _ = std::fs::remove_dir_all(&w);
}

#[test]
fn storage_migration_moves_the_disk_and_kernel_to_a_daemon_that_has_neither() {
    if !ready("storage_migration_moves_the_disk_and_kernel_to_a_daemon_that_has_neither") {
        return;
    }
    let (w, token, _) = setup("storage");
    let a = Peer::start(w.join("a"), &token);
    let b = Peer::start(w.join("b"), &token);
    // Files only A has: a kernel of its own and a disk that a full clone puts in A's folder.
    let kernel = w.join("a-only").join("probe");
    std::fs::create_dir_all(kernel.parent().unwrap()).unwrap();
    std::fs::copy(probe(), &kernel).unwrap();
    let disk = w.join("a-only").join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    a.json(&[
        "vm",
        "create",
        "orig",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--cmdline",
        "blk=write blk_seed=9 blk_sectors=65536 exit=poweroff",
        "--disk",
        &format!("path={}", disk.display()),
    ]);
    a.json(&["vm", "start", "orig"]);
    a.wait_state("orig", "stopped");
    a.json(&["vm", "clone", "orig", "m"]);
    let own = a.dir.join("vms/m");
    let own_disks: Vec<PathBuf> = a.json(&["vm", "show", "m"])["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d["path"].as_str().unwrap()))
        .collect();
    assert!(
        own_disks.iter().all(|p| p.starts_with(&own)),
        "{own_disks:?}"
    );
    let counting = "count=600 blk=verify blk_seed=9 blk_sectors=65536 exit=poweroff";
    a.json(&["vm", "edit", "m", "--cmdline", counting]);
    a.json(&["vm", "start", "m"]);
    let before = a.wait_tick("m", 30);

    let r = a.json(&["vm", "migrate", "m", "--to", &b.url(), "--copy-storage"]);
    assert_eq!(r["vm"], "m", "{r}");
    println!(
        "storage migration of a 64 MiB probe with a 64 MiB disk between daemons: {} rounds, {} KiB, VMM {} ms, downtime {} ms, daemon operation {} ms",
        r["rounds"],
        r["bytes"].as_u64().unwrap() >> 10,
        r["total_ms"],
        r["downtime_ms"],
        r["daemon_ms"]
    );
    // A forgot it and deleted the disk it kept in its folder; the VM it was cloned from keeps
    // its own.
    assert!(!a.names().contains(&"m".to_string()));
    assert!(!own.exists(), "A kept {own:?}");
    assert!(disk.exists());
    // B runs it from B's own files.
    let v = b.json(&["vm", "show", "m"]);
    assert_eq!(v["state"], "running", "{v}");
    let b_own = b.dir.join("vms/m");
    assert!(
        !b_own.join("migration.token").exists(),
        "the one-time token outlived the migration"
    );
    assert_eq!(v["kernel"], b_own.join("kernel").to_str().unwrap(), "{v}");
    assert_eq!(
        v["disks"][0]["path"],
        b_own.join("disk0.raw").to_str().unwrap(),
        "{v}"
    );
    let first = b.wait_tick("m", before);
    assert!(first >= before);
    b.wait_state("m", "stopped");
    let log = b.ferro(&["vm", "log", "m"]).stdout;
    assert!(log.contains("count_done=600"), "{log}");
    assert!(log.contains("blk_verify=ok"), "the copied disk: {log}");
    // Without A's kernel or disk anywhere, B boots it again from its copies.
    std::fs::remove_file(&kernel).unwrap();
    b.json(&[
        "vm",
        "edit",
        "m",
        "--cmdline",
        "blk=verify blk_seed=9 blk_sectors=65536 exit=poweroff",
    ]);
    b.json(&["vm", "start", "m"]);
    b.wait_state("m", "stopped");
    assert!(b
        .ferro(&["vm", "log", "m"])
        .stdout
        .contains("blk_verify=ok"));
    drop(b);
    drop(a);
    let _ = std::fs::remove_dir_all(&w);
}
