//! Helpers for the image tests: temporary folders, patterns, and qemu-img.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use ferro_disk::{BlockBackend, OpenOptions};

/// A folder under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "ferro-disk-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic bytes: xorshift64 from `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A small PRNG for choosing offsets.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Whether qemu-img is here; tests that need it print why they skip.
pub fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: qemu-img not found");
    }
    ok
}

/// Runs qemu-img; panics with its output unless it exits 0.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check`: exit 0 clean, 3 leaks only, others errors. Returns (code, output).
pub fn qemu_check(path: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("run qemu-img check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

pub fn assert_clean(path: &Path) {
    let (code, text) = qemu_check(path);
    assert_eq!(code, 0, "qemu-img check {}: {text}", path.display());
}

/// qemu-img compare of a qcow2 image against a raw file; panics if they differ.
pub fn assert_same(qcow2: &Path, raw: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(qcow2)
        .arg(raw)
        .output()
        .expect("run qemu-img compare");
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        qcow2.display(),
        raw.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn rw() -> OpenOptions {
    OpenOptions::default()
}

pub fn ro() -> OpenOptions {
    OpenOptions {
        readonly: true,
        ..OpenOptions::default()
    }
}

pub fn read_all(d: &dyn BlockBackend) -> Vec<u8> {
    let mut buf = vec![0u8; d.size() as usize];
    d.read_at(&mut buf, 0).unwrap();
    buf
}

/// Applies a write to both the image and an expected raw buffer.
pub fn write_both(d: &dyn BlockBackend, expect: &mut [u8], data: &[u8], off: u64) {
    d.write_at(data, off).unwrap();
    expect[off as usize..off as usize + data.len()].copy_from_slice(data);
}

/// A simple content hash (FNV-1a) of a file.
pub fn hash_file(path: &Path) -> u64 {
    let data = std::fs::read(path).unwrap();
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
