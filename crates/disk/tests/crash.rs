//! kill -9 at random points of a writer process: `qemu-img check` finds leaks at most, and
//! every write the writer flushed before the kill reads back.

mod common;

use common::*;
use ferro_disk::open;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const ENV_IMAGE: &str = "FERRO_DISK_CRASH_IMAGE";
const ENV_SEED: &str = "FERRO_DISK_CRASH_SEED";

/// Size of each writer's records and the disk it writes into.
const REC: u64 = 12_345;
const DISK: u64 = 96 << 20;

fn record_offset(seed: u64, i: u64) -> u64 {
    // Spread over the disk so that many L2 tables and refcount blocks are touched.
    let slots = DISK / (REC + 1000);
    (Rng(seed * 7919 + i * 104_729 + 1).below(slots)) * (REC + 1000)
}

fn libc_sigkill() -> i32 {
    9
}

/// Where the child zeroes 128 KiB after record `i`.
fn zero_offset(seed: u64, i: u64) -> u64 {
    (record_offset(seed, i + 7) & !0xffff).min(DISK - 2 * 65536)
}

/// The child: writes records forever, flushing every few and printing how many are durable.
#[test]
fn crash_writer_child() {
    let (Ok(img), Ok(seed)) = (std::env::var(ENV_IMAGE), std::env::var(ENV_SEED)) else {
        return; // only runs when spawned by `kill_minus_nine_leaks_at_most`
    };
    let seed: u64 = seed.parse().unwrap();
    let d = open(Path::new(&img), &rw()).unwrap();
    for i in 0.. {
        d.write_at(
            &pattern(REC as usize, seed * 1_000_000 + i),
            record_offset(seed, i),
        )
        .unwrap();
        if i % 4 == 3 {
            d.write_zeroes(zero_offset(seed, i), 65536 * 2, i % 8 == 3)
                .unwrap();
        }
        if i % 8 == 7 {
            d.flush().unwrap();
            println!("durable {}", i + 1);
        }
    }
}

#[test]
fn kill_minus_nine_leaks_at_most() {
    if !have_qemu_img() {
        return;
    }
    let dir = TempDir::new("kill9");
    let exe = std::env::current_exe().unwrap();
    let mut verified = 0;
    for (n, cluster) in ["4096", "512", "65536"].iter().enumerate() {
        let q = dir.join(&format!("k{n}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster}"),
            q.to_str().unwrap(),
            &DISK.to_string(),
        ]);
        for round in 0..4u64 {
            let seed = n as u64 * 100 + round + 1;
            let mut child = Command::new(&exe)
                .args([
                    "--exact",
                    "crash_writer_child",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(ENV_IMAGE, &q)
                .env(ENV_SEED, seed.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            // Once it has flushed something, let it run a little longer, then kill it
            // mid-stream.
            let stdout = child.stdout.take().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let lines = std::thread::spawn(move || {
                BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                    .filter_map(|l| {
                        l.strip_prefix("durable ")
                            .and_then(|n| n.parse::<u64>().ok())
                    })
                    .inspect(|_| {
                        let _ = tx.send(());
                    })
                    .last()
            });
            let _ = rx.recv_timeout(Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(Rng(seed).below(300)));
            child.kill().unwrap();
            let status = child.wait().unwrap();
            // The writer must have been killed, not have stopped on an error of its own.
            assert_eq!(
                status.signal(),
                Some(libc_sigkill()),
                "writer exited by itself: {status}"
            );
            let durable = lines.join().unwrap().unwrap_or(0);
            let (code, text) = qemu_check(&q);
            assert!(
                code == 0 || code == 3,
                "cluster {cluster} round {round}: {text}"
            );
            assert!(
                !text.contains("ERROR"),
                "cluster {cluster} round {round}: {text}"
            );
            // Records flushed and not overwritten by a later record or zeroing still read back.
            let d = open(&q, &ro()).unwrap();
            let mut buf = vec![0u8; REC as usize];
            let last = durable.saturating_sub(1);
            if durable > 0 {
                d.read_at(&mut buf, record_offset(seed, last)).unwrap();
                let later_overlap = (last + 1..last + 64).any(|j| {
                    let (a, b) = (record_offset(seed, last), record_offset(seed, j));
                    let z = zero_offset(seed, j);
                    (b < a + REC && a < b + REC) || (z < a + REC && a < z + 2 * 65536)
                });
                if !later_overlap {
                    assert_eq!(
                        buf,
                        pattern(REC as usize, seed * 1_000_000 + last),
                        "cluster {cluster} round {round}"
                    );
                    verified += 1;
                }
                eprintln!(
                    "cluster {cluster} round {round}: {durable} records durable; check exit {code}"
                );
            }
        }
    }
    assert!(verified > 0, "no flushed record could be checked");
}
