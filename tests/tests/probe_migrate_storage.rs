//! Storage migration on /dev/kvm (no shared storage): the source VMM is asked
//! `{"cmd":"migrate", ..., "copy_storage": true}` and the destination `ferro-vmm --incoming ...
//! --incoming-storage DIR` writes the disk, the kernel and the initrd into DIR. The probe
//! writes its test pattern over a disk while the VM moves, then reads it back: on the
//! destination, from the copy. A disk block the copy missed, or a write made during the copy
//! that was not sent again, fails the guest's own check and the host's check of the copy.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferro_tests::{blk_pattern_word, kvm_available, probe, vmm};

#[allow(dead_code)] // the harness serves probe_migrate.rs too
#[path = "probe_migrate/harness.rs"]
mod harness;

use harness::{migrate, scratch, ticks, Vmm};

/// The first sector of `[0, sectors)` of `disk` that does not hold the pattern.
fn first_bad_sector(disk: &Path, sectors: u64) -> Option<u64> {
    let f = std::fs::File::open(disk).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let per = buf.len() as u64 / 512;
    let mut s0 = 0;
    while s0 < sectors {
        let n = per.min(sectors - s0);
        f.read_exact_at(&mut buf[..(n * 512) as usize], s0 * 512)
            .unwrap();
        for s in 0..n {
            for w in 0..64 {
                let at = (s * 512 + w * 8) as usize;
                let got = u64::from_le_bytes(buf[at..at + 8].try_into().unwrap());
                if got != blk_pattern_word(1, s0 + s, w) {
                    return Some(s0 + s);
                }
            }
        }
        s0 += n;
    }
    None
}

fn destination_with_storage(dir: &Path, storage: &Path) -> (Vmm, u16) {
    let mut cmd = Command::new(vmm());
    cmd.args(["--incoming", "tcp:127.0.0.1:0", "--incoming-storage"])
        .arg(storage);
    Vmm::destination_from(&mut cmd, dir)
}

#[test]
fn storage_migration_moves_a_disk_the_guest_is_writing() {
    if !kvm_available("storage_migration_moves_a_disk_the_guest_is_writing") {
        return;
    }
    let dir = scratch("storage");
    let src_dir = dir.join("src");
    std::fs::create_dir_all(&src_dir).unwrap();
    // The source's own copy of the kernel: the destination must get its bytes from the stream.
    let kernel = src_dir.join("probe");
    std::fs::copy(probe(), &kernel).unwrap();
    // 512 MiB the guest writes (one request at a time: slower than the copy), and 16 MiB past it with data the guest never touches.
    let sectors: u64 = 1 << 20;
    let disk = src_dir.join("disk.raw");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len((sectors * 512) + (16 << 20)).unwrap();
    let tail: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8 + 1).collect();
    f.write_all_at(&tail, sectors * 512 + (8 << 20)).unwrap();
    drop(f);
    let dst_dir = dir.join("dst");
    let (mut dst, port) = destination_with_storage(&dir, &dst_dir);
    let mut cmd = Command::new(vmm());
    cmd.args(["--kernel", kernel.to_str().unwrap(), "--cmdline"])
        .arg(format!("smp=off blk=write blk_sectors={sectors} blk_qd=1"))
        .args(["--memory", "128", "--disk"])
        .arg(format!("path={}", disk.display()))
        .env("FERRO_MIGRATE_VERIFY", "1");
    let mut src = Vmm::spawn(&mut cmd, dir.join("src.sock"));
    src.wait_line("blk_capacity=");
    // Few rounds: the guest writes faster than a round converges, so the pause comes while it
    // is still writing and the destination finishes the job on the copy.
    let answer = migrate(&src, port, r#","copy_storage":true,"max_rounds":4"#);
    let r = &answer[0];
    assert_eq!(
        r["result"],
        "ok",
        "{r}\n{}\n{:?}\ndst: {}",
        src.stderr(),
        src.lines(),
        dst.stderr()
    );
    let m = &r["status"]["migration"];
    assert!(
        m["disk_bytes"].as_u64().unwrap() > 16 << 20,
        "disk contents sent: {m}"
    );
    assert_eq!(
        src.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        src.stderr()
    );
    assert_eq!(
        dst.wait(Duration::from_secs(120)),
        Some(0),
        "{}",
        dst.stderr()
    );
    let (src_lines, dst_lines) = (src.lines().join("\n"), dst.lines().join("\n"));
    assert!(
        dst_lines.contains("blk_verify=ok"),
        "the guest's read-back on the destination: src {src_lines}\ndst {dst_lines}"
    );
    assert!(
        !src_lines.contains("blk_verify"),
        "the guest finished before it moved: the copy was never raced\n{src_lines}"
    );
    // The host's check of the copy: the pattern everywhere the guest wrote, the untouched
    // data after it, the kernel's bytes.
    let copy = dst_dir.join("disk0.raw");
    assert_eq!(first_bad_sector(&copy, sectors), None);
    let f = std::fs::File::open(&copy).unwrap();
    assert_eq!(f.metadata().unwrap().len(), sectors * 512 + (16 << 20));
    let mut got = vec![0u8; tail.len()];
    f.read_exact_at(&mut got, sectors * 512 + (8 << 20))
        .unwrap();
    assert!(got == tail, "the data the guest never touched");
    assert_eq!(
        std::fs::read(dst_dir.join("kernel")).unwrap(),
        std::fs::read(&kernel).unwrap()
    );
    println!(
        "storage migration, guest writing 512 MiB: total {} ms, downtime {} ms, {} MiB sent ({} MiB of disk), {} rounds",
        m["total_ms"],
        m["downtime_ms"],
        m["bytes"].as_u64().unwrap() >> 20,
        m["disk_bytes"].as_u64().unwrap() >> 20,
        m["rounds"]
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_refused_storage_migration_leaves_both_sides_as_they_were() {
    if !kvm_available("a_refused_storage_migration_leaves_both_sides_as_they_were") {
        return;
    }
    let dir = scratch("storage-refused");
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    // A file of the destination's names already there: it is refused, never overwritten.
    let dst_dir = dir.join("dst");
    std::fs::create_dir_all(&dst_dir).unwrap();
    std::fs::write(dst_dir.join("disk0.raw"), b"someone's data").unwrap();
    let (mut dst, port) = destination_with_storage(&dir, &dst_dir);
    let src = Vmm::source(
        &dir,
        "count=1000",
        &[
            "--memory",
            "64",
            "--disk",
            &format!("path={}", disk.display()),
        ],
    );
    src.wait_tick(5);
    let answer = migrate(&src, port, r#","copy_storage":true"#);
    let r = &answer[0];
    assert_eq!(r["result"], "error", "{r}");
    let msg = r["message"].as_str().unwrap_or_default();
    assert!(msg.contains("disk0.raw"), "{msg}");
    assert_eq!(
        dst.wait(Duration::from_secs(10)),
        Some(1),
        "{}",
        dst.stderr()
    );
    assert_eq!(
        std::fs::read(dst_dir.join("disk0.raw")).unwrap(),
        b"someone's data"
    );
    let names: Vec<_> = std::fs::read_dir(&dst_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["disk0.raw"], "the refused copy left files");
    // The source runs on and still counts.
    let at = ticks(&src.lines()).last().unwrap().tick;
    src.wait_tick(at + 3);
    assert_eq!(
        src.request(r#"{"cmd":"status"}"#)["status"]["state"],
        "running"
    );

    // A destination without --incoming-storage refuses a storage migration, and one with it
    // refuses a shared-storage one: each says what is missing.
    let (mut plain, port) = Vmm::destination(&dir);
    let r = &migrate(&src, port, r#","copy_storage":true"#)[0];
    assert_eq!(r["result"], "error", "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("--incoming-storage"),
        "{r}"
    );
    assert_eq!(plain.wait(Duration::from_secs(10)), Some(1));
    let (mut other, port) = destination_with_storage(&dir, &dir.join("dst2"));
    let r = &migrate(&src, port, "")[0];
    assert_eq!(r["result"], "error", "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("shared storage"),
        "{r}"
    );
    assert_eq!(other.wait(Duration::from_secs(10)), Some(1));
    assert_eq!(
        src.request(r#"{"cmd":"status"}"#)["status"]["state"],
        "running"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
