//! Raw images: read, write, flush, discard, write-zeroes, read-only, O_DIRECT, threads.

mod common;

use common::*;
use ferro_disk::{open, DiskError, ImageFormat, OpenOptions};
use std::sync::Arc;

const MIB: usize = 1 << 20;

fn raw_file(dir: &TempDir, len: usize, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let p = dir.join("disk.img");
    let data = pattern(len, seed);
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

#[test]
fn raw_read_write_flush() {
    let dir = TempDir::new("raw-rw");
    let (p, mut expect) = raw_file(&dir, 4 * MIB, 1);
    let d = open(&p, &rw()).unwrap();
    assert_eq!(d.size(), 4 * MIB as u64);
    assert!(!d.readonly());
    assert_eq!(read_all(&*d), expect);
    write_both(&*d, &mut expect, &pattern(5000, 2), 12345);
    write_both(&*d, &mut expect, &pattern(MIB, 3), 3 * MIB as u64);
    d.flush().unwrap();
    assert_eq!(read_all(&*d), expect);
    drop(d);
    assert_eq!(std::fs::read(&p).unwrap(), expect);
}

#[test]
fn raw_out_of_range() {
    let dir = TempDir::new("raw-range");
    let (p, _) = raw_file(&dir, MIB, 1);
    let d = open(&p, &rw()).unwrap();
    let mut buf = vec![0u8; 512];
    let e = d.read_at(&mut buf, MIB as u64 - 256).unwrap_err();
    assert!(matches!(e, DiskError::OutOfRange { .. }), "{e}");
    assert!(e.to_string().starts_with(&p.display().to_string()), "{e}");
    assert!(d.write_at(&buf, u64::MAX - 10).is_err());
    assert!(d.write_zeroes(MIB as u64, 1, false).is_err());
    assert!(d.discard(0, MIB as u64 + 1).is_err());
    // Zero-length requests at the very end are fine.
    d.read_at(&mut [], MIB as u64).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), MIB as u64);
}

#[test]
fn raw_discard_and_write_zeroes() {
    let dir = TempDir::new("raw-zero");
    let (p, mut expect) = raw_file(&dir, 4 * MIB, 7);
    let d = open(&p, &rw()).unwrap();
    d.write_zeroes(1000, 70_000, false).unwrap();
    expect[1000..71_000].fill(0);
    d.write_zeroes(MIB as u64, MIB as u64, true).unwrap();
    expect[MIB..2 * MIB].fill(0);
    assert_eq!(read_all(&*d), expect);
    d.discard(2 * MIB as u64, MIB as u64).unwrap();
    d.flush().unwrap();
    assert_eq!(d.size(), 4 * MIB as u64);
    let after = read_all(&*d);
    // Discarded contents are unspecified; everything else is kept.
    assert_eq!(after[..2 * MIB], expect[..2 * MIB]);
    assert_eq!(after[3 * MIB..], expect[3 * MIB..]);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 4 * MIB as u64);
}

#[test]
fn raw_readonly_refuses_writes() {
    let dir = TempDir::new("raw-ro");
    let (p, expect) = raw_file(&dir, MIB, 9);
    let d = open(&p, &ro()).unwrap();
    assert!(d.readonly());
    let e = d.write_at(&[1, 2, 3], 0).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{}: image is read-only", p.display())
    );
    assert!(matches!(
        d.discard(0, 4096),
        Err(DiskError::ReadOnly { .. })
    ));
    assert!(matches!(
        d.write_zeroes(0, 4096, true),
        Err(DiskError::ReadOnly { .. })
    ));
    d.flush().unwrap();
    assert_eq!(read_all(&*d), expect);
}

#[test]
fn raw_id_is_stable_and_short() {
    let dir = TempDir::new("raw-id");
    let (p, _) = raw_file(&dir, 4096, 1);
    let a = open(&p, &rw()).unwrap().id();
    let b = open(&p, &ro()).unwrap().id();
    assert_eq!(a, b);
    assert!(!a.is_empty() && a.len() <= 20, "{a}");
    let q = dir.join("other.img");
    std::fs::write(&q, [0u8; 512]).unwrap();
    assert_ne!(open(&q, &rw()).unwrap().id(), a);
}

#[test]
fn raw_direct_io_aligned_and_unaligned() {
    let dir = TempDir::new("raw-direct");
    let (p, mut expect) = raw_file(&dir, 2 * MIB, 11);
    let opts = OpenOptions {
        direct: true,
        format: Some(ImageFormat::Raw),
        ..OpenOptions::default()
    };
    let d = open(&p, &opts).unwrap();
    // A page-aligned buffer goes through O_DIRECT where the filesystem has it.
    let mut big = vec![0u8; 3 * 4096];
    let at = big.as_ptr().align_offset(4096);
    let aligned = &mut big[at..at + 4096];
    aligned.copy_from_slice(&pattern(4096, 12));
    write_both(&*d, &mut expect, aligned, 8192);
    write_both(&*d, &mut expect, &pattern(777, 13), 4097);
    let mut back = vec![0u8; 3 * 4096];
    let at = back.as_ptr().align_offset(4096);
    d.read_at(&mut back[at..at + 4096], 8192).unwrap();
    assert_eq!(back[at..at + 4096], expect[8192..12288]);
    d.flush().unwrap();
    assert_eq!(read_all(&*d), expect);
}

#[test]
fn raw_concurrent_writers() {
    let dir = TempDir::new("raw-threads");
    let (p, _) = raw_file(&dir, 4 * MIB, 1);
    let d: Arc<dyn ferro_disk::BlockBackend> = Arc::from(open(&p, &rw()).unwrap());
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let d = Arc::clone(&d);
            std::thread::spawn(move || {
                for i in 0..64u64 {
                    let off = t * MIB as u64 + i * 16384;
                    d.write_at(&pattern(16384, t * 100 + i), off).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    d.flush().unwrap();
    for t in 0..4u64 {
        let mut buf = vec![0u8; 16384];
        d.read_at(&mut buf, t * MIB as u64 + 63 * 16384).unwrap();
        assert_eq!(buf, pattern(16384, t * 100 + 63));
    }
}
