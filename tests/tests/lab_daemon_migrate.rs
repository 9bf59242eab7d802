//! Live migration between two hosts' daemons in the KVM lab (`tests/lab/daemon_migrate.sh`):
//! `ferro daemon` A and B, each in its own network namespace with its own bridge (joined to the
//! lab's by veths) and TCP API; a Debian-kernel guest created and started on A gets an address
//! from A's pool and serves TCP echo; the lab holds one TCP connection to it while
//! `ferro vm migrate web --to http://B` runs; afterwards B runs the VM, A has none, and the
//! same connection echoes again.

use std::process::Command;

use ferro_tests::{build_linux_guest, console_line as line, ferro, lab_available, lab_check, vmm};

#[test]
fn daemons_in_two_namespaces_migrate_a_linux_guest_with_its_tcp_connection() {
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
    ];
    lab_check("daemon_migrate.sh", &adds, 900, |console| {
        assert!(line(console, "M-FAIL").is_none(), "{console}");
        assert!(console.contains("M-done"), "{console}");
        let addr = line(console, "M-address ").unwrap_or_default();
        assert!(addr.starts_with("10.99.0."), "address {addr:?}: {console}");
        assert_eq!(line(console, "M-echo-before"), Some("ok"), "{console}");
        assert_eq!(line(console, "M-migrate rc="), Some("0"), "{console}");
        assert!(
            line(console, "M-migrate-output ").is_some_and(|o| o.contains("migrated web")),
            "{console}"
        );
        assert_eq!(
            line(console, "M-a-has "),
            Some("0"),
            "A keeps no VM: {console}"
        );
        assert_eq!(line(console, "M-b-state "), Some("running"), "{console}");
        // The same TCP connection, now to the guest on B, and the network found it there.
        assert_eq!(line(console, "M-echo-after"), Some("ok"), "{console}");
        assert_eq!(line(console, "M-ping-after"), Some("ok"), "{console}");
        assert_eq!(
            line(console, "M-b-after-stop "),
            Some("stopped"),
            "{console}"
        );
    });
}
