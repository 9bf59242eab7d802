//! Backing chains: overlays over qcow2 and raw bases, two levels, overlays we create,
//! missing backing files, loops and over-deep chains.

mod common;

use common::*;
use ferro_disk::{create_qcow2_overlay, info, open, DiskError, ImageFormat, MAX_CHAIN_DEPTH};
use std::path::{Path, PathBuf};

const MIB: usize = 1 << 20;

fn overlay_qemu(
    dir: &TempDir,
    name: &str,
    backing: &str,
    fmt: &str,
    size: Option<&str>,
) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        fmt,
        p.to_str().unwrap(),
    ];
    if let Some(s) = size {
        args.push(s);
    }
    qemu_img(&args);
    p
}

fn base_raw(dir: &TempDir, len: usize) -> (PathBuf, Vec<u8>) {
    let p = dir.join("base.raw");
    let data = pattern(len, 77);
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

/// Reads fall through, writes land in the overlay, the base keeps its bytes.
fn check_overlay(dir: &TempDir, top: &Path, base: &Path, mut expect: Vec<u8>) {
    let base_hash = hash_file(base);
    let d = open(top, &rw()).unwrap();
    assert!(read_all(&*d) == expect);
    // Partial-cluster writes copy the rest of the cluster from the base.
    write_both(&*d, &mut expect, &pattern(1000, 1), 70_000);
    write_both(&*d, &mut expect, &pattern(200_000, 2), MIB as u64 - 3);
    write_both(&*d, &mut expect, &pattern(65536, 3), 3 * 65536);
    d.write_zeroes(2 * MIB as u64 + 100, 300_000, true).unwrap();
    expect[2 * MIB + 100..2 * MIB + 300_100].fill(0);
    assert!(read_all(&*d) == expect);
    d.flush().unwrap();
    drop(d);
    assert_eq!(hash_file(base), base_hash, "base changed");
    assert_clean(top);
    let exp = dir.join("expected.raw");
    std::fs::write(&exp, &expect).unwrap();
    assert_same(top, &exp);
}

#[test]
fn overlay_on_qcow2_base() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("ov-qcow2");
    let (raw, data) = base_raw(&dir, 4 * MIB);
    let base = dir.join("base.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        base.to_str().unwrap(),
    ]);
    let top = overlay_qemu(&dir, "top.qcow2", "base.qcow2", "qcow2", None);
    check_overlay(&dir, &top, &base, data);
}

#[test]
fn overlay_on_raw_base_created_by_us() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("ov-raw");
    let (raw, data) = base_raw(&dir, 4 * MIB + 512);
    let top = dir.join("top.qcow2");
    create_qcow2_overlay(&top, Path::new("base.raw")).unwrap();
    let qinfo = qemu_img(&["info", "--output=json", top.to_str().unwrap()]);
    assert!(
        qinfo.contains("\"backing-filename\": \"base.raw\""),
        "{qinfo}"
    );
    assert!(
        qinfo.contains("\"backing-filename-format\": \"raw\""),
        "{qinfo}"
    );
    assert!(
        qinfo.contains(&format!("\"virtual-size\": {}", 4 * MIB + 512)),
        "{qinfo}"
    );
    assert_clean(&top);
    let i = info(&top).unwrap();
    assert_eq!(i.format, ImageFormat::Qcow2);
    assert_eq!(i.virtual_size, 4 * MIB as u64 + 512);
    assert_eq!(i.backing_chain.len(), 1);
    assert_eq!(i.backing_chain[0].name, "base.raw");
    assert_eq!(i.backing_chain[0].path, raw);
    assert_eq!(i.backing_chain[0].format, ImageFormat::Raw);
    // Creating over an existing file is refused.
    let e = create_qcow2_overlay(&top, Path::new("base.raw")).unwrap_err();
    assert!(matches!(e, DiskError::Exists { .. }), "{e}");
    check_overlay(&dir, &top, &raw, data);
}

#[test]
fn two_level_chain() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("chain2");
    let (raw, mut expect) = base_raw(&dir, 4 * MIB);
    let mid = dir.join("mid.qcow2");
    create_qcow2_overlay(&mid, &raw).unwrap(); // absolute backing name
    {
        let d = open(&mid, &rw()).unwrap();
        write_both(&*d, &mut expect, &pattern(300_000, 5), 500_000);
        d.write_zeroes(3 * MIB as u64, 65536, true).unwrap();
        expect[3 * MIB..3 * MIB + 65536].fill(0);
    }
    let mid_hash = hash_file(&mid);
    let top = dir.join("top.qcow2");
    create_qcow2_overlay(&top, Path::new("mid.qcow2")).unwrap();
    let i = info(&top).unwrap();
    assert_eq!(i.backing_chain.len(), 2);
    assert_eq!(i.backing_chain[1].format, ImageFormat::Raw);
    let qinfo = qemu_img(&["info", "--backing-chain", top.to_str().unwrap()]);
    assert!(
        qinfo.contains("mid.qcow2") && qinfo.contains("base.raw"),
        "{qinfo}"
    );
    check_overlay(&dir, &top, &raw, expect);
    assert_eq!(hash_file(&mid), mid_hash, "middle image changed");
}

#[test]
fn base_smaller_than_overlay_reads_zeros() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("small-base");
    let (_, data) = base_raw(&dir, MIB + 1000);
    let top = overlay_qemu(&dir, "top.qcow2", "base.raw", "raw", Some("3M"));
    let mut expect = vec![0u8; 3 * MIB];
    expect[..data.len()].copy_from_slice(&data);
    let d = open(&top, &rw()).unwrap();
    assert!(read_all(&*d) == expect);
    // A write into the cluster that straddles the end of the base.
    write_both(&*d, &mut expect, &pattern(10, 9), MIB as u64 + 2000);
    assert!(read_all(&*d) == expect);
}

#[test]
fn missing_backing_file() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("missing");
    let q = dir.join("base.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "missing.qcow2",
        "-F",
        "qcow2",
        q.to_str().unwrap(),
        "1M",
    ]);
    let e = open(&q, &rw()).err().unwrap();
    assert_eq!(
        e.to_string(),
        format!("{}: backing file missing.qcow2 not found", q.display())
    );
    assert!(matches!(info(&q), Err(DiskError::BackingNotFound { .. })));
    let e = create_qcow2_overlay(&dir.join("x.qcow2"), Path::new("nope.raw")).unwrap_err();
    assert!(matches!(e, DiskError::BackingNotFound { .. }), "{e}");
}

#[test]
fn backing_loops_are_refused() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("loop");
    let a = dir.join("a.qcow2");
    let b = dir.join("b.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        a.to_str().unwrap(),
        "1M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        b.to_str().unwrap(),
        "1M",
    ]);
    let e = open(&a, &ro()).err().unwrap();
    assert!(matches!(e, DiskError::BackingLoop { .. }), "{e}");
    assert!(e.to_string().contains("loops back to"), "{e}");
    assert!(matches!(info(&a), Err(DiskError::BackingLoop { .. })));
    // An image that is its own backing file.
    let s = dir.join("self.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        s.to_str().unwrap(),
        "1M",
    ]);
    assert!(matches!(
        open(&s, &rw()),
        Err(DiskError::BackingLoop { .. })
    ));
    // The same file through another name (a hard link) is the same image.
    let h = dir.join("hard.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "hard-link.qcow2",
        "-F",
        "qcow2",
        h.to_str().unwrap(),
        "1M",
    ]);
    std::fs::hard_link(&h, dir.join("hard-link.qcow2")).unwrap();
    assert!(matches!(
        open(&h, &ro()),
        Err(DiskError::BackingLoop { .. })
    ));
}

#[test]
fn chain_depth_is_limited() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("deep");
    base_raw(&dir, MIB);
    let mut below = "base.raw".to_string();
    for i in 0..=MAX_CHAIN_DEPTH {
        let name = format!("l{i}.qcow2");
        let p = dir.join(&name);
        if i < MAX_CHAIN_DEPTH {
            create_qcow2_overlay(&p, Path::new(&below)).unwrap();
        } else {
            // One past the limit: our own create refuses it, so let qemu-img make it.
            let e = create_qcow2_overlay(&p, Path::new(&below)).unwrap_err();
            assert!(matches!(e, DiskError::ChainTooDeep { .. }), "{e}");
            overlay_qemu(&dir, &name, &below, "qcow2", None);
        }
        below = name;
    }
    // MAX_CHAIN_DEPTH backing files below the top: fine.
    let ok = dir.join(&format!("l{}.qcow2", MAX_CHAIN_DEPTH - 1));
    assert_eq!(info(&ok).unwrap().backing_chain.len(), MAX_CHAIN_DEPTH);
    let d = open(&ok, &ro()).unwrap();
    let mut buf = vec![0u8; 4096];
    d.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, pattern(MIB, 77)[..4096]);
    // One more: refused.
    let deep = dir.join(&format!("l{MAX_CHAIN_DEPTH}.qcow2"));
    let e = open(&deep, &ro()).err().unwrap();
    assert!(matches!(e, DiskError::ChainTooDeep { .. }), "{e}");
    assert!(matches!(info(&deep), Err(DiskError::ChainTooDeep { .. })));
}
