//! Helpers for Ferrovisor's end-to-end tests: build the VMM and the guests once, run
//! `ferro-vmm` on real KVM, and read the probe guest's `key=value` report.

pub mod count;

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

    /// The numbers of the probe line that starts with `first=` (lines such as
    /// `rng_bytes=N rng_nonzero=N rng_irqs=N` carry several keys); a value that is no number
    /// reads as 0. A test failure that shows the console when there is no such line.
    pub fn fields(&self, first: &str) -> BTreeMap<String, u64> {
        let start = format!("{first}=");
        let line = self
            .stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&start))
            .unwrap_or_else(|| panic!("no {first}= line in the output:\n{}", self.stdout));
        line.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim().parse().unwrap_or(0)))
            .collect()
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

/// The release `ferro` binary (and `ferro-vmm` next to it), built once per test process.
pub fn ferro() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        vmm();
        run_checked(
            Command::new(env!("CARGO"))
                .args(["build", "--release", "-q", "-p", "ferro-cli"])
                .current_dir(repo()),
            "cargo build -p ferro-cli",
        );
        repo().join("target/release/ferro")
    })
}

/// A `ferro daemon` on a fresh data directory; killed (not its VMMs' data) on drop, after
/// its VMs are stopped.
pub struct Daemon {
    /// The data directory.
    pub dir: PathBuf,
    child: Option<std::process::Child>,
}

impl Daemon {
    /// Starts a daemon on a new temporary data directory named after `test`.
    pub fn start(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ferro-d-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("data dir");
        let mut d = Self { dir, child: None };
        d.restart();
        d
    }

    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("ferro.sock")
    }

    /// Kills the daemon (SIGKILL: no chance to clean up) and starts a new one on the same
    /// data directory.
    pub fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::File::create(self.dir.join("daemon.log")).expect("daemon log");
        let child = Command::new(ferro())
            .args(["daemon", "--data-dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start ferro daemon");
        self.child = Some(child);
        let t = std::time::Instant::now();
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the daemon did not come up"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the daemon process (its VMMs keep running).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `ferro ARGS` against this daemon.
    pub fn ferro(&self, args: &[&str]) -> Run {
        let out = Command::new(ferro())
            .args(args)
            .env("FERRO_HOST", format!("unix:{}", self.socket().display()))
            .stdin(Stdio::null())
            .output()
            .expect("run ferro");
        out.into()
    }

    /// Runs `ferro ARGS --json`, checks it succeeded and parses its output.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let r = self.ferro(&a);
        assert_eq!(r.code, Some(0), "ferro {args:?}: {}{}", r.stdout, r.stderr);
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
    }

    /// Sends raw HTTP over the API socket and returns the status and the body.
    pub fn http(&self, request: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(self.socket()).expect("connect");
        s.write_all(request.as_bytes()).expect("send");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, body)
    }
}

impl Drop for Daemon {
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
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether the KVM lab can run here; prints the one SKIPPED line when it cannot.
pub fn lab_available() -> bool {
    if std::env::var_os("FERRO_SKIP_LAB").is_some() {
        println!("SKIPPED: FERRO_SKIP_LAB is set (KVM-lab tests)");
        return false;
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIPPED: no qemu-system-x86_64 for the KVM lab (run scripts/deps.sh)");
        return false;
    }
    true
}

/// Builds the Linux test guest the lab packs (cached: instant after the first run).
pub fn build_linux_guest() {
    run_checked(
        Command::new("bash").arg(repo().join("guest/linux/build.sh")),
        "guest/linux/build.sh",
    );
}

/// Builds the Debian template root disk (cached: instant after the first run) and returns its
/// directory (`debian.qcow2`, `debian-initrd.cpio.gz`, ...).
pub fn build_debian_guest() -> PathBuf {
    run_checked(
        Command::new("bash").arg(repo().join("guest/debian/build.sh")),
        "guest/debian/build.sh",
    );
    std::env::var_os("FERRO_BUILD")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("build"))
        .join("debian")
}

/// The rest of the first console line that starts (after blanks) with `prefix`, trimmed.
pub fn console_line<'a>(console: &'a str, prefix: &str) -> Option<&'a str> {
    console
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(prefix))
        .map(str::trim)
}

/// How many times a KVM-lab test runs before its failure counts. The lab is QEMU's software CPU
/// emulating AMD-V, and its nested SVM is not perfect. Measured here, about one nested 2-vCPU
/// Linux boot in twenty goes wrong in a way that does not repeat on the next run:
/// the whole lab freezes (lab.sh ends it, exit 125), the lab kernel locks up in kvm_amd's run
/// loop (a panic, 125), a nested vCPU stops taking timer interrupts (RCU stall), or a nested
/// vCPU triple-faults. A test boots up to four such guests, so one run in five or so can fail
/// on the lab alone; three runs keep that out of CI, and a failure of ours fails all three.
pub const LAB_ATTEMPTS: u32 = 3;

/// A line for the CI log even when the test passes: written to the process's stderr directly,
/// which the test harness does not capture (it captures `print!`/`eprint!`), so a lab test
/// that passed only on a later attempt shows it.
fn notice(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Runs `tests/lab/SCRIPT` inside the KVM lab with the `--add SRC:DEST` files `adds`, for at most
/// `timeout_s` seconds, and hands its console to `check`, which asserts. The lab and the script
/// must end with status 0. A failing run is repeated (see [`LAB_ATTEMPTS`]); the last failure
/// fails the test, showing the console and the lab's stderr.
pub fn lab_check(script: &str, adds: &[String], timeout_s: u32, check: impl Fn(&str)) {
    for attempt in 1..=LAB_ATTEMPTS {
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("lab/lab.sh"))
            .args(["run", "--timeout", &timeout_s.to_string()]);
        for a in adds {
            cmd.args(["--add", a]);
        }
        let out = cmd
            .arg(repo().join("tests/lab").join(script))
            .output()
            .expect("run lab/lab.sh");
        let console = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // First in the test's output, so that a CI log cut to its head and tail still shows
        // how the run went: the script's marker lines and the end of the console.
        println!(
            "{}",
            lab_summary(script, attempt, out.status.code(), &console, &stderr)
        );
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert_eq!(
                out.status.code(),
                Some(0),
                "lab failed: {console}\n{stderr}"
            );
            check(&console);
        }));
        match result {
            Ok(()) => {
                if attempt > 1 {
                    notice(&format!(
                        "lab: {script}: passed on attempt {attempt} of {LAB_ATTEMPTS}"
                    ));
                }
                return;
            }
            Err(e) if attempt < LAB_ATTEMPTS => {
                let why = e
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| e.downcast_ref::<&str>().copied())
                    .unwrap_or("panic");
                let first = why.lines().next().unwrap_or_default();
                notice(&format!(
                    "lab: {script}: attempt {attempt} failed ({first}); running it again"
                ));
            }
            Err(e) => std::panic::resume_unwind(e),
        }
    }
}

/// A short account of one lab run: its exit status, the script's marker lines (`X-...`, as the
/// scripts print them) and the last lines of the console and of the lab's stderr, with terminal
/// control sequences (progress bars) left out.
pub fn lab_summary(
    script: &str,
    attempt: u32,
    status: Option<i32>,
    console: &str,
    stderr: &str,
) -> String {
    let clean = |l: &str| !l.contains('\x1b') && !l.trim().is_empty();
    let marker = |l: &str| {
        let t = l.trim_start();
        let b = t.as_bytes();
        b.len() > 2 && b[0].is_ascii_uppercase() && b[1] == b'-' && b[2].is_ascii_alphabetic()
    };
    let markers: Vec<&str> = console
        .lines()
        .filter(|l| clean(l) && marker(l))
        .take(60)
        .collect();
    let tail = |text: &str, n: usize| {
        let lines: Vec<&str> = text.lines().filter(|l| clean(l)).collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    };
    format!(
        "lab {script} attempt {attempt}: exit status {status:?}\n-- marker lines:\n{}\n-- console, last lines:\n{}\n-- lab stderr, last lines:\n{}\n-- end of summary",
        markers.join("\n"),
        tail(console, 30),
        tail(stderr, 10)
    )
}

/// Word `w` (0..64) of sector `s` of the probe's `blk=write` / `blk=verify` test pattern with
/// seed `seed` (guest/probe/README.md).
pub fn blk_pattern_word(seed: u64, s: u64, w: u64) -> u64 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (s * 64 + w);
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Writes the probe's test pattern with `seed` over sectors `[0, sectors)` of `disk`, as
/// `blk=write` would.
pub fn write_blk_pattern(disk: &Path, sectors: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    let per = 2048u64;
    let mut buf = vec![0u8; (per * 512) as usize];
    let mut s0 = 0;
    while s0 < sectors {
        let n = per.min(sectors - s0);
        for s in 0..n {
            for w in 0..64 {
                let at = (s * 512 + w * 8) as usize;
                buf[at..at + 8].copy_from_slice(&blk_pattern_word(seed, s0 + s, w).to_le_bytes());
            }
        }
        f.write_all_at(&buf[..(n * 512) as usize], s0 * 512)
            .unwrap();
        s0 += n;
    }
}
