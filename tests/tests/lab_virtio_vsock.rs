//! virtio-vsock under a stock Linux guest, in the KVM lab: Linux's vmw_vsock_virtio_transport
//! talks to `ferro-vmm --vsock cid=3,uds=...` both ways — the lab connects through the unix
//! socket with `CONNECT 1234` to an echo listener in the guest, and the guest connects to CID 2
//! port 5000, reaching a listener on `uds_5000`. The guest has no vsock tools, so
//! `tests/lab/vsock/vsock-tool.c` is built static here and appended to its initramfs as a
//! second cpio archive. Driven by `tests/lab/virtio_vsock.sh`.

use std::path::Path;
use std::process::Command;

use ferro_tests::{build_linux_guest, console_line as line, lab_available, lab_check, repo, vmm};

/// Builds vsock-tool (static) and a newc archive holding it as /bin/vsock-tool, in `dir`.
fn build_tool(dir: &Path) -> Result<(), String> {
    let src = repo().join("tests/lab/vsock/vsock-tool.c");
    let root = dir.join("root/bin");
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let out = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(root.join("vsock-tool"))
        .arg(&src)
        .output()
        .map_err(|e| format!("cc: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg("cd root && echo bin/vsock-tool | cpio -o -H newc > ../vs.cpio 2>/dev/null")
        .current_dir(dir)
        .output()
        .map_err(|e| format!("cpio: {e}"))?;
    if !out.status.success() {
        return Err("cpio failed".into());
    }
    Ok(())
}

#[test]
fn linux_guest_talks_vsock_both_ways() {
    if !lab_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ferro-lab-vsock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = build_tool(&dir) {
        println!("SKIPPED: cannot build the static vsock tool (cc -static, cpio): {e}");
        return;
    }
    build_linux_guest();
    let add_vmm = format!("{}:/bin/ferro-vmm", vmm().display());
    let add_tool = format!(
        "{}:/bin/vsock-tool",
        dir.join("root/bin/vsock-tool").display()
    );
    let add_cpio = format!("{}:/lab/vs.cpio", dir.join("vs.cpio").display());
    let dir_keep = dir.clone();
    let adds = [add_vmm, add_tool, add_cpio];
    lab_check("virtio_vsock.sh", &adds, 600, |console| {
        assert!(console.contains("lab-virtio-vsock: done"), "{console}");
        assert_eq!(line(console, "L-VMM rc="), Some("0"), "{console}");
        assert!(
            line(console, "G-VSOCK-DEV ").is_some_and(|l| l.contains("0x0013")),
            "{console}"
        );
        // Host to guest: OK line, then the guest's echo.
        assert!(
            line(console, "L-VS-OK-LINE ").is_some_and(|l| l.starts_with("OK ")),
            "{console}"
        );
        assert_eq!(
            line(console, "L-VS-ECHO "),
            Some("hello-from-the-lab"),
            "{console}"
        );
        assert_eq!(line(console, "VS-ECHOED "), Some("18"), "{console}");
        // Guest to host.
        assert_eq!(
            line(console, "L-VS-SERVED "),
            Some("hello-from-the-guest"),
            "{console}"
        );
        assert_eq!(
            line(console, "VS-REPLY "),
            Some("re:hello-from-the-guest"),
            "{console}"
        );
    });
    let _ = std::fs::remove_dir_all(&dir_keep);
}
