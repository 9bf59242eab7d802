//! Live migration of a running Linux guest in the KVM lab (`tests/lab/migrate_linux.sh`): the
//! Debian kernel guest runs under ferro-vmm in one network namespace, a `ferro-vmm --incoming`
//! waits in another, each behind its own bridge joined to the lab's; an open TCP connection
//! from the lab to the guest's echo service echoes before the migration and, on the same
//! connection, after it, when the guest runs on the destination; the source ends with 0 once
//! the destination runs, and the guest's console is the destination's.

use std::path::Path;
use std::process::Command;

use ferro_tests::{build_linux_guest, console_line as line, lab_available, lab_check, repo, vmm};

/// Builds the static control-socket client the lab script uses.
fn build_ctl(out: &Path) -> Result<(), String> {
    let o = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(out)
        .arg(repo().join("tests/lab/ctl/vmm-ctl.c"))
        .output()
        .map_err(|e| format!("cc: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

#[test]
fn linux_guest_migrates_between_namespaces_with_its_tcp_connection() {
    if !lab_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ferro-lab-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ctl = dir.join("vmm-ctl");
    if let Err(e) = build_ctl(&ctl) {
        println!("SKIPPED: cannot build the static control client (cc -static): {e}");
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
        format!("{}:/bin/vmm-ctl", ctl.display()),
        format!("{ip}:/usr/local/bin/ip"),
    ];
    lab_check("migrate_linux.sh", &adds, 900, |console| {
        assert!(console.contains("lab-migrate: done"), "{console}");
        assert_eq!(line(console, "L-PING-BEFORE"), Some("ok"), "{console}");
        assert_eq!(line(console, "L-ECHO-BEFORE"), Some("ok"), "{console}");
        let answer = line(console, "L-MIGRATE ").unwrap_or_default();
        assert!(answer.contains(r#""result":"ok""#), "migrate: {console}");
        assert_eq!(line(console, "L-SOURCE rc="), Some("0"), "{console}");
        let dest = line(console, "L-DEST-STATUS ").unwrap_or_default();
        assert!(
            dest.contains(r#""state":"running""#),
            "destination: {console}"
        );
        // The same TCP connection, served by the guest on the destination.
        assert_eq!(line(console, "L-ECHO-AFTER"), Some("ok"), "{console}");
        // The network found the guest's new port both ways (its RARP announce, its own ping).
        assert_eq!(line(console, "L-PING-AFTER"), Some("ok"), "{console}");
        assert!(console.contains("B: G-GPING rc=0"), "{console}");
        assert!(console.contains("B: G-ON-DEST "), "{console}");
        assert_eq!(line(console, "L-DEST rc="), Some("0"), "{console}");
    });
    let _ = std::fs::remove_dir_all(&dir);
}
