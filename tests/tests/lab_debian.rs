//! The Debian template guest (bookworm, systemd, root on virtio-blk) under ferro-vmm, in the KVM
//! lab: it boots from a qcow2 overlay on the read-only template base to `ferro-guest: ready`;
//! the lab reaches its TCP echo and HTTP services over a tap and pings it; a file written and
//! synced before power-off is there on the next boot; the base's bytes do not change; both
//! power-offs end ferro-vmm with status 0. Driven by `tests/lab/debian_disk.sh`.

use std::process::Command;

use ferro_tests::{build_debian_guest, console_line as line, lab_available, lab_check, vmm};

#[test]
fn debian_template_boots_from_a_qcow2_overlay_serves_tcp_and_keeps_its_writes() {
    if !lab_available() {
        return;
    }
    let debian = build_debian_guest();
    let dir = std::env::temp_dir().join(format!("ferro-lab-debian-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let overlay = dir.join("vm.qcow2");
    // The overlay names its base by the path it will have inside the lab (-u: not opened here).
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-u", "-b"])
        .arg("/lab/debian.qcow2")
        .arg(&overlay)
        .arg("1G")
        .output()
        .expect("run qemu-img");
    assert!(out.status.success(), "qemu-img create: {out:?}");

    let adds = [
        format!("{}:/bin/ferro-vmm", vmm().display()),
        format!(
            "{}:/lab/debian.qcow2",
            debian.join("debian.qcow2").display()
        ),
        format!(
            "{}:/lab/debian-initrd.cpio.gz",
            debian.join("debian-initrd.cpio.gz").display()
        ),
        format!("{}:/lab/vm.qcow2", overlay.display()),
    ];
    // The overlay stays until both attempts are over: a retry boots from it again.
    lab_check("debian_disk.sh", &adds, 900, |console| {
        assert!(console.contains("lab-debian-disk: done"), "{console}");
        assert!(
            line(console, "L-READY1 ").is_some(),
            "no first boot: {console}"
        );
        assert_eq!(line(console, "L-ECHO "), Some("hello-ferro"), "{console}");
        assert!(
            line(console, "L-HTTP ").is_some_and(|l| l.starts_with("ferro-guest: ok ")),
            "{console}"
        );
        assert_eq!(line(console, "L-PING "), Some("ok"), "{console}");
        assert_eq!(
            line(console, "G-WROTE "),
            Some("ferro-persist-42"),
            "{console}"
        );
        assert_eq!(line(console, "L-VMM1 rc="), Some("0"), "{console}");
        assert!(
            line(console, "L-READY2 ").is_some(),
            "no second boot: {console}"
        );
        assert_eq!(
            line(console, "G-READ "),
            Some("ferro-persist-42"),
            "{console}"
        );
        assert_eq!(line(console, "L-VMM2 rc="), Some("0"), "{console}");
        let before = line(console, "L-BASE-MD5-BEFORE ");
        assert!(before.is_some_and(|m| m.len() == 32), "{console}");
        assert_eq!(before, line(console, "L-BASE-MD5-AFTER "), "{console}");
    });
    let _ = std::fs::remove_dir_all(&dir);
}
