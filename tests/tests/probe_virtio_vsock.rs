//! virtio-vsock with the probe guest on /dev/kvm and the host side on unix sockets
//! (Firecracker's scheme): a host program connects to the `uds` socket, writes
//! `CONNECT <port>\n`, reads `OK <hostport>\n` and talks to the probe's echo listener; the
//! probe connects to the host (CID 2), reaching a listener on `uds_<port>`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use ferro_tests::{kvm_available, probe, vmm, wait_limited, Run};

/// A scratch directory removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("ferro-vsock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts the probe with `cmdline` and a vsock device on `uds`; stdout lines arrive on the
/// receiver as they are printed (and are collected again at the end).
fn start(cmdline: &str, uds: &std::path::Path) -> (Child, Receiver<String>) {
    let p = probe().to_str().unwrap().to_string();
    let mut child = Command::new(vmm())
        .args(["--kernel", &p, "--memory", "256", "--cmdline", cmdline])
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferro-vmm");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits (at most 20 s) for a line starting with `prefix`; every line read is kept in `seen`.
fn wait_line(rx: &Receiver<String>, prefix: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) => {
                seen.push(l.clone());
                if l.starts_with(prefix) {
                    return l;
                }
            }
            Err(_) => break,
        }
    }
    panic!("no {prefix} line: {seen:#?}");
}

/// Collects the rest of the run; `seen` lines come first in its stdout.
fn finish(child: Child, rx: Receiver<String>, mut seen: Vec<String>) -> Run {
    let mut r = wait_limited(child, Duration::from_secs(60));
    seen.extend(rx.iter());
    r.stdout = seen.join("\n");
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    r
}

#[test]
fn host_connects_to_the_guest_and_gets_its_echo() {
    if !kvm_available("host_connects_to_the_guest_and_gets_its_echo") {
        return;
    }
    let dir = Dir::new("echo");
    let uds = dir.0.join("v.sock");
    let (child, rx) = start("vsock=echo vsock_port=1234 vsock_secs=30", &uds);
    let mut seen = Vec::new();
    wait_line(&rx, "vsock_listen=1234", &mut seen);

    // A port nobody listens on: the guest refuses, the host client sees EOF and no OK.
    let mut bad = UnixStream::connect(&uds).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    bad.write_all(b"CONNECT 999\n").unwrap();
    let mut got = String::new();
    assert_eq!(bad.read_to_string(&mut got).unwrap(), 0, "refused: {got}");

    let mut c = UnixStream::connect(&uds).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"CONNECT 1234\n").unwrap();
    let mut reader = BufReader::new(c.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "{ok:?}");
    let host_port: u32 = ok[3..].trim().parse().unwrap();
    // More than the probe's 64 KiB buffer: the echo needs credit updates both ways.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let writer = {
        let mut c = c.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || c.write_all(&data))
    };
    let mut back = vec![0u8; data.len()];
    reader.read_exact(&mut back).unwrap();
    writer.join().unwrap().unwrap();
    assert!(back == data, "the echo differs");
    drop(reader);
    drop(c);

    let r = finish(child, rx, seen);
    assert_eq!(r.value("vsock_cid"), "3");
    assert_eq!(r.value("vsock_accept"), format!("2:{host_port}"));
    let v = r.value("vsock");
    assert!(v.starts_with("ok "), "{v}");
    assert!(v.contains("vsock_rx_bytes=200000"), "{v}");
    let irqs: u64 = r.value("vsock_irqs").parse().unwrap();
    assert!(irqs > 0);
}

#[test]
fn guest_connects_to_a_host_listener() {
    if !kvm_available("guest_connects_to_a_host_listener") {
        return;
    }
    let dir = Dir::new("connect");
    let uds = dir.0.join("v.sock");
    let mut path = uds.clone().into_os_string();
    path.push("_5000");
    let l = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        let msg = buf[..n].to_vec();
        s.write_all(b"re:").unwrap();
        s.write_all(&msg).unwrap();
        // The probe shuts the connection down: EOF here.
        let end = s.read(&mut buf).unwrap();
        (msg, end)
    });
    let (child, rx) = start(
        "vsock=connect vsock_port=5000 vsock_msg=from-the-guest",
        &uds,
    );
    let r = finish(child, rx, Vec::new());
    let (msg, end) = server.join().unwrap();
    assert_eq!(msg, b"from-the-guest");
    assert_eq!(end, 0);
    assert_eq!(r.value("vsock_reply"), "re:from-the-guest");
    assert!(r.value("vsock").starts_with("ok "), "{}", r.stdout);
}

#[test]
fn guest_connect_without_a_host_listener_is_refused() {
    if !kvm_available("guest_connect_without_a_host_listener_is_refused") {
        return;
    }
    let dir = Dir::new("refused");
    let uds = dir.0.join("v.sock");
    let (child, rx) = start("vsock=connect vsock_port=5001 vsock_secs=5", &uds);
    let r = finish(child, rx, Vec::new());
    assert!(r.value("vsock").starts_with("refused"), "{}", r.stdout);
}
