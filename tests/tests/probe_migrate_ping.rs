//! A ping stream through a live migration between two "hosts" on /dev/kvm: network namespaces
//! A and B, each with a bridge joined by a veth to a bridge in the test's own namespace (the
//! client). The probe (`net=on`: it answers ARP and ICMP echo from guest user mode) runs under
//! a source ferro-vmm in A on a tap of A's bridge; a destination `ferro-vmm --incoming` waits
//! in B; the client pings the guest every 10 ms while the VM moves from A to B. Every ping must
//! be answered except those that fall in the downtime the source reports (plus a few for the
//! moment the bridges learn the guest's new port from the destination's RARP announce), and
//! the guest must answer from B afterwards.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferro_tests::{kvm_available, probe, vmm};

#[allow(dead_code)] // the harness serves probe_migrate.rs too
#[path = "probe_migrate/harness.rs"]
mod harness;

use harness::{scratch, Vmm};

/// Runs `ip ARGS`, returning whether it succeeded.
fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The two namespaces, the client's bridge and the veths; all gone when dropped.
struct Hosts {
    a: String,
    b: String,
    bridge: String,
}

impl Hosts {
    fn make() -> Option<Self> {
        let id = std::process::id() % 100_000;
        let h = Hosts {
            a: format!("fpa{id}"),
            b: format!("fpb{id}"),
            bridge: format!("fpbr{id}"),
        };
        let mut ok = ip(&["link", "add", &h.bridge, "type", "bridge"])
            && ip(&["addr", "add", "169.254.61.254/24", "dev", &h.bridge])
            && ip(&["link", "set", &h.bridge, "up"]);
        for (ns, n) in [(&h.a, 252), (&h.b, 253)] {
            let (outer, inner) = (format!("{ns}o"), format!("{ns}i"));
            let addr = format!("169.254.61.{n}/24");
            ok = ok
                && ip(&["netns", "add", ns])
                && ip(&[
                    "link", "add", &outer, "type", "veth", "peer", "name", &inner,
                ])
                && ip(&["link", "set", &outer, "master", &h.bridge])
                && ip(&["link", "set", &outer, "up"])
                && ip(&["link", "set", &inner, "netns", ns])
                && ip(&["-n", ns, "link", "set", "lo", "up"])
                && ip(&["-n", ns, "link", "add", "br0", "type", "bridge"])
                && ip(&["-n", ns, "link", "set", &inner, "master", "br0"])
                && ip(&["-n", ns, "link", "set", &inner, "up"])
                && ip(&["-n", ns, "addr", "add", &addr, "dev", "br0"])
                && ip(&["-n", ns, "link", "set", "br0", "up"]);
        }
        if ok {
            Some(h)
        } else {
            println!("SKIPPED: cannot make network namespaces, veths and bridges (needs root and iproute2)");
            None
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// `ferro-vmm ARGS` in network namespace `ns`.
fn vmm_in(ns: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(vmm());
    c
}

/// The port on the destination's `incoming listening on HOST:PORT` line.
fn listening_port(dst: &Vmm) -> u16 {
    let t = Instant::now();
    loop {
        let err = dst.stderr();
        if let Some(l) = err.lines().find(|l| l.contains("incoming listening on")) {
            if err.contains('\n') {
                let port = l.rsplit(':').next().and_then(|p| p.trim().parse().ok());
                return port.unwrap_or_else(|| panic!("no port in {l:?}"));
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no listening line: {err}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `(transmitted, received)` from ping's summary line.
fn ping_counts(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {out}"));
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

#[test]
fn a_ping_stream_loses_no_more_than_the_downtime() {
    if !kvm_available("a_ping_stream_loses_no_more_than_the_downtime") {
        return;
    }
    let Some(hosts) = Hosts::make() else {
        return;
    };
    let dir = scratch("ping");
    let guest = "169.254.61.2";
    let mut src = Vmm::spawn(
        vmm_in(&hosts.a).args([
            "--kernel",
            probe().to_str().unwrap(),
            "--cmdline",
            &format!("net=on net_ip={guest} net_secs=120"),
            "--memory",
            "128",
            "--net",
            "tap=fpt0,mac=52:54:fe:61:00:02,bridge=br0",
        ]),
        dir.join("src.sock"),
    );
    let mut dst = Vmm::spawn(
        vmm_in(&hosts.b).args(["--incoming", "tcp:169.254.61.253:0"]),
        dir.join("dst.sock"),
    );
    let port = listening_port(&dst);
    let t = Instant::now();
    while !src.lines().iter().any(|l| l.starts_with("net_ready=")) {
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", src.lines());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        Command::new("ping")
            .args(["-c", "3", "-W", "1", guest])
            .output()
            .is_ok_and(|o| o.status.success()),
        "the guest does not answer before the migration"
    );

    // 4 s of pings every 10 ms, the migration starting 1 s in.
    let pinger = Command::new("ping")
        .args(["-i", "0.01", "-c", "400", "-W", "1", guest])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ping");
    std::thread::sleep(Duration::from_secs(1));
    let answer = src.request_lines(
        &format!(r#"{{"cmd":"migrate","to":"169.254.61.253:{port}"}}"#),
        2,
    );
    let r = &answer[0];
    assert_eq!(r["result"], "ok", "{r}\n{}", src.stderr());
    let downtime = r["status"]["migration"]["downtime_ms"].as_u64().unwrap();
    let out = pinger.wait_with_output().expect("ping output");
    let text = String::from_utf8_lossy(&out.stdout);
    let (sent, got) = ping_counts(&text);
    let lost = sent - got;
    // One ping per 10 ms falls in the downtime; a few more for the switch of the bridges.
    let allowed = downtime / 10 + 5;
    println!(
        "ping stream through the migration: {sent} sent, {lost} lost, downtime {downtime} ms, \
         {} rounds, {} KiB",
        r["status"]["migration"]["rounds"],
        r["status"]["migration"]["bytes"].as_u64().unwrap_or(0) >> 10
    );
    assert!(
        lost <= allowed,
        "{lost} of {sent} pings lost, at most {allowed} allowed for {downtime} ms of downtime:\n{text}\n{}\n{}",
        src.stderr(),
        dst.stderr()
    );
    assert_eq!(
        src.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        src.stderr()
    );
    // The guest answers from B now (its source process is gone).
    assert!(
        Command::new("ping")
            .args(["-c", "3", "-W", "1", guest])
            .output()
            .is_ok_and(|o| o.status.success()),
        "the guest does not answer after the migration: {}",
        dst.stderr()
    );
    dst.kill();
    drop(hosts);
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}
