//! The daemon's networking end to end: a real daemon in a network namespace this test makes
//! (so its bridge and taps never touch the host's interfaces; the namespace is deleted at the
//! end), real VMMs, the probe guest answering ARP and ping on its virtio-net NIC.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferro_tests::{ferro, kvm_available, probe, Run};
use serde_json::Value;

/// A network namespace and a daemon inside it; both go on drop.
struct NetDaemon {
    ns: String,
    dir: PathBuf,
    child: Option<Child>,
}

const BRIDGE: &str = "fvtbr0";

impl NetDaemon {
    fn start(test: &str) -> Option<Self> {
        let ns = format!("fvt{}{test}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            println!(
                "SKIPPED: cannot create a network namespace (needs root and iproute2) ({test})"
            );
            return None;
        }
        let dir = std::env::temp_dir().join(format!("ferro-net-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("data dir");
        let mut d = Self {
            ns,
            dir,
            child: None,
        };
        d.in_ns(&["ip", "link", "set", "lo", "up"]);
        d.spawn();
        Some(d)
    }

    /// Starts the daemon in the namespace (killing a running one first: its VMMs stay).
    fn spawn(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.dir.join("ferro.sock"));
        let log = std::fs::File::create(self.dir.join("daemon.log")).expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(ferro())
            .args(["daemon", "--data-dir"])
            .arg(&self.dir)
            .args(["--bridge", BRIDGE, "--bridge-address", "10.78.0.1/24"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the daemon");
        self.child = Some(child);
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(self.dir.join("ferro.sock")).is_err() {
            assert!(t.elapsed() < Duration::from_secs(20), "no daemon");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn in_ns(&self, args: &[&str]) -> Run {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .output()
            .expect("ip netns exec")
            .into()
    }

    fn ferro(&self, args: &[&str]) -> Run {
        Command::new(ferro())
            .args(args)
            .env(
                "FERRO_HOST",
                format!("unix:{}", self.dir.join("ferro.sock").display()),
            )
            .stdin(Stdio::null())
            .output()
            .expect("ferro")
            .into()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let r = self.ferro(&a);
        assert_eq!(r.code, Some(0), "ferro {args:?}: {}{}", r.stdout, r.stderr);
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
    }

    /// The interfaces of the namespace.
    fn links(&self) -> String {
        self.in_ns(&["ip", "-br", "link"]).stdout
    }
}

impl Drop for NetDaemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Ok(list) = std::panic::catch_unwind(|| self.json(&["vm", "list"])) {
                for vm in list.as_array().into_iter().flatten() {
                    if let Some(name) = vm["name"].as_str() {
                        let _ = self.ferro(&["vm", "delete", name, "--force"]);
                    }
                }
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nic(v: &Value, i: usize) -> &Value {
    &v["nics"][i]
}

#[test]
fn daemon_network_bridge_tap_ping_and_unique_addresses() {
    if !kvm_available("daemon_network_bridge_tap_ping_and_unique_addresses") {
        return;
    }
    let Some(mut d) = NetDaemon::start("ping") else {
        return;
    };
    let p = probe().to_str().unwrap().to_string();
    let create = |d: &NetDaemon, name: &str, net: &str| {
        d.ferro(&[
            "vm",
            "create",
            name,
            "--kernel",
            &p,
            "--cmdline",
            "net=on net_secs=60 exit=halt",
            "--memory",
            "64",
            "--net",
            net,
            "--json",
        ])
    };
    let r = create(&d, "a", "auto");
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let a: Value = serde_json::from_str(&r.stdout).unwrap();
    let r = create(&d, "b", "auto");
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let b: Value = serde_json::from_str(&r.stdout).unwrap();
    let (a0, b0) = (nic(&a, 0), nic(&b, 0));
    assert_eq!(a0["address"], "10.78.0.2/24", "{a}");
    assert_eq!(b0["address"], "10.78.0.3/24", "{b}");
    assert_ne!(a0["mac"], b0["mac"]);
    assert_ne!(a0["tap"], b0["tap"]);
    assert_eq!(a0["bridge"], BRIDGE);
    // The stored NIC carries its MAC; a second VM may not take it.
    assert_eq!(a["nets"][0]["mac"], a0["mac"]);
    let taken = format!("auto,mac={}", a0["mac"].as_str().unwrap());
    let r = create(&d, "c", &taken);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("[conflict]"), "{}", r.stderr);
    let r = d.ferro(&["vm", "show", "c"]);
    assert!(
        r.stderr.contains("[not_found]"),
        "a refused create stored a VM: {}",
        r.stdout
    );
    // No bridge until a VM with a NIC starts.
    assert!(!d.links().contains(BRIDGE), "{}", d.links());

    let v = d.json(&["vm", "start", "a"]);
    assert_eq!(v["state"], "running");
    let tap = a0["tap"].as_str().unwrap().to_string();
    let t = Instant::now();
    loop {
        let log = d.ferro(&["vm", "log", "a"]).stdout;
        if log.contains("net_ready=") {
            assert!(
                log.contains("net_ip=10.78.0.2") && log.contains("ferro.ip=10.78.0.2/24"),
                "the address is not on the command line:\n{log}"
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no net_ready:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let master = d
        .in_ns(&["ip", "-br", "link", "show", "master", BRIDGE])
        .stdout;
    assert!(
        master.contains(&tap),
        "tap {tap} is not on {BRIDGE}: {master}"
    );
    let human = d.ferro(&["vm", "show", "a"]).stdout;
    assert!(human.contains("address 10.78.0.2/24"), "{human}");
    let table = d.ferro(&["vm", "list"]).stdout;
    assert!(
        table.contains("ADDRESS") && table.contains("10.78.0.2/24"),
        "{table}"
    );
    let ping = d.in_ns(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.78.0.2"]);
    assert_eq!(
        ping.code,
        Some(0),
        "ping failed:\n{}{}",
        ping.stdout,
        ping.stderr
    );
    assert!(ping.stdout.contains("3 received"), "{}", ping.stdout);
    println!(
        "ping: {}",
        ping.stdout.lines().last().unwrap_or_default().trim()
    );

    // A restarted daemon re-adopts the VM: same NIC, still answering, and it still removes
    // the tap when the VM stops.
    d.spawn();
    let v = d.json(&["vm", "show", "a"]);
    assert_eq!((v["state"].as_str(), nic(&v, 0)), (Some("running"), a0));
    let ping = d.in_ns(&["ping", "-c", "1", "-W", "2", "10.78.0.2"]);
    assert_eq!(
        ping.code,
        Some(0),
        "no answer after the daemon restart: {}",
        ping.stdout
    );
    let v = d.json(&["vm", "stop", "a", "--force"]);
    assert_eq!(v["state"], "stopped");
    let t = Instant::now();
    while d.links().contains(&tap) {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "tap {tap} left behind: {}",
            d.links()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // It starts again on the same tap and address.
    d.json(&["vm", "start", "a"]);
    let again = d.json(&["vm", "show", "a"]);
    assert_eq!(nic(&again, 0), a0);
    d.json(&["vm", "stop", "a", "--force"]);

    // A deleted VM's address goes back to the pool; a removed NIC's too.
    assert_eq!(d.ferro(&["vm", "delete", "b"]).code, Some(0));
    let r = create(&d, "c", "auto");
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let c: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(nic(&c, 0)["address"], "10.78.0.3/24");
    assert_ne!(nic(&c, 0)["mac"], b0["mac"].clone(), "a fresh MAC");
    // A clone gets its own MAC and address.
    let c2 = d.json(&["vm", "clone", "c", "c2"]);
    assert_ne!(nic(&c2, 0)["mac"], nic(&c, 0)["mac"]);
    assert_eq!(nic(&c2, 0)["address"], "10.78.0.4/24", "{c2}");
    assert_eq!(d.ferro(&["vm", "delete", "c2"]).code, Some(0));
    let v = d.json(&["vm", "edit", "a", "--remove-net", "0", "--add-net", "auto"]);
    assert_eq!(v["nics"].as_array().unwrap().len(), 1);
    assert_ne!(nic(&v, 0)["mac"], a0["mac"]);
    assert_eq!(
        nic(&v, 0)["address"],
        "10.78.0.2/24",
        "lowest free address: {v}"
    );
    let macs: Vec<Value> = d
        .json(&["vm", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| nic(v, 0)["mac"].clone())
        .collect();
    assert_eq!(macs.len(), 2);
    assert_ne!(macs[0], macs[1]);
}
