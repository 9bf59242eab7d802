//! `ferro vm snapshot`: disk snapshots as qcow2 overlays, against a real daemon; data written
//! with qemu-io on the host, and by the probe guest on /dev/kvm.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferro_tests::{kvm_available, probe, Daemon};
use serde_json::Value;

fn have_qemu_tools(test: &str) -> bool {
    let ok = ["qemu-img", "qemu-io"]
        .iter()
        .all(|t| Command::new(t).arg("--version").output().is_ok());
    if !ok {
        println!("SKIPPED: no qemu-img/qemu-io ({test}; run scripts/deps.sh)");
    }
    ok
}

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferro-snap-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn qcow2(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg("4M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    p
}

/// Runs one qemu-io command on `img`; true when it succeeded (a `read -P` that finds other
/// bytes fails).
fn qemu_io(img: &Path, cmd: &str) -> bool {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(img)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    out.status.success()
        && !text.contains("Pattern verification failed")
        && !text.contains("failed")
}

fn disk_of(d: &Daemon, vm: &str) -> PathBuf {
    PathBuf::from(
        d.json(&["vm", "show", vm])["disks"][0]["path"]
            .as_str()
            .unwrap(),
    )
}

fn qcow2_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "qcow2"))
        })
        .count()
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn snapshot_revert_delete_keep_the_right_bytes() {
    if !have_qemu_tools("snapshot_revert_delete_keep_the_right_bytes") {
        return;
    }
    let d = Daemon::start("snap");
    let w = scratch("snap");
    let disk = qcow2(&w, "disk.qcow2");
    let kernel = w.join("kernel");
    std::fs::write(&kernel, b"not booted here").unwrap();
    d.json(&[
        "vm",
        "create",
        "web",
        "--kernel",
        kernel.to_str().unwrap(),
        "--disk",
        &format!("path={}", disk.display()),
    ]);
    assert!(qemu_io(&disk, "write -P 0x11 0 64k"));

    let s = d.json(&["vm", "snapshot", "web", "--name", "one"]);
    assert_eq!(s["name"], "one");
    assert_eq!(s["memory"], false);
    assert_eq!(s["disks"][0], disk.to_str().unwrap());
    let top1 = disk_of(&d, "web");
    assert!(
        top1.starts_with(d.dir.join("vms/web")),
        "{}",
        top1.display()
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&disk).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o222,
            0,
            "the snapshot's layer is writable: {mode:o}"
        );
    }
    assert!(qemu_io(&top1, "read -P 0x11 0 64k"));
    assert!(qemu_io(&top1, "write -P 0x22 0 64k"));
    d.json(&["vm", "snapshot", "web", "--name", "two"]);
    let top2 = disk_of(&d, "web");
    assert!(qemu_io(&top2, "write -P 0x33 0 64k"));
    assert!(qemu_io(&top2, "read -P 0x33 0 64k"));
    assert!(
        !qemu_io(&top2, "read -P 0x22 0 64k"),
        "qemu-io read -P does not fail on a mismatch"
    );
    assert_eq!(
        names(&d.json(&["vm", "snapshot", "list", "web"])),
        ["one", "two"]
    );
    let table = d.ferro(&["vm", "snapshot", "list", "web"]);
    assert!(
        table.stdout.contains("one") && table.stdout.contains("two"),
        "{}",
        table.stdout
    );

    // Revert to the first: the old bytes; the dropped top is deleted.
    let v = d.json(&["vm", "snapshot", "revert", "web", "one"]);
    let top = PathBuf::from(v["disks"][0]["path"].as_str().unwrap());
    assert!(qemu_io(&top, "read -P 0x11 0 64k"));
    assert!(
        !top2.exists(),
        "the reverted-away top {} is left",
        top2.display()
    );
    // And forward again to the second (snapshots after the one reverted to are kept).
    d.json(&["vm", "snapshot", "revert", "web", "two"]);
    let top = disk_of(&d, "web");
    assert!(qemu_io(&top, "read -P 0x22 0 64k"));

    // Errors: 4xx with the code, nothing changed.
    let r = d.ferro(&["vm", "snapshot", "web", "--name", "two"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("[conflict]"), "{}", r.stderr);
    let r = d.ferro(&["vm", "snapshot", "web", "--name", "../x"]);
    assert!(r.stderr.contains("[bad_request]"), "{}", r.stderr);
    let r = d.ferro(&["vm", "snapshot", "revert", "web", "nope"]);
    assert!(r.stderr.contains("[not_found]"), "{}", r.stderr);
    let r = d.ferro(&["vm", "snapshot", "nope", "--name", "a"]);
    assert!(r.stderr.contains("[not_found]"), "{}", r.stderr);
    let body = r#"{"name":"m","memory":true}"#;
    let (status, text) = d.http(&format!(
        "POST /v1/vms/web/snapshots HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    // A memory snapshot needs the VM running (tests/tests/daemon_memory_snapshots.rs).
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("invalid_state"), "{text}");
    assert_eq!(disk_of(&d, "web"), top);
    assert_eq!(
        names(&d.json(&["vm", "snapshot", "list", "web"])),
        ["one", "two"]
    );

    // Delete both: the VM's bytes stay, its folder keeps only its own top.
    d.json(&["vm", "snapshot", "delete", "web", "one"]);
    assert!(qemu_io(&disk_of(&d, "web"), "read -P 0x22 0 64k"));
    assert_eq!(names(&d.json(&["vm", "snapshot", "list", "web"])), ["two"]);
    d.json(&["vm", "snapshot", "revert", "web", "two"]);
    assert!(qemu_io(&disk_of(&d, "web"), "read -P 0x22 0 64k"));
    d.json(&["vm", "snapshot", "delete", "web", "two"]);
    assert_eq!(
        d.json(&["vm", "snapshot", "list", "web"]),
        Value::Array(vec![])
    );
    let top = disk_of(&d, "web");
    assert!(qemu_io(&top, "read -P 0x22 0 64k"));
    assert_eq!(qcow2_files(&d.dir.join("vms/web")), 1);
    let info = Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(&top)
        .output()
        .unwrap();
    assert!(info.status.success(), "{info:?}");
    let _ = std::fs::remove_dir_all(&w);
}

fn wait_state(d: &Daemon, vm: &str, state: &str) -> Value {
    let t = Instant::now();
    loop {
        let v = d.json(&["vm", "show", vm]);
        if v["state"] == state {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "timed out: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Boots the probe on the VM's disks with `cmdline` until it powers off; its console.
fn boot(d: &Daemon, vm: &str, cmdline: &str) -> String {
    d.json(&["vm", "edit", vm, "--cmdline", cmdline]);
    d.json(&["vm", "start", vm]);
    wait_state(d, vm, "stopped");
    d.ferro(&["vm", "log", vm]).stdout
}

#[test]
fn snapshot_probe_guest_sees_reverted_data() {
    if !kvm_available("snapshot_probe_guest_sees_reverted_data")
        || !have_qemu_tools("snapshot_probe_guest_sees_reverted_data")
    {
        return;
    }
    let d = Daemon::start("snapguest");
    let w = scratch("snapguest");
    let disk = qcow2(&w, "disk.qcow2");
    let p = probe().to_str().unwrap().to_string();
    d.json(&[
        "vm",
        "create",
        "g",
        "--kernel",
        &p,
        "--memory",
        "64",
        "--disk",
        &format!("path={}", disk.display()),
    ]);
    let log = boot(&d, "g", "blk=write blk_seed=7 exit=poweroff");
    assert!(
        log.contains("blk_write=ok") && log.contains("blk_verify=ok"),
        "{log}"
    );
    d.json(&["vm", "snapshot", "g", "--name", "seven"]);
    let log = boot(&d, "g", "blk=write blk_seed=8 exit=poweroff");
    assert!(log.contains("blk_verify=ok"), "{log}");
    let log = boot(&d, "g", "blk=verify blk_seed=7 exit=poweroff");
    assert!(
        log.contains("blk_verify=fail"),
        "the write after the snapshot was lost: {log}"
    );

    // A running VM is not snapshotted, reverted or cut.
    d.json(&["vm", "edit", "g", "--cmdline", "exit=halt"]);
    d.json(&["vm", "start", "g"]);
    for args in [
        vec!["vm", "snapshot", "g", "--name", "live"],
        vec!["vm", "snapshot", "revert", "g", "seven"],
        vec!["vm", "snapshot", "delete", "g", "seven"],
    ] {
        let r = d.ferro(&args);
        assert_eq!(r.code, Some(1), "{args:?}");
        assert!(
            r.stderr.contains("[invalid_state]"),
            "{args:?}: {}",
            r.stderr
        );
    }
    d.json(&["vm", "stop", "g", "--force"]);

    d.json(&["vm", "snapshot", "revert", "g", "seven"]);
    let log = boot(&d, "g", "blk=verify blk_seed=7 exit=poweroff");
    assert!(
        log.contains("blk_verify=ok"),
        "the guest does not see the snapshot's data: {log}"
    );
    d.json(&["vm", "snapshot", "delete", "g", "seven"]);
    let log = boot(&d, "g", "blk=verify blk_seed=7 exit=poweroff");
    assert!(
        log.contains("blk_verify=ok"),
        "deleting the snapshot lost data: {log}"
    );
    let _ = std::fs::remove_dir_all(&w);
}
