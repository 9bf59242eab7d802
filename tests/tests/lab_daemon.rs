//! The host stack end to end in the KVM lab: `ferro daemon`, the `ferro` CLI, ferro-vmm and a
//! Debian guest all inside the lab. The Debian template disk is imported, made a template, a VM
//! is created from it as a linked clone with a NIC on the daemon's bridge, boots to
//! `ferro-guest: ready`, answers HTTP at the address `ferro vm show` reports, and stops with
//! the ACPI power button; the template's base is unchanged. Driven by
//! `tests/lab/daemon_debian.sh`, the same script scripts/demo.sh runs on a PVM host.

use std::process::Command;

use ferro_tests::{build_debian_guest, console_line as line, ferro, lab_available, lab_check, vmm};

#[test]
fn daemon_runs_a_debian_vm_from_a_template_inside_the_lab() {
    if !lab_available() {
        return;
    }
    let debian = build_debian_guest();
    let which = |tool: &str| {
        let out = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .expect("sh");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (ip, qemu_img) = (which("ip"), which("qemu-img"));
    assert!(
        !ip.is_empty() && !qemu_img.is_empty(),
        "needs iproute2 and qemu-img"
    );
    let adds = [
        format!("{}:/bin/ferro-vmm", vmm().display()),
        format!("{}:/bin/ferro", ferro().display()),
        format!("{ip}:/usr/local/bin/ip"),
        format!("{qemu_img}:/usr/local/bin/qemu-img"),
        format!(
            "{}:/lab/debian.qcow2",
            debian.join("debian.qcow2").display()
        ),
        format!(
            "{}:/lab/debian-initrd.cpio.gz",
            debian.join("debian-initrd.cpio.gz").display()
        ),
    ];
    lab_check("daemon_debian.sh", &adds, 600, |console| {
        assert!(line(console, "D-FAIL").is_none(), "{console}");
        assert!(line(console, "D-done ").is_some(), "{console}");
        let addr = line(console, "D-address ").unwrap_or_default();
        assert!(addr.starts_with("10.77.0."), "address {addr:?}: {console}");
        assert!(
            line(console, "D-http ").is_some_and(|l| l.starts_with("ferro-guest: ok ")),
            "{console}"
        );
        assert_eq!(line(console, "D-state "), Some("stopped"), "{console}");
        assert_eq!(line(console, "D-base "), Some("unchanged"), "{console}");
        println!(
            "ready {} after vm create",
            line(console, "D-ready ").unwrap_or("?")
        );
    });
}
