//! Helpers for Ferrovisor's end-to-end tests: build the VMM and the guests once, run
//! `ferro-vmm` on real KVM, and read the probe guest's `key=value` report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_path_buf()
}

/// Whether this host has /dev/kvm. When it does not, prints the one line that says the test was
/// skipped, so a missing KVM never looks like a pass.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        println!("SKIPPED: no /dev/kvm ({test})");
        false
    }
}

fn run_checked(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The release `ferro-vmm` binary, built once per test process.
pub fn vmm() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        run_checked(
            Command::new(env!("CARGO"))
                .args(["build", "--release", "-q", "-p", "ferro-vmm"])
                .current_dir(repo()),
            "cargo build -p ferro-vmm",
        );
        repo().join("target/release/ferro-vmm")
    })
}

/// The probe guest kernel, built once per test process.
pub fn probe() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        run_checked(
            Command::new("bash")
                .arg(repo().join("guest/probe/build-probe.sh"))
                .current_dir(repo()),
            "guest/probe/build-probe.sh",
        );
        repo().join("guest/probe/target/release/probe")
    })
}

/// What a VMM run produced.
#[derive(Debug)]
pub struct Run {
    /// Exit status (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Serial console (stdout).
    pub stdout: String,
    /// Diagnostics.
    pub stderr: String,
}

impl Run {
    /// The probe's `key=value` lines; repeated keys keep every value.
    pub fn report(&self) -> BTreeMap<String, Vec<String>> {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in self.stdout.lines() {
            let line = line.trim_end_matches('\r');
            if let Some((k, v)) = line.split_once('=') {
                if !k.contains(' ') && !k.is_empty() {
                    map.entry(k.to_string()).or_default().push(v.to_string());
                }
            }
        }
        map
    }

    /// The single value of `key`, or a test failure that shows the console.
    pub fn value(&self, key: &str) -> String {
        match self.report().get(key).and_then(|v| v.last()) {
            Some(v) => v.clone(),
            None => panic!("no {key}= in the output:\n{}\n{}", self.stdout, self.stderr),
        }
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Self {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs `ferro-vmm ARGS` with stdin closed and a time limit, and collects its output.
pub fn run_vmm(args: &[&str], limit: Duration) -> Run {
    let child = Command::new(vmm())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferro-vmm");
    wait_limited(child, limit)
}

/// Waits for `child` at most `limit`, killing it past that (the test then fails on its status).
pub fn wait_limited(child: std::process::Child, limit: Duration) -> Run {
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if rx.recv_timeout(limit).is_err() {
            // SAFETY: kill(2) on the pid of our own child; harmless if it already exited.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output().expect("wait for ferro-vmm");
    let _ = tx.send(());
    out.into()
}

/// Boots the probe guest with `cmdline` and extra flags.
pub fn run_probe(cmdline: &str, extra: &[&str]) -> Run {
    let probe = probe().to_str().expect("utf-8 path").to_string();
    let mut args = vec!["--kernel", probe.as_str(), "--cmdline", cmdline];
    args.extend_from_slice(extra);
    run_vmm(&args, Duration::from_secs(60))
}
