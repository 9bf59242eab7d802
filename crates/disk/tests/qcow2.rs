//! qcow2 images made by qemu-img: reads match a raw conversion; our writes pass
//! `qemu-img check` and `qemu-img compare`; crashes leak at most.

mod common;

use common::*;
use ferro_disk::{open, DiskError, ImageFormat, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MIB: usize = 1 << 20;

/// A raw file with data, holes and zero runs, converted by qemu-img with `opts`.
fn converted(dir: &TempDir, size: usize, opts: &[&str]) -> (PathBuf, Vec<u8>) {
    let mut data = pattern(size, 42);
    let mut rng = Rng(7);
    for _ in 0..size / 65536 {
        let at = rng.below(size as u64) as usize;
        let len = (rng.below(200_000) as usize).min(size - at);
        data[at..at + len].fill(0);
    }
    convert(dir, data, opts)
}

/// `data` written to a raw file and converted by qemu-img with `opts`.
fn convert(dir: &TempDir, data: Vec<u8>, opts: &[&str]) -> (PathBuf, Vec<u8>) {
    let raw = dir.join("src.raw");
    std::fs::write(&raw, &data).unwrap();
    let q = dir.join("img.qcow2");
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    args.extend_from_slice(opts);
    let (r, qs) = (
        raw.to_str().unwrap().to_string(),
        q.to_str().unwrap().to_string(),
    );
    args.push(&r);
    args.push(&qs);
    qemu_img(&args);
    (q, data)
}

/// Text with random bytes sprinkled in: compresses, but not to nothing.
fn compressible(size: usize) -> Vec<u8> {
    let mut data = b"ferrovisor compressible text ".repeat(size / 29 + 1);
    data.truncate(size);
    let noise = pattern(size / 64, 5);
    for (i, b) in noise.iter().enumerate() {
        data[i * 64] = *b;
    }
    data
}

fn create(dir: &TempDir, name: &str, size: &str, opts: &[&str]) -> PathBuf {
    let q = dir.join(name);
    let qs = q.to_str().unwrap().to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(opts);
    args.push(&qs);
    args.push(size);
    qemu_img(&args);
    q
}

fn write_expected(dir: &TempDir, data: &[u8]) -> PathBuf {
    let p = dir.join("expected.raw");
    std::fs::write(&p, data).unwrap();
    p
}

#[test]
fn reads_match_qemu_conversion() {
    if !have_qemu_img() {
        return;
    }
    for opts in [
        &[][..],
        &["-o", "compat=0.10"][..],
        &["-o", "cluster_size=512"][..],
        &["-o", "cluster_size=2M,refcount_bits=64"][..],
    ] {
        let dir = TempDir::new("read");
        let (q, data) = converted(&dir, 6 * MIB + 4096, opts);
        for format in [None, Some(ImageFormat::Qcow2)] {
            let d = open(&q, &OpenOptions { format, ..ro() }).unwrap();
            assert_eq!(d.size(), data.len() as u64, "{opts:?}");
            assert!(read_all(&*d) == data, "{opts:?}");
            // Odd-sized reads across cluster boundaries.
            let mut buf = vec![0u8; 100_003];
            d.read_at(&mut buf, 65_000).unwrap();
            assert!(buf == data[65_000..165_003], "{opts:?}");
        }
    }
}

/// Random writes of odd sizes, applied to the image and to an expected raw file.
fn scribble(d: &dyn ferro_disk::BlockBackend, expect: &mut [u8], seed: u64, n: usize, max: u64) {
    let mut rng = Rng(seed);
    for i in 0..n {
        let len = 1 + rng.below(max) as usize;
        let off = rng.below(expect.len() as u64 - len as u64);
        write_both(d, expect, &pattern(len, seed * 1000 + i as u64), off);
    }
}

#[test]
fn writes_pass_check_and_compare() {
    if !have_qemu_img() {
        return;
    }
    for opts in [
        &[][..],
        &["-o", "compat=0.10"][..],
        &["-o", "refcount_bits=1"][..],
        &["-o", "refcount_bits=8,cluster_size=4096"][..],
    ] {
        let dir = TempDir::new("write");
        let q = create(&dir, "w.qcow2", "40M", opts);
        let mut expect = vec![0u8; 40 * MIB];
        let d = open(&q, &rw()).unwrap();
        scribble(&*d, &mut expect, 3, 200, 300_000);
        // Whole-cluster and in-place overwrites.
        write_both(&*d, &mut expect, &pattern(4 * MIB, 99), 8 * MIB as u64);
        write_both(&*d, &mut expect, &pattern(1000, 98), 8 * MIB as u64 + 10);
        assert!(read_all(&*d) == expect, "{opts:?}");
        d.flush().unwrap();
        drop(d);
        assert_clean(&q);
        assert_same(&q, &write_expected(&dir, &expect));
        // Reopen and write again on top of our own metadata.
        let d = open(&q, &rw()).unwrap();
        assert!(read_all(&*d) == expect, "{opts:?}");
        scribble(&*d, &mut expect, 4, 50, 100_000);
        drop(d);
        assert_clean(&q);
        assert_same(&q, &write_expected(&dir, &expect));
    }
}

#[test]
fn small_clusters_grow_refcount_structures() {
    if !have_qemu_img() {
        return;
    }
    // 512-byte clusters: a refcount block covers 128 KiB and the first table 8 MiB, so
    // 24 MiB of data needs new blocks and a bigger refcount table.
    let dir = TempDir::new("grow");
    let q = create(&dir, "g.qcow2", "32M", &["-o", "cluster_size=512"]);
    let mut expect = vec![0u8; 32 * MIB];
    let d = open(&q, &rw()).unwrap();
    for i in 0..24u64 {
        write_both(
            &*d,
            &mut expect,
            &pattern(MIB - 1000, i),
            i * MIB as u64 + 500,
        );
    }
    d.flush().unwrap();
    drop(d);
    assert_clean(&q);
    assert_same(&q, &write_expected(&dir, &expect));
    let hdr = std::fs::read(&q).unwrap();
    let rt_clusters = u32::from_be_bytes(hdr[56..60].try_into().unwrap());
    assert!(rt_clusters > 1, "refcount table did not grow");
}

#[test]
fn l2_cache_eviction_keeps_data() {
    if !have_qemu_img() {
        return;
    }
    // 4 KiB clusters: one L2 table maps 2 MiB, so 100 MiB spans 50 tables (> the cache).
    let dir = TempDir::new("evict");
    let q = create(&dir, "e.qcow2", "100M", &["-o", "cluster_size=4096"]);
    let mut expect = vec![0u8; 100 * MIB];
    let d = open(&q, &rw()).unwrap();
    scribble(&*d, &mut expect, 5, 400, 10_000);
    assert!(read_all(&*d) == expect);
    drop(d);
    assert_clean(&q);
    assert_same(&q, &write_expected(&dir, &expect));
}

#[test]
fn zeroes_and_discard() {
    if !have_qemu_img() {
        return;
    }
    for opts in [&[][..], &["-o", "compat=0.10"][..]] {
        let dir = TempDir::new("zero");
        let q = create(&dir, "z.qcow2", "8M", opts);
        let mut expect = pattern(8 * MIB, 5);
        let d = open(&q, &rw()).unwrap();
        d.write_at(&expect, 0).unwrap();
        d.write_zeroes(1000, 300_000, true).unwrap();
        expect[1000..301_000].fill(0);
        d.write_zeroes(MIB as u64, MIB as u64, false).unwrap();
        expect[MIB..2 * MIB].fill(0);
        d.discard(4 * MIB as u64, MIB as u64).unwrap();
        // The tail of the disk, to its very end.
        d.write_zeroes(7 * MIB as u64 + 5, MIB as u64 - 5, true)
            .unwrap();
        expect[7 * MIB + 5..].fill(0);
        let got = read_all(&*d);
        assert!(got[..4 * MIB] == expect[..4 * MIB], "{opts:?}");
        assert!(got[5 * MIB..] == expect[5 * MIB..], "{opts:?}");
        expect[4 * MIB..5 * MIB].copy_from_slice(&got[4 * MIB..5 * MIB]);
        // Writing into zeroed clusters again.
        write_both(&*d, &mut expect, &pattern(70_000, 6), MIB as u64 + 3);
        write_both(&*d, &mut expect, &pattern(70_000, 7), 100);
        d.flush().unwrap();
        drop(d);
        assert_clean(&q);
        assert_same(&q, &write_expected(&dir, &expect));
    }
}

#[test]
fn readonly_refuses_writes() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("ro");
    let (q, data) = converted(&dir, MIB, &[]);
    let before = hash_file(&q);
    let d = open(&q, &ro()).unwrap();
    assert!(d.readonly());
    let e = d.write_at(&[1], 0).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{}: image is read-only", q.display())
    );
    assert!(matches!(
        d.write_zeroes(0, 65536, true),
        Err(DiskError::ReadOnly { .. })
    ));
    assert!(matches!(
        d.discard(0, 65536),
        Err(DiskError::ReadOnly { .. })
    ));
    d.flush().unwrap();
    assert!(read_all(&*d) == data);
    drop(d);
    assert_eq!(hash_file(&q), before);
}

#[test]
fn compressed_clusters_read_and_copy_out_on_write() {
    if !have_qemu_img() {
        return;
    }
    for opts in [
        &["-c"][..],
        &["-c", "-o", "cluster_size=4096"][..],
        &["-c", "-o", "compat=0.10"][..],
    ] {
        let dir = TempDir::new("compressed");
        let (q, mut expect) = convert(&dir, compressible(3 * MIB + 1024), opts);
        // Compressed clusters show as data without a host offset.
        let map = qemu_img(&["map", "--output=json", q.to_str().unwrap()]);
        assert!(
            map.contains("\"data\": true}"),
            "{opts:?}: nothing compressed: {map}"
        );
        let d = open(&q, &rw()).unwrap();
        let got = read_all(&*d);
        let bad = got.iter().zip(expect.iter()).position(|(a, b)| a != b);
        assert!(bad.is_none(), "{opts:?}: first difference at {bad:?}");
        let mut buf = vec![0u8; 70_001];
        d.read_at(&mut buf, 12_345).unwrap();
        assert!(buf == expect[12_345..82_346], "{opts:?}");
        // Partial writes keep the rest of the compressed cluster; zeroing drops it.
        write_both(&*d, &mut expect, &pattern(100, 1), 5);
        write_both(&*d, &mut expect, &pattern(200_000, 2), MIB as u64 + 7);
        d.write_zeroes(2 * MIB as u64, 300_000, true).unwrap();
        expect[2 * MIB..2 * MIB + 300_000].fill(0);
        d.discard(0, 3 * MIB as u64 + 1024).unwrap();
        drop(d);
        let d = open(&q, &rw()).unwrap();
        let got = read_all(&*d);
        drop(d);
        // Discard leaves contents unspecified: take what it left as expected.
        expect.copy_from_slice(&got);
        assert_clean(&q);
        assert_same(&q, &write_expected(&dir, &expect));
    }
}

#[test]
fn compressed_writes_without_discard_match() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("compressed-w");
    let (q, mut expect) = convert(&dir, compressible(2 * MIB), &["-c"]);
    let d = open(&q, &rw()).unwrap();
    scribble(&*d, &mut expect, 77, 40, 100_000);
    d.write_zeroes(65536, 65536 * 3, true).unwrap();
    expect[65536..65536 * 4].fill(0);
    d.flush().unwrap();
    drop(d);
    assert_clean(&q);
    assert_same(&q, &write_expected(&dir, &expect));
}

#[test]
fn zstd_compressed_clusters_are_refused() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("zstd");
    let raw = dir.join("z.raw");
    std::fs::write(&raw, b"compressible ".repeat(MIB / 8)).unwrap();
    let q = dir.join("z.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args([
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
        ])
        .arg(&raw)
        .arg(&q)
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!("skipped: qemu-img has no zstd");
        return;
    }
    let d = open(&q, &ro()).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = d.read_at(&mut buf, 0).unwrap_err();
    assert!(e.to_string().contains("zstd-compressed clusters"), "{e}");
}

/// Writes, leaves without writing back metadata (as a kill -9 would), and checks that
/// qemu-img finds leaks at most.
fn crash_after(q: &Path, seed: u64, flush_midway: bool) -> i32 {
    let d = open(q, &rw()).unwrap();
    let mut scratch = vec![0u8; d.size() as usize];
    scribble(&*d, &mut scratch, seed, 60, 200_000);
    if flush_midway {
        d.flush().unwrap();
        scribble(&*d, &mut scratch, seed + 1, 60, 200_000);
    }
    std::mem::forget(d);
    let (code, text) = qemu_check(q);
    assert!(code == 0 || code == 3, "qemu-img check after crash: {text}");
    assert!(!text.contains("ERROR"), "{text}");
    code
}

#[test]
fn crash_leaks_but_never_corrupts() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("crash");
    for (i, opts) in [
        &[][..],
        &["-o", "cluster_size=4096"][..],
        &["-o", "cluster_size=512"][..],
    ]
    .iter()
    .enumerate()
    {
        let q = create(&dir, &format!("c{i}.qcow2"), "16M", opts);
        // Nothing was written back: every new cluster is a leak, nothing is referenced.
        assert_eq!(crash_after(&q, 10 + i as u64, false), 3);
        crash_after(&q, 20 + i as u64, true);
        // After the crash the image still opens and takes writes.
        let d = open(&q, &rw()).unwrap();
        d.write_at(&pattern(100_000, 1), 5000).unwrap();
        drop(d);
        let (code, text) = qemu_check(&q);
        assert!(code == 0 || code == 3, "{text}");
    }
}

#[test]
fn concurrent_writers() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("threads");
    let q = create(&dir, "t.qcow2", "16M", &["-o", "cluster_size=4096"]);
    let d: Arc<dyn ferro_disk::BlockBackend> = Arc::from(open(&q, &rw()).unwrap());
    // Interleaved: threads share L2 tables but not clusters. Thread 0 also flushes, thread 1
    // zeroes some of its own records again.
    let off = |t: u64, i: u64| (i * 4 + t) * 30_000;
    let zeroed = |t: u64, i: u64| t == 1 && i.is_multiple_of(8);
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let d = Arc::clone(&d);
            std::thread::spawn(move || {
                for i in 0..128u64 {
                    d.write_at(&pattern(6000, t * 1000 + i), off(t, i)).unwrap();
                    let mut back = vec![0u8; 6000];
                    d.read_at(&mut back, off(t, i)).unwrap();
                    assert_eq!(back, pattern(6000, t * 1000 + i));
                    if zeroed(t, i) {
                        d.write_zeroes(off(t, i), 6000, i.is_multiple_of(16))
                            .unwrap();
                    }
                    if t == 0 && i % 16 == 15 {
                        d.flush().unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut expect = vec![0u8; 16 * MIB];
    for t in 0..4 {
        for i in 0..128 {
            let o = off(t, i) as usize;
            if !zeroed(t, i) {
                expect[o..o + 6000].copy_from_slice(&pattern(6000, t * 1000 + i));
            }
        }
    }
    assert!(read_all(&*d) == expect);
    d.flush().unwrap();
    drop(d);
    assert_clean(&q);
    assert_same(&q, &write_expected(&dir, &expect));
}

#[test]
fn direct_io_with_aligned_buffers() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("direct");
    let q = create(&dir, "d.qcow2", "8M", &[]);
    let mut expect = vec![0u8; 8 * MIB];
    let d = open(
        &q,
        &OpenOptions {
            direct: true,
            ..rw()
        },
    )
    .unwrap();
    let mut big = vec![0u8; MIB + 4096];
    let at = big.as_ptr().align_offset(4096);
    let aligned = &mut big[at..at + MIB];
    aligned.copy_from_slice(&pattern(MIB, 31));
    write_both(&*d, &mut expect, aligned, 2 * MIB as u64);
    write_both(&*d, &mut expect, &aligned[..65536], 2 * MIB as u64 + 4096);
    write_both(&*d, &mut expect, &pattern(3000, 32), 7);
    aligned.fill(0);
    d.read_at(aligned, 2 * MIB as u64).unwrap();
    assert!(aligned[..] == expect[2 * MIB..3 * MIB]);
    assert!(read_all(&*d) == expect);
    drop(d);
    assert_clean(&q);
    assert_same(&q, &write_expected(&dir, &expect));
}
