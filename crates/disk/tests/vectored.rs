//! Vectored reads and writes (`read_vectored` / `write_vectored`): raw images straight into
//! the caller's memory with O_DIRECT when every piece is aligned, the aligned bounce buffer
//! when one is not, the buffered descriptor without O_DIRECT, qcow2 through the default
//! bounce, more pieces than one system call takes, and the end of a truncated file.

mod common;

use common::*;
use ferro_disk::{create_qcow2_overlay, open, BlockBackend, DiskError, IoVec, OpenOptions};

const MIB: usize = 1 << 20;

/// A page-aligned buffer of `len` bytes (plus slack for unaligned pieces).
struct Mem {
    raw: Vec<u8>,
    start: usize,
}

impl Mem {
    fn new(len: usize) -> Self {
        let raw = vec![0u8; len + 8192];
        let start = raw.as_ptr().align_offset(4096);
        Self { raw, start }
    }
    fn bytes(&mut self) -> &mut [u8] {
        let s = self.start;
        &mut self.raw[s..]
    }
    /// IoVecs for `(offset, len)` pieces of the aligned area.
    fn iov(&mut self, pieces: &[(usize, usize)]) -> Vec<IoVec> {
        let base = self.bytes().as_mut_ptr();
        pieces
            .iter()
            .map(|&(o, l)| {
                assert!(o + l <= self.raw.len() - self.start);
                // SAFETY: the piece lies inside `self.raw`, which outlives every use of the
                // returned IoVecs in these tests, and no reference to it is held meanwhile.
                unsafe { IoVec::new(base.add(o), l) }
            })
            .collect()
    }
    /// The bytes of `pieces`, in order.
    fn gather(&mut self, pieces: &[(usize, usize)]) -> Vec<u8> {
        let b = self.bytes();
        pieces
            .iter()
            .flat_map(|&(o, l)| b[o..o + l].to_vec())
            .collect()
    }
    fn scatter(&mut self, pieces: &[(usize, usize)], data: &[u8]) {
        let b = self.bytes();
        let mut at = 0;
        for &(o, l) in pieces {
            b[o..o + l].copy_from_slice(&data[at..at + l]);
            at += l;
        }
    }
}

fn total(pieces: &[(usize, usize)]) -> usize {
    pieces.iter().map(|p| p.1).sum()
}

fn raw_file(dir: &TempDir, len: usize, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let p = dir.join("disk.img");
    let data = pattern(len, seed);
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

/// Reads `pieces` at `off`, checks them against `expect`, writes new data through the same
/// pieces at `woff`, and checks a plain read sees it.
fn round_trip(
    d: &dyn BlockBackend,
    expect: &mut [u8],
    pieces: &[(usize, usize)],
    off: usize,
    woff: usize,
) {
    let n = total(pieces);
    let mut m = Mem::new(64 * 1024 + 4096);
    let iov = m.iov(pieces);
    d.read_vectored(&iov, off as u64).unwrap();
    assert_eq!(
        m.gather(pieces),
        &expect[off..off + n],
        "read {pieces:?} at {off}"
    );
    let data = pattern(n, off as u64 ^ 0x55);
    m.scatter(pieces, &data);
    d.write_vectored(&iov, woff as u64).unwrap();
    expect[woff..woff + n].copy_from_slice(&data);
    let mut back = vec![0u8; n];
    d.read_at(&mut back, woff as u64).unwrap();
    assert_eq!(back, data, "write {pieces:?} at {woff}");
}

/// Aligned pieces (O_DIRECT straight into them), unaligned addresses, unaligned lengths and
/// an unaligned offset (the aligned bounce buffer), all on one O_DIRECT raw image.
#[test]
fn raw_direct_aligned_and_unaligned_pieces() {
    let dir = TempDir::new("vec-direct");
    let (p, mut expect) = raw_file(&dir, 4 * MIB, 11);
    let opts = OpenOptions {
        direct: true,
        ..rw()
    };
    let d = open(&p, &opts).unwrap();
    let aligned = [(0, 4096), (16384, 8192), (8192, 4096)];
    round_trip(&*d, &mut expect, &aligned, 65536, MIB);
    let odd_addr = [(1, 4096), (8193, 4096)];
    round_trip(&*d, &mut expect, &odd_addr, 4096, 2 * MIB);
    let odd_len = [(0, 512), (4096, 3584), (12288, 1000), (20000, 24)];
    round_trip(&*d, &mut expect, &odd_len, 8192, 3 * MIB + 4096);
    round_trip(&*d, &mut expect, &aligned, 512, 3 * MIB + 512);
    // A piece of nothing is fine anywhere.
    round_trip(&*d, &mut expect, &[(0, 0), (4096, 4096), (7, 0)], 0, 0);
    d.flush().unwrap();
    drop(d);
    assert_eq!(std::fs::read(&p).unwrap(), expect);
}

/// Without O_DIRECT any pieces go straight to the buffered descriptor.
#[test]
fn raw_buffered_any_pieces() {
    let dir = TempDir::new("vec-buffered");
    let (p, mut expect) = raw_file(&dir, MIB, 12);
    let d = open(&p, &rw()).unwrap();
    round_trip(
        &*d,
        &mut expect,
        &[(3, 1), (100, 999), (5000, 4096)],
        77,
        1234,
    );
    round_trip(&*d, &mut expect, &[(0, 65536)], 0, 4096);
    drop(d);
    assert_eq!(std::fs::read(&p).unwrap(), expect);
}

/// More pieces than one preadv/pwritev takes (1024).
#[test]
fn raw_many_pieces() {
    for direct in [false, true] {
        let dir = TempDir::new("vec-many");
        let (p, mut expect) = raw_file(&dir, 4 * MIB, 13);
        let opts = OpenOptions { direct, ..rw() };
        let d = open(&p, &opts).unwrap();
        // 1500 pieces of 16 bytes (bounced under O_DIRECT), then 130 of 512 bytes at 512-byte
        // strides (aligned wherever the file asks for 512 bytes at most).
        let small: Vec<(usize, usize)> = (0..1500).map(|i| (i * 32, 16)).collect();
        round_trip(&*d, &mut expect, &small, 4096, MIB);
        let pages: Vec<(usize, usize)> = (0..130).map(|i| (i * 512, 512)).collect();
        round_trip(&*d, &mut expect, &pages, 8192, 2 * MIB);
        drop(d);
        assert_eq!(std::fs::read(&p).unwrap(), expect);
    }
}

/// qcow2 takes the default path: a bounce through read_at / write_at.
#[test]
fn qcow2_bounces() {
    let dir = TempDir::new("vec-qcow2");
    let (base, mut expect) = raw_file(&dir, 2 * MIB, 14);
    let top = dir.join("top.qcow2");
    create_qcow2_overlay(&top, &base).unwrap();
    let d = open(&top, &rw()).unwrap();
    round_trip(&*d, &mut expect, &[(0, 4096), (8192, 61440)], 4096, 70_000);
    round_trip(&*d, &mut expect, &[(1, 700)], 65536 + 3, MIB + 5);
    assert_eq!(read_all(&*d), expect);
}

/// Out of range is refused before any I/O; the part of a disk past the end of a file
/// truncated under us reads as zeros.
#[test]
fn range_checks_and_truncated_file() {
    let dir = TempDir::new("vec-range");
    let (p, _) = raw_file(&dir, MIB, 15);
    for direct in [false, true] {
        let opts = OpenOptions { direct, ..rw() };
        let d = open(&p, &opts).unwrap();
        let mut m = Mem::new(16384);
        let iov = m.iov(&[(0, 4096), (4096, 4096)]);
        let e = d.read_vectored(&iov, MIB as u64 - 4096).unwrap_err();
        assert!(matches!(e, DiskError::OutOfRange { .. }), "{e}");
        assert!(d.write_vectored(&iov, u64::MAX - 10).is_err());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(MIB as u64 - 4096)
            .unwrap();
        m.bytes()[..8192].fill(0xaa);
        d.read_vectored(&iov, MIB as u64 - 8192).unwrap();
        let got = m.gather(&[(0, 8192)]);
        assert_eq!(&got[..4096], &pattern(MIB, 15)[MIB - 8192..MIB - 4096]);
        assert!(got[4096..].iter().all(|&b| b == 0));
        std::fs::write(&p, pattern(MIB, 15)).unwrap();
    }
    let d = open(&p, &ro()).unwrap();
    let mut m = Mem::new(4096);
    let iov = m.iov(&[(0, 4096)]);
    assert!(matches!(
        d.write_vectored(&iov, 0).unwrap_err(),
        DiskError::ReadOnly { .. }
    ));
}
