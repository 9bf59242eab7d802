//! Corrupt and hostile images give errors, never panics: truncated and garbage headers,
//! absurd table sizes, cluster offsets past the end of the file, random byte flips.

mod common;

use common::*;
use ferro_disk::{info, open, BlockBackend, DiskError, ImageFormat, OpenOptions};
use std::path::{Path, PathBuf};

const MIB: usize = 1 << 20;

fn qcow2_opts(readonly: bool) -> OpenOptions {
    OpenOptions {
        format: Some(ImageFormat::Qcow2),
        readonly,
        direct: false,
    }
}

/// A qemu-made image with 4 KiB clusters (metadata spread over many clusters).
fn sample(dir: &TempDir) -> (PathBuf, Vec<u8>) {
    sample_with(dir, &[])
}

fn sample_with(dir: &TempDir, extra: &[&str]) -> (PathBuf, Vec<u8>) {
    let raw = dir.join("s.raw");
    let mut data = pattern(MIB, 3);
    data[300_000..500_000].fill(0);
    // Text that compresses, for images converted with -c.
    data[600_000..800_000].copy_from_slice(&b"0123456789".repeat(20_000));
    std::fs::write(&raw, &data).unwrap();
    let q = dir.join("sample.qcow2");
    let mut args = vec![
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[raw.to_str().unwrap(), q.to_str().unwrap()]);
    qemu_img(&args);
    (q, data)
}

/// Everything a device could do with an image; errors are fine, panics are not.
fn exercise(d: &dyn BlockBackend) {
    let size = d.size();
    let mut buf = vec![0u8; 70_000];
    let mut rng = Rng(size | 1);
    if size <= 4 * MIB as u64 {
        let mut all = vec![0u8; size as usize];
        let _ = d.read_at(&mut all, 0);
    }
    for _ in 0..8 {
        let len = rng.below(buf.len() as u64) as usize;
        let off = rng.below(size.max(1));
        let _ = d.read_at(&mut buf[..len], off);
        let _ = d.write_at(&buf[..len], off);
        let _ = d.write_zeroes(off, len as u64 * 3, rng.next() & 1 == 0);
        let _ = d.discard(off, 1 << 16);
    }
    let _ = d.flush();
    let _ = d.id();
}

fn try_everything(path: &Path) {
    let _ = info(path);
    for readonly in [true, false] {
        if let Ok(d) = open(path, &qcow2_opts(readonly)) {
            exercise(&*d);
        }
    }
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn bad_magic() {
    let dir = TempDir::new("magic");
    let p = dir.join("debian.qcow2");
    std::fs::write(&p, b"not a qcow2 image at all").unwrap();
    let e = open(&p, &qcow2_opts(false)).err().unwrap();
    assert_eq!(
        e.to_string(),
        format!("{}: not a qcow2 image (bad magic)", p.display())
    );
    // Detection takes it for raw.
    assert_eq!(info(&p).unwrap().format, ImageFormat::Raw);
    std::fs::write(&p, b"QF").unwrap();
    assert!(matches!(
        open(&p, &qcow2_opts(true)),
        Err(DiskError::BadMagic { .. })
    ));
    std::fs::write(&p, b"").unwrap();
    assert!(matches!(
        open(&p, &qcow2_opts(true)),
        Err(DiskError::BadMagic { .. })
    ));
    let e = open(&dir.join("nope.img"), &OpenOptions::default())
        .err()
        .unwrap();
    assert!(
        matches!(e, DiskError::Open { .. }) && e.to_string().contains("nope.img"),
        "{e}"
    );
}

#[test]
fn truncated_images() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("trunc");
    let (q, _) = sample(&dir);
    let full = std::fs::read(&q).unwrap();
    let t = dir.join("t.qcow2");
    let mut cuts: Vec<usize> = (0..200).collect();
    cuts.extend((200..full.len()).step_by(1531));
    for cut in cuts {
        std::fs::write(&t, &full[..cut]).unwrap();
        try_everything(&t);
    }
    std::fs::write(&t, &full[..50]).unwrap();
    let e = open(&t, &qcow2_opts(true)).err().unwrap();
    assert!(e.to_string().contains("header truncated"), "{e}");
}

#[test]
fn absurd_header_fields() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("fields");
    let (q, _) = sample(&dir);
    let good = std::fs::read(&q).unwrap();
    let t = dir.join("f.qcow2");
    type Patch = fn(&mut Vec<u8>);
    let cases: &[(&str, Patch, &str)] = &[
        ("l1 huge", |b| put32(b, 36, u32::MAX), "L1 table"),
        ("l1 zero", |b| put32(b, 36, 0), "too small"),
        ("l1 past eof", |b| put64(b, 40, 1 << 40), "past the end"),
        ("l1 unaligned", |b| put64(b, 40, 4097), "cluster boundary"),
        ("size huge", |b| put64(b, 24, u64::MAX), "too small"),
        ("cluster bits 0", |b| put32(b, 20, 0), "cluster_bits"),
        ("cluster bits 63", |b| put32(b, 20, 63), "cluster_bits"),
        ("cluster bits 200", |b| put32(b, 20, 200), "cluster_bits"),
        ("reftable zero", |b| put32(b, 56, 0), "refcount table"),
        (
            "reftable huge",
            |b| put32(b, 56, u32::MAX),
            "refcount table",
        ),
        (
            "reftable past eof",
            |b| put64(b, 48, 1 << 50),
            "past the end",
        ),
        ("refcount order", |b| put32(b, 96, 7), "refcount order"),
        (
            "header length",
            |b| put32(b, 100, u32::MAX),
            "header length",
        ),
        ("version", |b| put32(b, 4, 4), "version 4"),
        ("encrypted", |b| put32(b, 32, 1), "encrypted"),
        (
            "unknown incompat",
            |b| put64(b, 72, 1 << 40),
            "incompatible",
        ),
        (
            "backing name long",
            |b| {
                put64(b, 8, 200);
                put32(b, 16, 5000)
            },
            "backing file name",
        ),
        (
            "backing name outside",
            |b| {
                put64(b, 8, 4090);
                put32(b, 16, 100)
            },
            "backing file name",
        ),
        (
            "extension overrun",
            |b| {
                put32(b, 112, 0x1234);
                put32(b, 116, u32::MAX)
            },
            "extension",
        ),
    ];
    for (what, patch, expect) in cases {
        let mut b = good.clone();
        patch(&mut b);
        std::fs::write(&t, &b).unwrap();
        let e = open(&t, &qcow2_opts(false))
            .err()
            .unwrap_or_else(|| panic!("{what}: opened"));
        assert!(e.to_string().contains(expect), "{what}: {e}");
        assert!(
            e.to_string().starts_with(&t.display().to_string()),
            "{what}: {e}"
        );
        try_everything(&t);
    }
}

/// The host offset of the L2 table for guest offset 0, and of its first entry.
fn first_l2(img: &[u8]) -> usize {
    let l1 = get64(img, 40) as usize;
    (get64(img, l1) & 0x00ff_ffff_ffff_fe00) as usize
}

#[test]
fn cluster_offsets_past_eof() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("eof");
    let (q, _) = sample(&dir);
    let good = std::fs::read(&q).unwrap();
    let t = dir.join("e.qcow2");
    let far = (good.len() as u64 + (1 << 30)) & !4095;

    // A data cluster past the end of the file.
    let mut b = good.clone();
    let l2 = first_l2(&b);
    put64(&mut b, l2, far | 1 << 63);
    std::fs::write(&t, &b).unwrap();
    let d = open(&t, &qcow2_opts(false)).unwrap();
    let mut buf = vec![0u8; 512];
    let e = d.read_at(&mut buf, 0).unwrap_err();
    assert!(
        matches!(e, DiskError::Corrupt { .. }) && e.to_string().contains("outside the file"),
        "{e}"
    );
    assert!(d.write_at(&buf, 0).is_err());
    // Other clusters still work.
    d.read_at(&mut buf, 8192).unwrap();
    drop(d);

    // An L2 table past the end, and one inside the header cluster.
    for bad in [far, 0x200] {
        let mut b = good.clone();
        let l1 = get64(&b, 40) as usize;
        put64(&mut b, l1, bad | 1 << 63);
        std::fs::write(&t, &b).unwrap();
        let d = open(&t, &qcow2_opts(false)).unwrap();
        assert!(matches!(
            d.read_at(&mut buf, 0),
            Err(DiskError::Corrupt { .. })
        ));
        assert!(matches!(
            d.write_at(&buf, 0),
            Err(DiskError::Corrupt { .. })
        ));
    }

    // A refcount block past the end: writes that allocate fail, reads work.
    let mut b = good.clone();
    let rt = get64(&b, 48) as usize;
    put64(&mut b, rt, far);
    std::fs::write(&t, &b).unwrap();
    let d = open(&t, &qcow2_opts(false)).unwrap();
    d.read_at(&mut buf, 0).unwrap();
    let e = d.write_at(&buf, 400_000).unwrap_err();
    assert!(matches!(e, DiskError::Corrupt { .. }), "{e}");
}

#[test]
fn garbage_after_magic() {
    let dir = TempDir::new("garbage");
    let t = dir.join("g.qcow2");
    for seed in 1..300u64 {
        let mut b = pattern(4 + (seed as usize * 977) % 300_000, seed);
        b[..4].copy_from_slice(b"QFI\xfb");
        // Half of them get a plausible version and cluster size.
        if seed % 2 == 0 && b.len() >= 104 {
            put32(&mut b, 4, 2 + (seed % 2 == 0 && seed % 4 == 0) as u32);
            put32(&mut b, 20, 9 + (seed % 8) as u32);
        }
        std::fs::write(&t, &b).unwrap();
        try_everything(&t);
    }
}

#[test]
fn random_byte_flips() {
    if !have_qemu_img() {
        return;
    }
    for (extra, rounds) in [(&[][..], 400), (&["-c"][..], 200)] {
        let dir = TempDir::new("flips");
        let (q, _) = sample_with(&dir, extra);
        let good = std::fs::read(&q).unwrap();
        let t = dir.join("x.qcow2");
        // Metadata sits in the first clusters of a converted image; compressed data after.
        let meta_end = good.len().min(if extra.is_empty() {
            64 * 1024
        } else {
            good.len()
        });
        let mut rng = Rng(0x5eed);
        for round in 0..rounds {
            let mut b = good.clone();
            for _ in 0..1 + rng.below(6) {
                let at = rng.below(meta_end as u64) as usize;
                b[at] ^= 1 << rng.below(8);
            }
            std::fs::write(&t, &b).unwrap();
            let r = std::panic::catch_unwind(|| try_everything(&t));
            assert!(r.is_ok(), "panic in round {round} of {extra:?}");
        }
    }
}
