//! Storage migration between two hosts' daemons in the KVM lab
//! (`tests/lab/daemon_migrate_storage.sh`): daemons A and B have separate data directories
//! and network namespaces, and B's mount namespace hides A's files. A Debian-kernel guest
//! whose kernel, initrd and disk exist only on A keeps writing checksummable generations to
//! its disk (each with fsync) while `ferro vm migrate web --to http://B --copy-storage` runs;
//! afterwards B runs the VM from its own copies, the lab's TCP connection to the guest echoes
//! again, every generation written before, during and after the migration reads back (in the
//! guest with its page cache dropped, in B's disk file, and after a fresh boot on B), the
//! lab's random data on the disk is intact, and A's folder for the VM is gone.

use std::process::Command;

use ferro_tests::{build_linux_guest, console_line as line, ferro, lab_available, lab_check, vmm};

/// Ring slots of the writer (`SLOTS` in the script).
const SLOTS: u64 = 1024;

/// The number in a console line, or a test failure that shows the console.
fn num(console: &str, prefix: &str) -> u64 {
    line(console, prefix)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number on a {prefix:?} line: {console}"))
}

/// The lab uptime at the end of a `... at SECONDS` line.
fn at(console: &str, prefix: &str) -> f64 {
    line(console, prefix)
        .and_then(|v| v.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no time on a {prefix:?} line: {console}"))
}

/// The number just before `word` in `text` (`2 rounds` → 2).
fn before(text: &str, word: &str) -> Option<u64> {
    let w: Vec<&str> = text.split_whitespace().collect();
    let i = w.iter().position(|t| t.trim_end_matches(',') == word)?;
    w.get(i.checked_sub(1)?)?.parse().ok()
}

/// The number just after `word` in `text` (`downtime 408` → 408).
fn after(text: &str, word: &str) -> Option<u64> {
    let w: Vec<&str> = text.split_whitespace().collect();
    let i = w.iter().position(|t| *t == word)?;
    w.get(i + 1)?.parse().ok()
}

#[test]
fn storage_migration_of_a_writing_linux_guest_between_daemons_without_shared_files() {
    if !lab_available() {
        return;
    }
    let ip = Command::new("sh")
        .args(["-c", "command -v ip"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    assert!(!ip.is_empty(), "needs iproute2's ip");
    build_linux_guest();
    let adds = [
        format!("{}:/bin/ferro-vmm", vmm().display()),
        format!("{}:/bin/ferro", ferro().display()),
        format!("{ip}:/usr/local/bin/ip"),
        // `ferro vm clone` (the VM's disk in A's folder) runs qemu-img.
        "/usr/bin/qemu-img:/bin/qemu-img".to_string(),
    ];
    // A quiet run takes ~45 s, a loaded one ~85 s: a run that hangs fails well before the
    // retry's time is gone.
    lab_check("daemon_migrate_storage.sh", &adds, 420, |console| {
        assert!(line(console, "S-FAIL").is_none(), "{console}");
        assert!(console.contains("S-done"), "{console}");
        // B cannot see A's kernel, initrd, disk or data directory; the lab can.
        let sees = line(console, "S-b-sees ").unwrap_or_default();
        assert!(
            sees.starts_with("0 of A's files, the lab 3"),
            "{sees}: {console}"
        );
        let own = line(console, "S-a-folder-before ").unwrap_or_default();
        assert!(own.contains("disk0.qcow2"), "A's folder: {own}: {console}");
        assert_eq!(line(console, "S-writer "), Some("started"), "{console}");
        assert_eq!(line(console, "S-echo-before"), Some("ok"), "{console}");

        assert_eq!(line(console, "S-migrate rc="), Some("0"), "{console}");
        let out = line(console, "S-migrate-output ").unwrap_or_default();
        assert!(out.starts_with("migrated web"), "{console}");
        let rounds = before(out, "rounds").expect("rounds");
        let kib = before(out, "KiB").expect("KiB");
        let vmm_ms = before(out, "ms").expect("VMM ms");
        let downtime = after(out, "downtime").expect("downtime");
        let all_ms = out
            .split(", ")
            .last()
            .and_then(|s| before(s, "ms"))
            .expect("daemon ms");
        // The disk's data (4 MiB ring, 32 MiB random) and the kernel and initrd went too.
        assert!(kib > 36 << 10, "only {kib} KiB sent: {console}");
        assert!(rounds >= 2, "{console}");

        // A forgot the VM and deleted its folder; B runs it from B's own files.
        assert_eq!(line(console, "S-a-has "), Some("0"), "{console}");
        assert_eq!(line(console, "S-a-folder "), Some("gone"), "{console}");
        assert_eq!(line(console, "S-b-state "), Some("running"), "{console}");
        let b_dir = "/tmp/data-b/vms/web";
        assert_eq!(
            line(console, "S-b-kernel "),
            Some(format!("{b_dir}/kernel").as_str()),
            "{console}"
        );
        assert_eq!(
            line(console, "S-b-disk "),
            Some(format!("{b_dir}/disk0.raw").as_str()),
            "{console}"
        );
        assert_eq!(line(console, "S-b-kernel-same"), Some("yes"), "{console}");
        assert_eq!(line(console, "S-b-initrd-same"), Some("yes"), "{console}");
        // The same TCP connection, now to the guest on B.
        assert_eq!(line(console, "S-echo-after"), Some("ok"), "{console}");

        // Generations: 1..=n0 before the migration was asked for, n0+1..first-1 finished on A
        // while it ran, first..=last on B. None was overwritten (no ring wrap), so the check
        // covers all three.
        let n0 = num(console, "S-count-before ");
        let n1 = num(console, "S-count-after ");
        let first = num(console, "S-b-first ");
        let last = num(console, "S-guest-stopped ");
        assert!(
            n0 >= 5,
            "the writer wrote {n0} generations before: {console}"
        );
        assert!(
            first >= n0 + 2,
            "no write finished on A during the migration (before {n0}, first on B {first}): {console}"
        );
        assert!(n0 <= n1 && n1 <= last && first <= last, "{console}");
        assert!(
            last < SLOTS,
            "{last} generations: the ring wrapped: {console}"
        );
        assert_eq!(line(console, "S-b-fails "), Some("0"), "{console}");

        let rest = line(console, "S-rest-md5 ").expect("rest md5");
        let want = format!("n={last} ring=ok slots=0 first=- rest={rest}");
        assert_eq!(
            line(console, "S-guest-verify "),
            Some(want.as_str()),
            "the guest on B: {console}"
        );
        assert_eq!(
            line(console, "S-b-after-stop "),
            Some("stopped"),
            "{console}"
        );
        assert_eq!(
            line(console, "S-file-verify "),
            Some(want.as_str()),
            "B's disk file: {console}"
        );
        assert_eq!(
            line(console, "S-reboot-verify "),
            Some(want.as_str()),
            "a fresh boot on B: {console}"
        );

        let secs = at(console, "S-count-after ") - at(console, "S-count-before ");
        println!(
            "lab storage migration (256 MiB guest, 64 MiB disk: 36 MiB of data): {rounds} rounds, \
             {kib} KiB, VMM {vmm_ms} ms, downtime {downtime} ms, daemon operation {all_ms} ms"
        );
        println!(
            "guest writes: {n0} before, {} finished on A during the migration, {} on B \
             ({:.1} writes/s across the migrate command); all {last} verified on B",
            first - 1 - n0,
            last + 1 - first,
            (n1 - n0) as f64 / secs.max(0.001)
        );
        // The source VMM's last progress report that has the disks' figures.
        let progress = line(console, "S-migrate-progress ").unwrap_or_default();
        if let Some(last) = progress.split('|').rfind(|p| p.contains("disks:")) {
            println!("last progress report: {last}");
        }
        println!(
            "guest check on B took {} s",
            line(console, "S-guest-verify-s ").unwrap_or("?")
        );
    });
}
