//! virtio-net on a real tap, with the probe guest on /dev/kvm: each test makes its own network
//! namespace (`ferro-t<pid>-<n>`), runs `ferro-vmm` inside it with `ip netns exec`, addresses
//! the host side with a 169.254.0.0/16 address, and pings the probe (`net=on` answers ARP and
//! ICMP echo). The namespace is deleted when the test ends, pass or fail. Nothing outside the
//! namespace is touched.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ferro_tests::{kvm_available, probe, vmm, wait_limited, Run};

/// A network namespace that is deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "ferro-t{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name]);
        let ns = Self(name);
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `cmd` inside the namespace; panics when it fails.
    fn run(&self, cmd: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.0];
        full.extend_from_slice(cmd);
        sh(&full);
    }

    /// `ping -c COUNT` from inside the namespace; the output and whether every reply came.
    fn ping(&self, ip: &str, count: u32) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "ping", "-c", &count.to_string()])
            .args(["-W", "2", "-i", "0.3", ip])
            .output()
            .expect("run ping");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success(), text)
    }

    /// Starts `ferro-vmm ARGS` inside the namespace.
    fn spawn_vmm(&self, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .arg(vmm())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ferro-vmm")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn sh(cmd: &[&str]) {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this host can run these tests; prints the one SKIPPED line when not.
fn net_available(test: &str) -> bool {
    if !kvm_available(test) {
        return false;
    }
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED: not root: network namespaces and taps need it ({test})");
        return false;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        println!("SKIPPED: no /dev/net/tun ({test})");
        return false;
    }
    true
}

/// A tap `name` in `ns` with `addr` (CIDR) on the host side, up.
fn tap_with_addr(ns: &Netns, name: &str, addr: &str) {
    ns.run(&["ip", "tuntap", "add", name, "mode", "tap"]);
    ns.run(&["ip", "addr", "add", addr, "dev", name]);
    ns.run(&["ip", "link", "set", name, "up"]);
}

fn probe_path() -> String {
    probe().to_str().expect("utf-8 path").to_string()
}

/// Pings `ip` from `ns` until 3 of 3 replies come back (the guest needs a moment to boot),
/// for at most 20 s.
fn ping_until_ok(ns: &Netns, ip: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, text) = ns.ping(ip, 3);
        // ping succeeds on one reply; the guest must answer every one.
        if ok && text.contains("3 received") {
            return text;
        }
        assert!(Instant::now() < deadline, "no answer from {ip}: {text}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn finish(child: Child) -> Run {
    let r = wait_limited(child, Duration::from_secs(60));
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    r
}

#[test]
fn host_pings_the_probe_on_an_existing_tap() {
    if !net_available("host_pings_the_probe_on_an_existing_tap") {
        return;
    }
    let ns = Netns::new();
    tap_with_addr(&ns, "ftap0", "169.254.10.1/16");
    let p = probe_path();
    let child = ns.spawn_vmm(&[
        "--kernel",
        &p,
        "--memory",
        "256",
        "--cmdline",
        "net=on net_ip=169.254.10.2 net_secs=30 net_frames=8",
        "--net",
        "tap=ftap0,mac=52:54:00:aa:bb:01",
    ]);
    let text = ping_until_ok(&ns, "169.254.10.2");
    assert!(text.contains("3 received"), "{text}");
    // Answers up to net_frames end the probe early; more pings make sure it gets there.
    let _ = ns.ping("169.254.10.2", 6);
    let r = finish(child);
    let line = r.value("net_mac");
    assert!(line.starts_with("52:54:00:aa:bb:01 "), "{line}");
    let icmp: u32 = line
        .split("net_icmp=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(icmp >= 3, "{line}");
    assert!(
        r.stderr
            .contains("ferro-vmm: net0 tap=ftap0 mac=52:54:00:aa:bb:01"),
        "{}",
        r.stderr
    );
    let irqs: u32 = r.value("net_irqs").parse().unwrap();
    assert!(irqs > 0, "MSI-X interrupts for the probe's queues");
}

/// Reads stderr lines until one names the NIC's tap; returns the name and the lines read.
fn reported_tap(child: &mut Child) -> (String, Vec<String>, BufReader<std::process::ChildStderr>) {
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
    let mut seen = Vec::new();
    loop {
        let mut l = String::new();
        if err.read_line(&mut l).unwrap_or(0) == 0 {
            panic!("ferro-vmm ended without naming its tap: {seen:?}");
        }
        if let Some(rest) = l.trim().strip_prefix("ferro-vmm: net0 tap=") {
            let name = rest.split_whitespace().next().unwrap_or("").to_string();
            seen.push(l);
            return (name, seen, err);
        }
        seen.push(l);
    }
}

#[test]
fn created_tap_on_a_bridge_reaches_the_probe() {
    if !net_available("created_tap_on_a_bridge_reaches_the_probe") {
        return;
    }
    let ns = Netns::new();
    ns.run(&["ip", "link", "add", "fbr0", "type", "bridge"]);
    ns.run(&["ip", "addr", "add", "169.254.20.1/16", "dev", "fbr0"]);
    ns.run(&["ip", "link", "set", "fbr0", "up"]);
    let p = probe_path();
    let mut child = ns.spawn_vmm(&[
        "--kernel",
        &p,
        "--memory",
        "256",
        "--cmdline",
        "net=on net_ip=169.254.20.2 net_secs=30 net_frames=8",
        "--net",
        "auto,bridge=fbr0",
    ]);
    let (tap, _, mut err) = reported_tap(&mut child);
    assert!(tap.starts_with("ferro"), "{tap}");
    // The bridge holds the tap the VMM created, and it is up.
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "ip", "-o", "link", "show", &tap])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        link.contains("master fbr0") && link.contains(",UP"),
        "{link}"
    );
    let text = ping_until_ok(&ns, "169.254.20.2");
    assert!(text.contains("3 received"), "{text}");
    let _ = ns.ping("169.254.20.2", 6);
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut err, &mut rest);
    let r = wait_limited(child, Duration::from_secs(60));
    assert_eq!(r.code, Some(0), "{}\n{rest}\n{}", r.stdout, r.stderr);
    assert!(r.value("net_mac").contains("net_icmp="), "{}", r.stdout);
    // The created tap is gone with the VMM.
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "ip", "link", "show", &tap])
        .output()
        .unwrap();
    assert!(!out.status.success(), "tap {tap} outlived the VMM");
}

#[test]
fn second_nic_answers_on_its_own_tap() {
    if !net_available("second_nic_answers_on_its_own_tap") {
        return;
    }
    let ns = Netns::new();
    tap_with_addr(&ns, "ftap0", "169.254.30.1/24");
    tap_with_addr(&ns, "ftap1", "169.254.31.1/24");
    let p = probe_path();
    let child = ns.spawn_vmm(&[
        "--kernel",
        &p,
        "--memory",
        "256",
        "--cmdline",
        "net=on net_dev=1 net_ip=169.254.31.2 net_secs=30 net_frames=8",
        "--net",
        "tap=ftap0",
        "--net",
        "tap=ftap1",
    ]);
    let text = ping_until_ok(&ns, "169.254.31.2");
    assert!(text.contains("3 received"), "{text}");
    let _ = ns.ping("169.254.31.2", 6);
    let r = finish(child);
    let pci = &r.report()["pci"];
    assert_eq!(
        pci.iter().filter(|l| l.contains("1af4:1041")).count(),
        2,
        "{pci:?}"
    );
    // Generated MACs differ per NIC.
    let macs: Vec<&str> = r
        .stderr
        .lines()
        .filter_map(|l| l.split("mac=").nth(1))
        .collect();
    assert_eq!(macs.len(), 2, "{}", r.stderr);
    assert_ne!(macs[0], macs[1]);
    assert!(r.value("net_mac").starts_with(macs[1]), "{}", r.stdout);
}

#[test]
fn missing_bridge_is_an_error() {
    if !net_available("missing_bridge_is_an_error") {
        return;
    }
    let ns = Netns::new();
    let p = probe_path();
    let child = ns.spawn_vmm(&["--kernel", &p, "--net", "auto,bridge=nosuchbr0"]);
    let r = wait_limited(child, Duration::from_secs(30));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("net0"), "{}", r.stderr);
}
