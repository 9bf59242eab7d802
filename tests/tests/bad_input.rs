//! Bad input gets one clear line on stderr and exit status 1 — never a panic, never a VM.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ferro_tests::{kvm_available, probe, run_vmm, vmm, Run};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferro-bad-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn assert_clean_error(r: &Run, needle: &str) {
    assert_eq!(r.code, Some(1), "stdout {}\nstderr {}", r.stdout, r.stderr);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {:?}", r.stderr);
    assert!(lines[0].starts_with("ferro-vmm: "), "{}", lines[0]);
    assert!(lines[0].contains(needle), "{:?} lacks {needle:?}", lines[0]);
    assert!(!r.stderr.contains("panicked"));
    assert!(r.stdout.is_empty(), "no guest may have run: {}", r.stdout);
}

/// A value clap could not parse: clap reports it itself, with status 2, and no guest runs.
fn assert_rejected_by_clap(r: &Run, needle: &str) {
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains(needle), "{:?} lacks {needle:?}", r.stderr);
    assert!(!r.stderr.contains("panicked"));
    assert!(r.stdout.is_empty(), "no guest may have run: {}", r.stdout);
}

fn run(args: &[&str]) -> Run {
    run_vmm(args, Duration::from_secs(30))
}

#[test]
fn missing_kernel() {
    let r = run(&["--kernel", "/nonexistent/vmlinux"]);
    assert_clean_error(&r, "cannot read kernel /nonexistent/vmlinux");
}

#[test]
fn kernel_is_a_directory() {
    let d = scratch("dir");
    let r = run(&["--kernel", d.to_str().unwrap()]);
    assert_clean_error(&r, "not a regular file");
}

#[test]
fn unreadable_kernel() {
    // Root reads any file, so drop to nobody for this one.
    if unsafe_is_root() && Command::new("setpriv").arg("--help").output().is_ok() {
        let d = scratch("perm");
        let k = d.join("kernel");
        std::fs::copy(probe(), &k).unwrap();
        std::fs::set_permissions(&k, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(vmm())
            .args(["--kernel", k.to_str().unwrap()])
            .output()
            .unwrap();
        let r: Run = out.into();
        assert_clean_error(&r, "Permission denied");
    }
}

fn unsafe_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn file_that_is_no_kernel() {
    let d = scratch("nokernel");
    let k = d.join("notes.txt");
    std::fs::write(&k, vec![b'x'; 4096]).unwrap();
    let r = run(&["--kernel", k.to_str().unwrap()]);
    assert_clean_error(&r, "is not a kernel");
    let empty = d.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let r = run(&["--kernel", empty.to_str().unwrap()]);
    assert_clean_error(&r, "is not a kernel");
}

#[test]
fn truncated_elf_kernel() {
    if !kvm_available("truncated_elf_kernel") {
        return;
    }
    let d = scratch("trunc");
    let k = d.join("probe-cut");
    let bytes = std::fs::read(probe()).unwrap();
    std::fs::write(&k, &bytes[..100]).unwrap();
    let r = run(&["--kernel", k.to_str().unwrap()]);
    assert_clean_error(&r, "cannot load kernel");
}

#[test]
fn initrd_that_does_not_fit() {
    if !kvm_available("initrd_that_does_not_fit") {
        return;
    }
    let d = scratch("initrd");
    let rd = d.join("big.img");
    let f = std::fs::File::create(&rd).unwrap();
    f.set_len(300 << 20).unwrap();
    let r = run(&[
        "--kernel",
        probe().to_str().unwrap(),
        "--initrd",
        rd.to_str().unwrap(),
        "--memory",
        "256",
    ]);
    assert_clean_error(&r, "does not fit");
}

#[test]
fn missing_initrd() {
    let r = run(&[
        "--kernel",
        probe().to_str().unwrap(),
        "--initrd",
        "/nonexistent/initrd",
    ]);
    assert_clean_error(&r, "cannot read initrd");
}

#[test]
fn vcpus_out_of_range() {
    for n in ["0", "33"] {
        let r = run(&["--kernel", probe().to_str().unwrap(), "--cpus", n]);
        assert_clean_error(&r, "out of range");
    }
}

#[test]
fn memory_out_of_range_or_malformed() {
    for m in ["8", "2T"] {
        let r = run(&["--kernel", probe().to_str().unwrap(), "--memory", m]);
        assert_clean_error(&r, "out of range");
    }
    let r = run(&["--kernel", probe().to_str().unwrap(), "--memory", "lots"]);
    assert_rejected_by_clap(&r, "is not a size");
}

#[test]
fn huge_pages_setting_not_understood() {
    let r = run(&[
        "--kernel",
        probe().to_str().unwrap(),
        "--huge-pages",
        "always",
    ]);
    assert_rejected_by_clap(&r, "--huge-pages 'always' is not one of auto, on, off");
}

#[test]
fn bad_config_file() {
    let d = scratch("cfg");
    let f = d.join("vm.toml");
    std::fs::write(&f, "kernel = 42\n").unwrap();
    let r = run(&["--config", f.to_str().unwrap()]);
    assert_clean_error(&r, "is invalid");
}

#[test]
fn no_dev_kvm() {
    // A private mount namespace with an empty /dev: the real "no KVM here" case.
    let ok = Command::new("unshare")
        .args(["--mount", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("SKIPPED: cannot create a mount namespace (no_dev_kvm)");
        return;
    }
    let script = format!(
        "mount -t tmpfs none /dev && exec {} --kernel {}",
        vmm().display(),
        probe().display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let r: Run = out.into();
    assert_clean_error(&r, "/dev/kvm does not exist");
}

#[test]
fn no_permission_on_dev_kvm() {
    if !kvm_available("no_permission_on_dev_kvm") || !unsafe_is_root() {
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(vmm())
        .args(["--kernel", probe().to_str().unwrap()])
        .output();
    let Ok(out) = out else {
        println!("SKIPPED: no setpriv (no_permission_on_dev_kvm)");
        return;
    };
    let r: Run = out.into();
    // /dev/kvm is 0600 root here; a world-accessible one would let nobody in.
    if r.code == Some(0) {
        println!("SKIPPED: /dev/kvm is open to everyone (no_permission_on_dev_kvm)");
        return;
    }
    assert_clean_error(&r, "no permission to open /dev/kvm");
}

/// `--disk` images that cannot be used: one line naming the file, exit 1, no guest output.
#[test]
fn bad_disk_images() {
    let d = scratch("disks");
    let k = probe().to_str().unwrap().to_string();
    let disk_run = |spec: String| run(&["--kernel", &k, "--disk", &spec]);

    let missing = d.join("missing.img");
    let r = disk_run(format!("path={}", missing.display()));
    assert_clean_error(&r, &format!("{}: cannot open", missing.display()));

    // A qcow2 header whose cluster size is absurd.
    let corrupt = d.join("corrupt.qcow2");
    let mut hdr = vec![0u8; 512];
    hdr[0..4].copy_from_slice(b"QFI\xfb");
    hdr[4..8].copy_from_slice(&3u32.to_be_bytes());
    hdr[20..24].copy_from_slice(&40u32.to_be_bytes());
    hdr[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
    std::fs::write(&corrupt, &hdr).unwrap();
    let r = disk_run(format!("path={}", corrupt.display()));
    assert_clean_error(&r, &corrupt.display().to_string());

    // Not qcow2 at all, opened as qcow2.
    let text = d.join("text.img");
    std::fs::write(&text, vec![b'x'; 4096]).unwrap();
    let r = disk_run(format!("path={},format=qcow2", text.display()));
    assert_clean_error(&r, "not a qcow2 image");

    // A qcow2 overlay whose backing file is gone.
    if Command::new("qemu-img").arg("--version").output().is_ok() {
        let base = d.join("base.img");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let ov = d.join("ov.qcow2");
        let o = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(&ov)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        std::fs::remove_file(&base).unwrap();
        let r = disk_run(format!("path={}", ov.display()));
        assert_clean_error(&r, "backing file");
    } else {
        println!("SKIPPED: no qemu-img (bad_disk_images: missing backing file)");
    }

    // Bad option values never reach the VMM's disk code.
    let r = disk_run(format!("path={},cache=sometimes", missing.display()));
    assert_eq!(r.code, Some(2), "clap rejects it: {}", r.stderr);
    assert!(r.stdout.is_empty());
}
