//! virtio-blk on real KVM with real image files, driven by the probe guest (`blk=` keys, see
//! guest/probe/README.md): data written then verified in a second VMM process, two disks, a
//! read-only disk, qcow2 images and a qcow2 overlay on a raw base (checked with `qemu-img
//! check`), kill -9 of the VMM right after the guest's flush, and the serial number.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferro_tests::{kvm_available, probe, run_probe, vmm, Run};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferro-blk-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A sparse raw image of `mib` MiB.
fn raw(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    p
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (apt install qemu-utils)")
}

fn qemu_img_ok(args: &[&str]) {
    let o = qemu_img(args);
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `qemu-img check` finds no errors and no leaks.
fn check_clean(img: &Path) {
    let o = qemu_img(&["check", img.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "qemu-img check {}: {out}{}",
        img.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("No errors were found"), "{out}");
}

/// Every `key=value` token of the probe's output (lines carry several); last one wins.
fn tokens(r: &Run) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for line in r.stdout.lines() {
        for t in line.trim_end_matches('\r').split_whitespace() {
            if let Some((k, v)) = t.split_once('=') {
                m.insert(k.to_string(), v.to_string());
            }
        }
    }
    m
}

fn blk(cmdline: &str, disks: &[String]) -> (Run, BTreeMap<String, String>) {
    let mut extra = Vec::new();
    for d in disks {
        extra.push("--disk");
        extra.push(d.as_str());
    }
    let r = run_probe(&format!("exit=poweroff smp=off {cmdline}"), &extra);
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    let t = tokens(&r);
    (r, t)
}

fn disk(path: &Path, opts: &str) -> String {
    format!("path={}{opts}", path.display())
}

fn want(t: &BTreeMap<String, String>, key: &str, value: &str, r: &Run) {
    assert_eq!(
        t.get(key).map(String::as_str),
        Some(value),
        "{key}:\n{}\n{}",
        r.stdout,
        r.stderr
    );
}

#[test]
fn write_then_verify_across_a_restart() {
    if !kvm_available("write_then_verify_across_a_restart") {
        return;
    }
    let dir = scratch("restart");
    let img = raw(&dir, "d.img", 16);
    let d = [disk(&img, ",format=raw,serial=FERRO-SN-1")];
    let (r, t) = blk("blk=write blk_sectors=4096 blk_seed=11", &d);
    want(&t, "blk_capacity", "32768", &r);
    want(&t, "blk_ro", "0", &r);
    want(&t, "blk_serial", "FERRO-SN-1", &r);
    want(&t, "blk_write", "ok", &r);
    want(&t, "blk_flush", "ok", &r);
    want(&t, "blk_verify", "ok", &r);
    // A new VMM process reads back what the first wrote; another seed does not match.
    let (r, t) = blk("blk=verify blk_sectors=4096 blk_seed=11", &d);
    want(&t, "blk_verify", "ok", &r);
    let (r, t) = blk("blk=verify blk_sectors=4096 blk_seed=12", &d);
    want(&t, "blk_verify", "fail:0", &r);
    // Without serial=, GET_ID answers the backend's id (device and inode).
    let (r, t) = blk("blk=read blk_sectors=8", &[disk(&img, "")]);
    want(&t, "blk_read", "ok", &r);
    assert!(!t["blk_serial"].is_empty(), "{}", r.stdout);
}

#[test]
fn two_disks() {
    if !kvm_available("two_disks") {
        return;
    }
    let dir = scratch("two");
    let a = raw(&dir, "a.img", 8);
    let b = raw(&dir, "b.img", 4);
    let d = [disk(&a, ",serial=DISK-A"), disk(&b, ",serial=DISK-B")];
    let (r, t) = blk("blk=write blk_dev=1 blk_sectors=512 blk_seed=2", &d);
    want(&t, "blk_devices", "2", &r);
    want(&t, "blk_capacity", "8192", &r);
    want(&t, "blk_serial", "DISK-B", &r);
    want(&t, "blk_verify", "ok", &r);
    let (r, t) = blk("blk=write blk_dev=0 blk_sectors=512 blk_seed=1", &d);
    want(&t, "blk_serial", "DISK-A", &r);
    want(&t, "blk_verify", "ok", &r);
    // Each disk kept its own data.
    let (r, t) = blk("blk=verify blk_dev=1 blk_sectors=512 blk_seed=2", &d);
    want(&t, "blk_verify", "ok", &r);
    let (r, t) = blk("blk=verify blk_dev=0 blk_sectors=512 blk_seed=2", &d);
    want(&t, "blk_verify", "fail:0", &r);
}

#[test]
fn read_only_disk_refuses_writes() {
    if !kvm_available("read_only_disk_refuses_writes") {
        return;
    }
    let dir = scratch("ro");
    let img = raw(&dir, "ro.img", 4);
    blk("blk=write blk_sectors=256 blk_seed=5", &[disk(&img, "")]);
    let before = std::fs::read(&img).unwrap();
    let d = [disk(&img, ",readonly=on")];
    let (r, t) = blk("blk=write blk_sectors=256 blk_seed=6", &d);
    want(&t, "blk_ro", "1", &r);
    want(&t, "blk_write", "ioerr", &r);
    assert!(std::fs::read(&img).unwrap() == before, "the file changed");
    let (r, t) = blk("blk=verify blk_sectors=256 blk_seed=5", &d);
    want(&t, "blk_verify", "ok", &r);
}

#[test]
fn qcow2_image_and_overlay_on_a_raw_base() {
    if !kvm_available("qcow2_image_and_overlay_on_a_raw_base") {
        return;
    }
    let dir = scratch("qcow2");
    // A plain qcow2 image, 64 KiB clusters.
    let q = dir.join("q.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "32M"]);
    let dq = [disk(&q, ",format=qcow2")];
    let (r, t) = blk("blk=write blk_sectors=8192 blk_seed=21", &dq);
    want(&t, "blk_capacity", "65536", &r);
    want(&t, "blk_verify", "ok", &r);
    check_clean(&q);
    let (r, t) = blk("blk=verify blk_sectors=8192 blk_seed=21", &dq);
    want(&t, "blk_verify", "ok", &r);

    // An overlay on a raw base: the guest sees the base, writes land in the overlay only.
    let base = raw(&dir, "base.img", 16);
    blk(
        "blk=write blk_sectors=2048 blk_seed=30",
        &[disk(&base, ",format=raw")],
    );
    let base_bytes = std::fs::read(&base).unwrap();
    let ov = dir.join("ov.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.img",
        "-F",
        "raw",
        ov.to_str().unwrap(),
    ]);
    let dov = [disk(&ov, "")];
    let (r, t) = blk("blk=verify blk_sectors=2048 blk_seed=30", &dov);
    want(&t, "blk_verify", "ok", &r);
    // Rewrite part of the base's range (a partial cluster too) through the overlay.
    let (r, t) = blk("blk=write blk_sectors=1000 blk_seed=31", &dov);
    want(&t, "blk_verify", "ok", &r);
    assert!(
        std::fs::read(&base).unwrap() == base_bytes,
        "the base changed"
    );
    check_clean(&ov);
    let (r, t) = blk("blk=verify blk_sectors=1000 blk_seed=31", &dov);
    want(&t, "blk_verify", "ok", &r);
    let o = qemu_img(&[
        "compare",
        "-q",
        "-f",
        "raw",
        "-F",
        "qcow2",
        base.to_str().unwrap(),
        ov.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "the overlay differs from its base"
    );
}

/// Runs the probe with `blk=write ... exit=halt` and SIGKILLs the VMM as soon as the guest
/// reports its flush done.
fn kill_after_flush(cmdline: &str, disk: &str) {
    let probe = probe().to_str().unwrap().to_string();
    let mut child = Command::new(vmm())
        .args(["--kernel", &probe, "--cmdline", cmdline, "--disk", disk])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ferro-vmm");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut seen = String::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains("blk_flush=") {
                    child.kill().unwrap();
                    assert!(line.contains("blk_flush=ok"), "{seen}");
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("VMM ended early: {seen}"),
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("no blk_flush= line: {seen}");
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "killed: {seen}"
    );
}

#[test]
fn kill_9_after_a_guest_flush_loses_nothing() {
    if !kvm_available("kill_9_after_a_guest_flush_loses_nothing") {
        return;
    }
    let dir = scratch("kill");
    let q = dir.join("k.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "64M"]);
    let img = raw(&dir, "k.img", 16);
    for (d, fmt) in [(&q, "qcow2"), (&img, "raw")] {
        let spec = disk(d, &format!(",format={fmt}"));
        kill_after_flush(
            "exit=halt smp=off blk=write blk_sectors=16384 blk_seed=41",
            &spec,
        );
        let (r, t) = blk("blk=verify blk_sectors=16384 blk_seed=41", &[spec]);
        want(&t, "blk_verify", "ok", &r);
        if fmt == "qcow2" {
            check_clean(d);
        }
    }
}

#[test]
fn bench_runs() {
    if !kvm_available("bench_runs") {
        return;
    }
    let dir = scratch("bench");
    let img = raw(&dir, "b.img", 64);
    let (r, t) = blk(
        "blk=bench blk_mib=16 blk_rand=500",
        &[disk(&img, ",cache=none")],
    );
    want(&t, "blk_flush", "ok", &r);
    for k in [
        "blk_seq_write_mbps",
        "blk_seq_read_mbps",
        "blk_rand_read_iops",
    ] {
        let v: u64 = t[k].parse().unwrap();
        assert!(v > 0, "{k}={v}");
    }
}
