//! `ferro-vmm --control PATH` and `--serial socket:PATH`: the VMM side of the daemon, on the
//! probe guest.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferro_tests::{kvm_available, probe, vmm, wait_limited};
use serde_json::Value;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferro-ctl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn start(dir: &Path, cmdline: &str, extra: &[&str]) -> Child {
    let con = format!("socket:{}", dir.join("console.sock").display());
    let ctl = dir.join("control.sock");
    let child = Command::new(vmm())
        .arg("--kernel")
        .arg(probe())
        .args(["--cmdline", cmdline, "--serial", &con, "--control"])
        .arg(&ctl)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferro-vmm");
    let t = Instant::now();
    while UnixStream::connect(&ctl).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

struct Ctl(BufReader<UnixStream>);

impl Ctl {
    fn open(dir: &Path) -> Self {
        let s = UnixStream::connect(dir.join("control.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Self(BufReader::new(s))
    }
    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.0.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"))
    }
    fn send(&mut self, raw: &str) -> Value {
        self.0.get_mut().write_all(raw.as_bytes()).unwrap();
        self.0.get_mut().write_all(b"\n").unwrap();
        self.line()
    }
    fn cmd(&mut self, cmd: &str) -> Value {
        self.send(&format!("{{\"cmd\":\"{cmd}\"}}"))
    }
}

/// A status request that may meet a VMM between two processes.
fn try_status(dir: &Path) -> Option<Value> {
    let s = UnixStream::connect(dir.join("control.sock")).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut r = BufReader::new(s);
    r.get_mut().write_all(b"{\"cmd\":\"status\"}\n").ok()?;
    let mut l = String::new();
    r.read_line(&mut l).ok()?;
    serde_json::from_str(&l).ok()
}

/// Reads the console socket until `needle` shows up.
fn console_until(dir: &Path, needle: &str) -> String {
    console_until_with(dir, needle, |t| t.contains(needle))
}

/// Reads the console socket until `done` holds (`what` names it in a failure).
fn console_until_with(dir: &Path, what: &str, done: impl Fn(&str) -> bool) -> String {
    let mut s = UnixStream::connect(dir.join("console.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let t = Instant::now();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !done(&text) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no {what:?} in {text}"
        );
        if let Ok(n) = s.read(&mut buf) {
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    text
}

#[test]
fn daemon_vmm_control_status_pause_resume_quit() {
    if !kvm_available("daemon_vmm_control_status_pause_resume_quit") {
        return;
    }
    let dir = scratch("basic");
    let child = start(&dir, "exit=halt", &["--cpus", "2", "--memory", "64"]);
    let pid = child.id();
    let mut c = Ctl::open(&dir);
    let s = c.cmd("status");
    assert_eq!(s["result"], "ok", "{s}");
    assert_eq!(s["status"]["state"], "running");
    assert_eq!(s["status"]["pid"], pid);
    assert_eq!(s["status"]["vcpus"], 2);
    assert_eq!(s["status"]["memory_mib"], 64);
    assert_eq!(c.cmd("pause")["status"]["state"], "paused");
    assert_eq!(c.cmd("status")["status"]["state"], "paused");
    assert_eq!(c.cmd("pause")["code"], "invalid_state");
    assert_eq!(c.cmd("resume")["status"]["state"], "running");
    assert_eq!(c.cmd("resume")["code"], "invalid_state");
    assert_eq!(c.cmd("warp")["code"], "unknown_command");
    assert_eq!(c.send("{nope")["code"], "bad_request");
    // The console replays the boot output to a client that connects late.
    let text = console_until(&dir, "probe=exit:halt");
    assert!(text.starts_with("probe=start"), "{text}");
    let log = c.cmd("console_log");
    assert!(
        log["console"].as_str().unwrap().contains("probe=done"),
        "{log}"
    );
    assert_eq!(c.cmd("quit")["result"], "ok");
    let ev = c.line();
    assert_eq!(ev["event"], "exit", "{ev}");
    assert_eq!(ev["reason"], "quit");
    let r = wait_limited(child, Duration::from_secs(10));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(!dir.join("control.sock").exists());
}

#[test]
fn daemon_vmm_control_poweroff_and_reboot_are_told_apart() {
    if !kvm_available("daemon_vmm_control_poweroff_and_reboot_are_told_apart") {
        return;
    }
    for (cmdline, reason) in [
        ("exit=poweroff input=1", "power_off"),
        ("exit=reboot input=1", "reboot"),
    ] {
        let dir = scratch(reason);
        // The probe waits for one byte of console input, so the test can connect first.
        let child = start(&dir, cmdline, &[]);
        let mut c = Ctl::open(&dir);
        assert_eq!(c.cmd("status")["result"], "ok");
        let mut con = UnixStream::connect(dir.join("console.sock")).unwrap();
        con.write_all(b"k").unwrap();
        let ev = c.line();
        assert_eq!(ev["event"], "exit", "{ev}");
        assert_eq!(ev["reason"], reason, "{ev}");
        let r = wait_limited(child, Duration::from_secs(10));
        assert_eq!(r.code, Some(0), "{}", r.stderr);
    }
}

#[test]
fn daemon_vmm_control_reboot_restarts_in_place() {
    if !kvm_available("daemon_vmm_control_reboot_restarts_in_place") {
        return;
    }
    let dir = scratch("restart");
    let child = start(&dir, "exit=halt", &["--on-reboot", "restart"]);
    let pid = child.id();
    console_until(&dir, "probe=exit:halt\n");
    let mut c = Ctl::open(&dir);
    assert_eq!(c.cmd("reset")["result"], "ok");
    assert_eq!(c.line()["event"], "restart");
    let t = Instant::now();
    let status = loop {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "VMM did not come back"
        );
        if let Some(s) = try_status(&dir) {
            if s["status"]["boots"] == 2 {
                break s;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status["status"]["pid"], pid, "same process");
    // The ring survives the restart: two boots' worth of output.
    console_until_with(&dir, "two boots", |t| t.matches("probe=start").count() >= 2);
    Ctl::open(&dir).cmd("quit");
    let r = wait_limited(child, Duration::from_secs(10));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}
