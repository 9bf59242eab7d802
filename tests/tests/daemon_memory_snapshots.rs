//! `ferro vm snapshot --memory` and `ferro vm restore` against a real daemon, with the probe
//! guest's `count=` workload on /dev/kvm: the snapshot of a running VM leaves it running, a
//! restore carries the counter on from the snapshot with the disks as they were then, and bad
//! snapshot directories are refused with the VM left stopped and unchanged.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferro_tests::{kvm_available, probe, Daemon};
use serde_json::Value;

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

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferro-memsnap-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn qcow2(dir: &Path) -> PathBuf {
    let p = dir.join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg("4M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    p
}

fn wait_state(d: &Daemon, vm: &str, state: &str, limit: Duration) -> Value {
    let t = Instant::now();
    loop {
        let v = d.json(&["vm", "show", vm]);
        if v["state"] == state {
            return v;
        }
        assert!(t.elapsed() < limit, "not {state} in {limit:?}: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `count=` ticks in VM `vm`'s console log.
fn ticks(d: &Daemon, vm: &str) -> Vec<u64> {
    d.ferro(&["vm", "log", vm])
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("count="))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect()
}

fn wait_tick(d: &Daemon, vm: &str, n: u64) -> u64 {
    let t = Instant::now();
    loop {
        if let Some(&last) = ticks(d, vm).last() {
            if last >= n {
                return last;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no tick {n}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn create(d: &Daemon, vm: &str, disk: &Path, cmdline: &str) {
    d.json(&[
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

/// Boots the VM with `cmdline` until it powers off; its console log.
fn boot(d: &Daemon, vm: &str, cmdline: &str) -> String {
    d.json(&["vm", "edit", vm, "--cmdline", cmdline]);
    d.json(&["vm", "start", vm]);
    wait_state(d, vm, "stopped", Duration::from_secs(30));
    d.ferro(&["vm", "log", vm]).stdout
}

#[test]
fn memory_snapshot_of_a_running_vm_then_restore_carries_on() {
    if !ready("memory_snapshot_of_a_running_vm_then_restore_carries_on") {
        return;
    }
    let d = Daemon::start("memsnap");
    let w = scratch("memsnap");
    let disk = qcow2(&w);
    create(&d, "g", &disk, "exit=poweroff");
    let log = boot(&d, "g", "blk=write blk_seed=7 exit=poweroff");
    assert!(log.contains("blk_verify=ok"), "{log}");

    // Counting (4 s), then checking the disk still holds seed 7.
    let counting = "count=400 blk=verify blk_seed=7 exit=poweroff";
    d.json(&["vm", "edit", "g", "--cmdline", counting]);
    let pid0 = d.json(&["vm", "start", "g"])["pid"].as_u64().unwrap();
    let before = wait_tick(&d, "g", 40);
    let t = Instant::now();
    let s = d.json(&["vm", "snapshot", "g", "--name", "s1", "--memory"]);
    let took = t.elapsed();
    assert_eq!(s["memory"], true, "{s}");
    let dir = PathBuf::from(s["dir"].as_str().unwrap());
    assert_eq!(dir, d.dir.join("vms/g/snapshots/s1"));
    assert!(dir.join("snapshot.json").is_file());
    println!(
        "memory snapshot of a 64 MiB probe: {} KiB on disk, guest held still {} ms, request {took:?}",
        s["bytes"].as_u64().unwrap() >> 10,
        s["paused_ms"]
    );

    // The VM runs on (in a new VMM) and finishes its count on the new overlay.
    let v = d.json(&["vm", "show", "g"]);
    assert_eq!(v["state"], "running", "{v}");
    assert_ne!(v["pid"].as_u64(), Some(pid0));
    let top = PathBuf::from(v["disks"][0]["path"].as_str().unwrap());
    assert!(top.starts_with(d.dir.join("vms/g")), "{}", top.display());
    let after = wait_tick(&d, "g", before + 5);
    assert!(after > before);
    wait_state(&d, "g", "stopped", Duration::from_secs(30));
    let log = d.ferro(&["vm", "log", "g"]).stdout;
    assert!(
        log.contains("count_done=400") && log.contains("blk_verify=ok"),
        "{log}"
    );
    let list = d.json(&["vm", "snapshot", "list", "g"]);
    assert_eq!(list[0]["name"], "s1");
    assert_eq!(list[0]["memory"], true);
    let table = d.ferro(&["vm", "snapshot", "list", "g"]).stdout;
    assert!(table.contains("MEMORY") && table.contains("s1"), "{table}");

    // The disk changes after the snapshot...
    let log = boot(&d, "g", "blk=write blk_seed=8 exit=poweroff");
    assert!(log.contains("blk_verify=ok"), "{log}");

    // ... and the restored guest carries on counting from the snapshot, then finds seed 7.
    let t = Instant::now();
    let v = d.json(&["vm", "restore", "g", "--snapshot", "s1"]);
    let restore_took = t.elapsed();
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(
        v["cmdline"], counting,
        "the snapshot's definition comes back"
    );
    wait_state(&d, "g", "stopped", Duration::from_secs(30));
    let log = d.ferro(&["vm", "log", "g"]).stdout;
    let t2 = ticks(&d, "g");
    let first = *t2.first().unwrap_or_else(|| panic!("no tick: {log}"));
    assert!(
        first >= before,
        "restored at tick {first}, saved after {before}"
    );
    assert!(
        first <= after,
        "restored at {first}, beyond what ran on ({after})"
    );
    assert!(
        log.contains("count_done=400"),
        "the count did not finish: {log}"
    );
    assert!(
        log.contains("blk_verify=ok"),
        "the restored guest does not see the disk as it was at the snapshot: {log}"
    );
    println!("restore through the daemon: {restore_took:?} (request), first tick {first}");
    let kinds: Vec<String> = d
        .json(&["vm", "events", "g"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(kinds.iter().any(|k| k == "restored"), "{kinds:?}");

    // A restore again (the snapshot stays usable), then delete: its directory goes.
    d.json(&["vm", "restore", "g", "--from", dir.to_str().unwrap()]);
    d.json(&["vm", "stop", "g", "--force"]);
    d.json(&["vm", "snapshot", "delete", "g", "s1"]);
    assert!(!dir.exists(), "{} is left", dir.display());
    // The restores reverted the disk to the snapshot's seed 7; deleting it keeps that.
    let log = boot(&d, "g", "blk=verify blk_seed=7 exit=poweroff");
    assert!(log.contains("blk_verify=ok"), "{log}");
    let _ = std::fs::remove_dir_all(&w);
}

fn refused(d: &Daemon, args: &[&str], code: &str) -> String {
    let r = d.ferro(args);
    assert_eq!(r.code, Some(1), "{args:?}: {}", r.stdout);
    assert!(
        r.stderr.contains(&format!("[{code}]")),
        "{args:?}: {}",
        r.stderr
    );
    r.stderr
}

#[test]
fn memory_snapshot_errors_leave_the_vm_unchanged() {
    if !ready("memory_snapshot_errors_leave_the_vm_unchanged") {
        return;
    }
    let d = Daemon::start("memsnaperr");
    let w = scratch("memsnaperr");
    let disk = qcow2(&w);
    create(&d, "g", &disk, "count=100000 smp=off exit=poweroff");
    refused(
        &d,
        &["vm", "snapshot", "g", "--name", "m", "--memory"],
        "invalid_state",
    );
    d.json(&["vm", "snapshot", "g", "--name", "disk-only"]);
    d.json(&["vm", "start", "g"]);
    wait_tick(&d, "g", 5);
    // A paused VM stays paused; --to puts the directory where asked.
    d.json(&["vm", "pause", "g"]);
    let to = w.join("to");
    let s = d.json(&[
        "vm",
        "snapshot",
        "g",
        "--name",
        "m",
        "--memory",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_eq!(s["dir"], to.to_str().unwrap());
    assert_eq!(d.json(&["vm", "show", "g"])["state"], "paused");
    refused(
        &d,
        &[
            "vm",
            "snapshot",
            "g",
            "--name",
            "m2",
            "--memory",
            "--to",
            to.to_str().unwrap(),
        ],
        "conflict",
    );
    refused(
        &d,
        &["vm", "restore", "g", "--snapshot", "m"],
        "invalid_state",
    );
    d.json(&["vm", "stop", "g", "--force"]);
    let before = d.json(&["vm", "show", "g"]);
    let files = |dir: &Path| std::fs::read_dir(dir).unwrap().count();
    let n = files(&d.dir.join("vms/g"));

    // Bad directories: 422, the VM stopped and as it was, no file left behind.
    let bad = w.join("bad");
    refused(
        &d,
        &["vm", "restore", "g", "--from", bad.to_str().unwrap()],
        "bad_snapshot",
    );
    Command::new("cp")
        .args(["-r", to.to_str().unwrap(), bad.to_str().unwrap()])
        .status()
        .unwrap();
    let manifest = bad.join("snapshot.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace("\"format_version\": 1", "\"format_version\": 7"),
    )
    .unwrap();
    refused(
        &d,
        &["vm", "restore", "g", "--from", bad.to_str().unwrap()],
        "unsupported_snapshot",
    );
    std::fs::write(&manifest, &text[..text.len() / 2]).unwrap();
    refused(
        &d,
        &["vm", "restore", "g", "--from", bad.to_str().unwrap()],
        "bad_snapshot",
    );
    std::fs::write(&manifest, &text).unwrap();
    let state = bad.join("state.json");
    let good = std::fs::read(&state).unwrap();
    std::fs::write(&state, &good[..good.len() - 10]).unwrap();
    let msg = refused(
        &d,
        &["vm", "restore", "g", "--from", bad.to_str().unwrap()],
        "bad_snapshot",
    );
    assert!(msg.contains(bad.to_str().unwrap()), "{msg}");
    refused(
        &d,
        &["vm", "restore", "g", "--snapshot", "disk-only"],
        "invalid_state",
    );
    refused(
        &d,
        &["vm", "restore", "g", "--snapshot", "nope"],
        "not_found",
    );
    let after = d.json(&["vm", "show", "g"]);
    assert_eq!(after["state"], "stopped");
    assert_eq!(after["disks"], before["disks"]);
    assert_eq!(files(&d.dir.join("vms/g")), n, "files left behind");

    // The good one still restores, paused state aside: the guest runs.
    d.json(&["vm", "restore", "g", "--from", to.to_str().unwrap()]);
    wait_tick(&d, "g", 6);
    d.json(&["vm", "stop", "g", "--force"]);
    d.json(&["vm", "snapshot", "delete", "g", "m"]);
    assert!(!to.join("snapshot.json").exists());
    let _ = std::fs::remove_dir_all(&w);
}

#[test]
fn restored_guest_that_reboots_boots_afresh() {
    if !ready("restored_guest_that_reboots_boots_afresh") {
        return;
    }
    let d = Daemon::start("memsnapboot");
    let w = scratch("memsnapboot");
    let disk = qcow2(&w);
    create(&d, "r", &disk, "count=150 smp=off exit=reboot");
    d.json(&["vm", "start", "r"]);
    wait_tick(&d, "r", 5);
    d.json(&["vm", "snapshot", "r", "--name", "s", "--memory"]);
    d.json(&["vm", "stop", "r", "--force"]);
    let pid = d.json(&["vm", "restore", "r", "--snapshot", "s"])["pid"].as_u64();
    // The restored VMM ends at the guest's reboot; the daemon boots the guest again.
    let t = Instant::now();
    loop {
        let kinds: Vec<String> = d
            .json(&["vm", "events", "r"])
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_string())
            .collect();
        if kinds.iter().any(|k| k == "rebooted") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{kinds:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let v = wait_state(&d, "r", "running", Duration::from_secs(10));
    assert_ne!(v["pid"].as_u64(), pid);
    d.json(&["vm", "stop", "r", "--force"]);
    let _ = std::fs::remove_dir_all(&w);
}
