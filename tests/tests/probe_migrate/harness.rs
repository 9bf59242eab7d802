//! The harness of probe_migrate.rs: the probe's count workload (its checksum recomputed on
//! the host), a VMM process with its console and stderr collected, control requests, and a
//! TCP proxy that stalls a migration stream.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use ferro_tests::count::*;
use ferro_tests::{probe, vmm, wait_limited};

pub fn scratch(test: &str) -> PathBuf {
    // Under target/ (CARGO_TARGET_TMPDIR), out of reach of anything that tidies /tmp.
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("probemig-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A VMM whose console lines are collected as they come.
pub struct Vmm {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    pub control: PathBuf,
    stderr: Arc<Mutex<String>>,
}

impl Vmm {
    pub fn spawn(cmd: &mut Command, control: PathBuf) -> Self {
        let mut child = cmd
            .arg("--control")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ferro-vmm");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = BufReader::new(child.stdout.take().unwrap());
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            child: Some(child),
            lines,
            control,
            stderr,
        }
    }

    /// A source running the probe with `cmdline`.
    pub fn source(dir: &Path, cmdline: &str, extra: &[&str]) -> Self {
        let mut cmd = Command::new(vmm());
        cmd.args(["--kernel", probe().to_str().unwrap(), "--cmdline", cmdline])
            .args(extra)
            // The destination compares its copy of the memory with the source's, page by
            // page hashes per 2 MiB, and refuses the VM if anything differs.
            .env("FERRO_MIGRATE_VERIFY", "1");
        Self::spawn(&mut cmd, dir.join("src.sock"))
    }

    /// A destination listening on a free port of 127.0.0.1, and that port.
    pub fn destination(dir: &Path) -> (Self, u16) {
        let mut cmd = Command::new(vmm());
        cmd.args(["--incoming", "tcp:127.0.0.1:0"]);
        Self::destination_from(&mut cmd, dir)
    }

    /// The destination `cmd` starts, and the port it listens on.
    pub fn destination_from(cmd: &mut Command, dir: &Path) -> (Self, u16) {
        let d = Self::spawn(cmd, dir.join("dst.sock"));
        let t = Instant::now();
        loop {
            let err = d.stderr();
            if let Some(first) = err.lines().next().filter(|_| err.contains('\n')) {
                let port = first
                    .strip_prefix("ferro-vmm: incoming listening on 127.0.0.1:")
                    .unwrap_or_else(|| panic!("first stderr line: {first:?}"))
                    .parse()
                    .unwrap();
                // The control socket is bound right after the line.
                while UnixStream::connect(&d.control).is_err() {
                    assert!(t.elapsed() < Duration::from_secs(10), "no control socket");
                    std::thread::sleep(Duration::from_millis(5));
                }
                return (d, port);
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no listening line");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (up to 30 s) for a console line starting with `prefix`.
    pub fn wait_line(&self, prefix: &str) {
        let t = Instant::now();
        while !self.lines().iter().any(|l| l.starts_with(prefix)) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no {prefix}: {:?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn wait_tick(&self, n: u64) {
        let t = Instant::now();
        while ticks(&self.lines()).last().is_none_or(|l| l.tick < n) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no tick {n}: {:?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends one request and returns the first `n` lines that come back.
    pub fn request_lines(&self, json: &str, n: usize) -> Vec<serde_json::Value> {
        let mut s = UnixStream::connect(&self.control).unwrap_or_else(|e| {
            panic!(
                "connect to {}: {e}\n{}\n{:?}",
                self.control.display(),
                self.stderr(),
                self.lines().iter().rev().take(8).collect::<Vec<_>>()
            )
        });
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(json.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        let mut r = BufReader::new(s);
        (0..n)
            .map_while(|_| {
                let mut line = String::new();
                r.read_line(&mut line).ok().filter(|&n| n > 0)?;
                Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")))
            })
            .collect()
    }

    pub fn request(&self, json: &str) -> serde_json::Value {
        let mut got = self.request_lines(json, 1);
        assert!(
            !got.is_empty(),
            "no answer to {json}: {}\n{:?}",
            self.stderr(),
            self.lines().iter().rev().take(8).collect::<Vec<_>>()
        );
        got.remove(0)
    }

    /// Waits for the process to end and returns its status.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let run = wait_limited(self.child.take().unwrap(), limit);
        // Give the readers a moment to take the last lines.
        std::thread::sleep(Duration::from_millis(50));
        run.code
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `migrate` and returns the answer and, when it succeeded, the exit event after it.
pub fn migrate(src: &Vmm, port: u16, extra: &str) -> Vec<serde_json::Value> {
    let mut s = UnixStream::connect(&src.control).expect("connect to the control socket");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    writeln!(s, r#"{{"cmd":"migrate","to":"127.0.0.1:{port}"{extra}}}"#).unwrap();
    let mut r = BufReader::new(s);
    let mut out = Vec::new();
    let mut line = String::new();
    while r.read_line(&mut line).is_ok_and(|n| n > 0) {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let last = v["result"] == "error" || v["event"].is_string();
        out.push(v);
        line.clear();
        if last {
            break;
        }
    }
    assert!(!out.is_empty(), "no answer to migrate: {}", src.stderr());
    out
}

/// A TCP proxy to 127.0.0.1:`to` that forwards at most `limit` bytes towards it, then holds
/// the connection until dropped.
pub struct Proxy {
    pub port: u16,
    stalled: std::sync::mpsc::Receiver<()>,
    streams: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    pub fn start(to: u16, limit: usize) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, stalled) = std::sync::mpsc::channel();
        let streams = Arc::new(Mutex::new(Vec::new()));
        let keep = streams.clone();
        std::thread::spawn(move || {
            let (mut from, _) = l.accept().unwrap();
            let mut dst = std::net::TcpStream::connect(("127.0.0.1", to)).unwrap();
            keep.lock()
                .unwrap()
                .extend([from.try_clone().unwrap(), dst.try_clone().unwrap()]);
            let (mut back_from, mut back_to) =
                (dst.try_clone().unwrap(), from.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut back_from, &mut back_to));
            let mut left = limit;
            let mut buf = vec![0u8; 64 * 1024];
            while left > 0 {
                let n = match from.read(&mut buf[..left.min(64 * 1024)]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if dst.write_all(&buf[..n]).is_err() {
                    break;
                }
                left -= n;
            }
            let _ = tx.send(());
        });
        Self {
            port,
            stalled,
            streams,
        }
    }

    /// Waits until the limit is reached.
    pub fn stalled(&self) {
        self.stalled
            .recv_timeout(Duration::from_secs(30))
            .expect("the proxy never reached its limit");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for s in self.streams.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}
