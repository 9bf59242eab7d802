//! Snapshots on /dev/kvm: the probe's `count=` workload is saved mid-run through the control
//! socket, its VMM killed, and a new `ferro-vmm --restore` process continues it; the counter,
//! the guest's kvmclock and the checksum of the memory it keeps writing must carry on. Broken
//! snapshots are refused with one line and status 1.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferro_tests::count::{check_sums, expected_sum, ticks, value, PAGES, WORDS};
use ferro_tests::{kvm_available, probe, vmm, wait_limited};

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferro-probesnap-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A VMM running the probe, its console lines collected as they come.
struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    control: PathBuf,
}

impl Running {
    fn start(dir: &Path, cmdline: &str, extra: &[&str]) -> Self {
        let control = dir.join("control.sock");
        let mut child = Command::new(vmm())
            .args(["--kernel", probe().to_str().unwrap(), "--cmdline", cmdline])
            .arg("--control")
            .arg(&control)
            .args(extra)
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
        Self {
            child,
            lines,
            control,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until the probe has printed tick `n`.
    fn wait_tick(&self, n: u64) {
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

    /// Sends one control request and returns the response line.
    fn request(&self, json: &str) -> serde_json::Value {
        let mut s = UnixStream::connect(&self.control).expect("connect to the control socket");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(json.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    fn kill(mut self) -> String {
        let _ = self.child.kill();
        let out = self.child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// Runs `ferro-vmm --restore DIR` and returns its run and how long it took to print its first
/// count line.
fn restore(dir: &Path) -> (ferro_tests::Run, Option<Duration>) {
    let started = Instant::now();
    let mut child = Command::new(vmm())
        .arg("--restore")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferro-vmm --restore");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    let _ = out.read_line(&mut first);
    let to_first = (!first.is_empty()).then(|| started.elapsed());
    let collector = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        rest
    });
    let mut run = wait_limited(child, Duration::from_secs(60));
    run.stdout = first + &collector.join().unwrap();
    (run, to_first)
}

fn dir_bytes_on_disk(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

#[test]
fn checksum_formula_matches_the_probe_start() {
    // Round 1 writes value(1) at page 0 word 0; everything else is zero.
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    h = (h ^ value(1)).wrapping_mul(0x0000_0100_0000_01b3);
    for _ in 1..PAGES * WORDS {
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    assert_eq!(expected_sum(1), h);
    assert_ne!(expected_sum(2), expected_sum(1));
}

#[test]
fn snapshot_mid_run_then_restore_in_a_new_process() {
    if !kvm_available("snapshot_mid_run_then_restore_in_a_new_process") {
        return;
    }
    let dir = scratch("midrun");
    let snap = dir.join("snap");
    let vm = Running::start(&dir, "count=250", &["--memory", "512", "--cpus", "2"]);
    vm.wait_tick(30);
    let before = ticks(&vm.lines());
    let r = vm.request(&format!(
        r#"{{"cmd":"snapshot","dir":"{}"}}"#,
        snap.display()
    ));
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(r["status"]["state"], "running", "{r}");
    // The VM runs on after the snapshot.
    let at = before.last().unwrap().tick;
    vm.wait_tick(at + 5);
    let stderr = vm.kill();
    let save_line = stderr
        .lines()
        .find(|l| l.contains("snapshot "))
        .unwrap_or_else(|| panic!("no snapshot line: {stderr}"))
        .to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("snapshot.json")).unwrap()).unwrap();
    assert_eq!(manifest["format_version"], 1);
    assert_eq!(manifest["memory"]["file_size"], 512u64 << 20);
    let on_disk = dir_bytes_on_disk(&snap);
    assert!(
        on_disk < 64 << 20,
        "the memory file is not sparse: {on_disk}"
    );

    let (run, to_first) = restore(&snap);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let lines: Vec<String> = run.stdout.lines().map(str::to_string).collect();
    let after = ticks(&lines);
    let last = *before.last().unwrap();
    let first = *after.first().expect("the restored VM printed no tick");
    // The counter and the guest's clock go on from at least where they were, never back.
    assert!(first.tick >= last.tick, "{first:?} after {last:?}");
    assert!(first.rounds >= last.rounds, "{first:?} after {last:?}");
    assert!(first.clock >= last.clock, "{first:?} after {last:?}");
    for w in after.windows(2) {
        assert_eq!(w[1].tick, w[0].tick + 1, "{:?}", w);
        assert!(
            w[1].clock > w[0].clock && w[1].rounds > w[0].rounds,
            "{w:?}"
        );
    }
    assert_eq!(after.last().unwrap().tick, 250);
    assert!(
        lines.iter().any(|l| l == "count_done=250"),
        "{}",
        run.stdout
    );
    assert!(lines.iter().any(|l| l == "probe=exit:poweroff"));
    // The memory the guest keeps writing is what it was (before), and what it goes on to be.
    check_sums("before", &before[before.len().saturating_sub(3)..]);
    check_sums("restored", &after[..3.min(after.len())]);
    check_sums("restored", &after[after.len().saturating_sub(2)..]);
    let restored_line = run
        .stderr
        .lines()
        .find(|l| l.contains("restored"))
        .unwrap_or_default()
        .to_string();
    println!(
        "512 MiB guest: {save_line}; on disk {} KiB; {restored_line}; restore to first console line {:?}",
        on_disk >> 10,
        to_first
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn snapshot_of_a_paused_vm_with_rng_keeps_it_paused_and_restores() {
    if !kvm_available("snapshot_of_a_paused_vm_with_rng_keeps_it_paused_and_restores") {
        return;
    }
    let dir = scratch("paused");
    let snap = dir.join("snap");
    // The rng runs after the count: after the restore, through the restored PCI state.
    let vm = Running::start(&dir, "count=60 smp=off rng=4096", &["--rng"]);
    vm.wait_tick(10);
    assert_eq!(vm.request(r#"{"cmd":"pause"}"#)["result"], "ok");
    let r = vm.request(&format!(
        r#"{{"cmd":"snapshot","dir":"{}"}}"#,
        snap.display()
    ));
    assert_eq!(r["status"]["state"], "paused", "{r}");
    let at = ticks(&vm.lines()).last().unwrap().tick;
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(ticks(&vm.lines()).last().unwrap().tick, at, "paused VM ran");
    vm.kill();
    let (run, _) = restore(&snap);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let after = ticks(&run.stdout.lines().map(str::to_string).collect::<Vec<_>>());
    assert!(after.first().unwrap().tick >= at);
    let rng = run.fields("rng_bytes");
    assert_eq!(rng.get("rng_bytes"), Some(&4096), "{}", run.stdout);
    assert!(
        rng.get("rng_irqs").is_some_and(|&n| n != 0),
        "{}",
        run.stdout
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Runs `--restore dir` and checks it fails with one line on stderr that contains `want`.
fn refused(dir: &Path, want: &str) {
    let r = ferro_tests::run_vmm(
        &["--restore", dir.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert_eq!(r.code, Some(1), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains(want), "want {want:?}: {}", r.stderr);
}

#[test]
fn broken_snapshots_are_refused_with_one_line() {
    if !kvm_available("broken_snapshots_are_refused_with_one_line") {
        return;
    }
    let dir = scratch("broken");
    let snap = dir.join("snap");
    let vm = Running::start(&dir, "count=100 smp=off", &["--memory", "128"]);
    vm.wait_tick(3);
    let r = vm.request(&format!(
        r#"{{"cmd":"snapshot","dir":"{}","resume":false}}"#,
        snap.display()
    ));
    assert_eq!(r["status"]["state"], "paused", "{r}");
    vm.kill();

    refused(&dir.join("nothing-here"), "snapshot.json");
    let manifest = snap.join("snapshot.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, &text[..text.len() / 2]).unwrap();
    refused(&snap, "not JSON");
    std::fs::write(
        &manifest,
        text.replace("\"format_version\": 1", "\"format_version\": 7"),
    )
    .unwrap();
    refused(&snap, "format version 7");
    std::fs::write(&manifest, &text).unwrap();

    let memory = snap.join("memory");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap();
    f.set_len((128 << 20) - 4096).unwrap();
    refused(&snap, "truncated");
    f.set_len(128 << 20).unwrap();

    let state = snap.join("state.json");
    let mut bytes = std::fs::read(&state).unwrap();
    let good = bytes.clone();
    let mid = bytes.len() / 2;
    bytes[mid] = if bytes[mid] == b'1' { b'2' } else { b'1' };
    std::fs::write(&state, &bytes).unwrap();
    refused(&snap, "corrupt");
    std::fs::write(&state, &good[..good.len() - 10]).unwrap();
    refused(&snap, "truncated");
    std::fs::write(&state, &good).unwrap();

    // Put back whole, it runs again.
    let (run, _) = restore(&snap);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("count_done=100"));
    std::fs::remove_dir_all(dir).unwrap();
}
