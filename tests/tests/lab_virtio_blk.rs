//! virtio-blk under a stock Linux guest, in the KVM lab (`tests/lab/virtio_blk.sh`): a raw
//! disk, a qcow2 disk and a read-only disk appear as /dev/vda, /dev/vdb and /dev/vdc with
//! their sizes, serial and read-only flag; data written and synced in one boot reads back in
//! the next, also when the VMM was killed with SIGKILL right after the guest's `sync`; the
//! read-only disk refuses writes and its file is unchanged; `qemu-img check` finds the qcow2
//! clean after every boot.

use ferro_tests::{build_linux_guest, console_line as line, lab_available, lab_check, vmm};

/// The md5 on a `PREFIX <hash>  -` line.
fn md5<'a>(console: &'a str, prefix: &str) -> &'a str {
    line(console, prefix)
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {prefix} line: {console}"))
}

#[test]
fn linux_guest_uses_virtio_blk_disks() {
    if !lab_available() {
        return;
    }
    build_linux_guest();
    let add = format!("{}:/bin/ferro-vmm", vmm().display());
    let adds = [add, "/usr/bin/qemu-img:/bin/qemu-img".to_string()];
    lab_check("virtio_blk.sh", &adds, 900, |console| {
        assert!(console.contains("lab-virtio-blk: done"), "{console}");
        for boot in ["write", "read", "read2"] {
            assert_eq!(
                line(console, &format!("L-{boot} rc=")),
                Some("0"),
                "{console}"
            );
        }
        assert_eq!(line(console, "L-kill killed"), Some(""), "{console}");
        assert!(console.contains("G-END"), "{console}");

        // The disks, in order, with their sizes (sectors), read-only flags and serial.
        assert_eq!(
            line(console, "G-DISK vda "),
            Some("size=32768 ro=0 serial=FERRO-RAW"),
            "{console}"
        );
        let vdb = line(console, "G-DISK vdb ").unwrap_or_default();
        assert!(vdb.starts_with("size=65536 ro=0 serial="), "{console}");
        let vdc = line(console, "G-DISK vdc ").unwrap_or_default();
        assert!(vdc.starts_with("size=8192 ro=1 "), "{console}");

        // Written, synced, powered off: the next boot reads the same bytes from both disks.
        assert_eq!(line(console, "G-W-VDA rc="), Some("0"), "{console}");
        assert_eq!(line(console, "G-W-VDB rc="), Some("0"), "{console}");
        assert_eq!(line(console, "G-SYNC rc="), Some("0"), "{console}");
        let pat = md5(console, "G-PAT ");
        assert_eq!(md5(console, "G-R-VDA "), pat, "raw disk: {console}");
        assert_eq!(md5(console, "G-R-VDB "), pat, "qcow2 disk: {console}");

        // kill -9 right after the guest's sync: nothing the guest synced is lost.
        assert_eq!(line(console, "G-W2-VDB rc="), Some("0"), "{console}");
        assert_eq!(
            md5(console, "G-R2-VDB "),
            md5(console, "G-PAT2 "),
            "{console}"
        );

        // The read-only disk refused the write; its content and file are unchanged.
        assert_ne!(line(console, "G-W-VDC rc="), Some("0"), "{console}");
        let ro = md5(console, "L-RO-BEFORE ");
        assert_eq!(md5(console, "G-R-VDC-ONLINE "), ro, "{console}");
        assert_eq!(md5(console, "L-RO-AFTER "), ro, "{console}");

        // qemu-img check after every boot, including the killed one.
        for boot in ["write", "read", "kill", "read2"] {
            let c = line(console, &format!("L-{boot} qcow2-check:")).unwrap_or_default();
            assert!(c.contains("No errors were found"), "{boot}: {c}");
        }
    });
}
