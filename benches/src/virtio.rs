//! The virtio section: the probe's `blk=bench` and `net=bench` on ferro-vmm and QEMU q35, on
//! the host's /dev/kvm, alternating run by run; for the disk also the host itself against the
//! same image file with the same request sizes and queue depth.
//!
//! Disk: one raw image file on the host's disk (not tmpfs), filled with data once so no read
//! hits a hole; ferro-vmm `--disk path=F,cache=none`, QEMU `cache=none,aio=io_uring` (threads
//! if io_uring fails); the host: O_DIRECT with [`BLK_QD`] threads each keeping one request in
//! flight. Network: a network namespace of our own with a tap in it; the VMM runs inside it
//! (`ip netns exec`) and a thread of ours enters it (`setns`) to count the guest's frames and
//! send frames to the guest on an AF_PACKET socket bound to the tap.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::report::{Metric, Results, Row, Sut};
use crate::stats::Target;
use crate::{log, parse, proc, strings, Env, Machine, MEM_MIB};

/// Size of the disk image, MiB (the random reads spread over all of it).
pub const DISK_MIB: u64 = 512;
/// MiB the probe writes then reads sequentially: at ~2 GB/s each pass lasts ~0.2 s (128 MiB,
/// ~65 ms, left the rows at the mercy of the host disk's hiccups).
pub const BLK_MIB: u64 = 448;
/// 4 KiB random reads per run (~0.5 s at 80k IOPS).
pub const BLK_RAND: u64 = 40_000;
/// Requests in flight (the probe's most, and its default).
pub const BLK_QD: usize = 16;
/// The probe's sequential request size.
const SEQ_BYTES: usize = 64 * 1024;
/// The random-read request size.
const RAND_BYTES: usize = 4096;
/// Frames the guest sends.
pub const NET_TX_FRAMES: u64 = 100_000;
/// Frames the guest counts before it stops (it gives up after [`NET_SECS`]).
pub const NET_RX_FRAMES: u64 = 100_000;
/// The longest the guest listens, seconds.
pub const NET_SECS: u64 = 10;
/// The bench frames' EtherType (guest/probe/README.md).
const ETHERTYPE: u16 = 0x88b5;
/// Name of the tap inside our namespace.
const TAP: &str = "fbtap0";
/// The host end's address on the tap (nothing is routed).
const TAP_ADDR: &str = "169.254.88.1/24";
/// statfs f_type of tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// The probe's command line for the disk rows.
pub fn blk_cmdline() -> String {
    format!("exit=poweroff smp=off blk=bench blk_mib={BLK_MIB} blk_rand={BLK_RAND} blk_qd={BLK_QD}")
}

/// The probe's command line for the network rows with frames of `len` bytes.
pub fn net_cmdline(len: usize) -> String {
    format!(
        "exit=poweroff smp=off net=bench net_tx_frames={NET_TX_FRAMES} net_frame_len={len} \
         net_frames={NET_RX_FRAMES} net_secs={NET_SECS}"
    )
}

/// What the section reports besides the tables.
#[derive(Default)]
pub struct VirtioOutcome {
    pub notes: Vec<String>,
    pub aio: String,
    pub image: Option<PathBuf>,
    /// /proc/loadavg at the start and the end of this section's runs.
    pub load: (Option<[f64; 3]>, Option<[f64; 3]>),
}

pub const ROWS: [Row; 19] = [
    Row::new(Metric::BlkSeqRead, Sut::HostBest, Target::RatioAtLeast(0.9)),
    Row::new(Metric::BlkSeqRead, Sut::Host, Target::Info),
    Row::new(Metric::BlkSeqRead, Sut::HostThreads, Target::Info),
    Row::new(Metric::BlkSeqRead, Sut::Q35, Target::RatioAtLeast(1.0)),
    Row::new(
        Metric::BlkSeqWrite,
        Sut::HostBest,
        Target::RatioAtLeast(0.9),
    ),
    Row::new(Metric::BlkSeqWrite, Sut::Host, Target::Info),
    Row::new(Metric::BlkSeqWrite, Sut::HostThreads, Target::Info),
    Row::new(Metric::BlkSeqWrite, Sut::Q35, Target::RatioAtLeast(1.0)),
    Row::new(
        Metric::BlkRandRead,
        Sut::HostBest,
        Target::RatioAtLeast(0.9),
    ),
    Row::new(Metric::BlkRandRead, Sut::Host, Target::Info),
    Row::new(Metric::BlkRandRead, Sut::HostThreads, Target::Info),
    Row::new(Metric::BlkRandRead, Sut::Q35, Target::RatioAtLeast(1.0)),
    Row::new(Metric::NetTxFps, Sut::Q35, Target::RatioAtLeast(1.0)),
    Row::new(Metric::NetTxMbps, Sut::Q35, Target::RatioAtLeast(1.0)),
    Row::new(Metric::NetRxFps, Sut::Q35, Target::RatioAtLeast(1.0)),
    Row::new(Metric::NetRxMbps, Sut::Q35, Target::RatioAtLeast(1.0)),
    Row::new(Metric::NetTxFps60, Sut::Q35, Target::RatioAtLeast(1.0)),
    Row::new(Metric::NetRxFps60, Sut::Q35, Target::RatioAtLeast(1.0)),
    Row::new(Metric::NetTxSeen, Sut::Q35, Target::Info),
];

pub const METRICS: [Metric; 10] = [
    Metric::BlkSeqWrite,
    Metric::BlkSeqRead,
    Metric::BlkRandRead,
    Metric::NetTxFps,
    Metric::NetTxMbps,
    Metric::NetRxFps,
    Metric::NetRxMbps,
    Metric::NetTxFps60,
    Metric::NetRxFps60,
    Metric::NetTxSeen,
];

fn tag(round: usize, runs: usize) -> String {
    if round == 0 {
        "warm-up".into()
    } else {
        format!("{round}/{runs}")
    }
}

/// Both sub-benchmarks.
pub fn run(env: &Env, runs: usize, timeout: Duration, r: &mut Results) -> VirtioOutcome {
    let mut out = VirtioOutcome {
        aio: "io_uring".into(),
        ..Default::default()
    };
    out.load.0 = crate::loadavg();
    if env.qemu.is_none() {
        for m in METRICS {
            r.skip(m, Sut::Q35, "qemu-system-x86_64 not found on PATH");
        }
    }
    match prepare_image(&env.work) {
        Ok(img) => {
            bench_disk(env, runs, timeout, &img, r, &mut out);
            out.image = Some(img);
        }
        Err(e) => {
            let why = format!("disk image: {e:#}");
            log(format!("virtio: {why}"));
            for m in [Metric::BlkSeqWrite, Metric::BlkSeqRead, Metric::BlkRandRead] {
                for s in [
                    Sut::Ferro,
                    Sut::Q35,
                    Sut::Host,
                    Sut::HostThreads,
                    Sut::HostBest,
                ] {
                    r.skip(m, s, why.clone());
                }
            }
        }
    }
    bench_net(env, runs, timeout, r, &mut out);
    out.load.1 = crate::loadavg();
    out
}

// ---------------------------------------------------------------- disk

/// The image file: `DISK_MIB` MiB of non-zero data on the host's disk, made once.
fn prepare_image(work: &Path) -> Result<PathBuf> {
    let img = work.join("virtio-disk.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&img)
        .with_context(|| format!("cannot open {}", img.display()))?;
    if is_tmpfs(&f) {
        bail!(
            "{} is on tmpfs: O_DIRECT would not reach a disk",
            img.display()
        );
    }
    let want = DISK_MIB << 20;
    let allocated = f.metadata()?.blocks() * 512;
    if f.metadata()?.len() == want && allocated >= want {
        return Ok(img);
    }
    log(format!(
        "virtio: writing the {DISK_MIB} MiB disk image {}",
        img.display()
    ));
    f.set_len(0)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &f);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..DISK_MIB {
        for c in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        w.write_all(&block)?;
    }
    w.flush()?;
    drop(w);
    f.sync_all()?;
    Ok(img)
}

fn is_tmpfs(f: &File) -> bool {
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `f` is an open descriptor for the duration of the call and `s` is a valid,
    // writable statfs that outlives it.
    let r = unsafe { libc::fstatfs(f.as_raw_fd(), &mut s) };
    r == 0 && s.f_type as i64 == TMPFS_MAGIC
}

fn ferro_disk(env: &Env, img: &Path) -> (PathBuf, Vec<String>) {
    let mut a = crate::ferro_args(&env.probe, &blk_cmdline());
    a.push("--disk".into());
    a.push(format!("path={},cache=none", img.display()));
    (env.ferro.clone(), a)
}

fn qemu_disk(env: &Env, img: &Path, aio: &str) -> Option<(PathBuf, Vec<String>)> {
    let q = env.qemu.clone()?;
    let mut a = crate::qemu_args(Machine::Q35, &env.probe, &blk_cmdline());
    a.extend([
        "-drive".to_string(),
        format!(
            "file={},if=none,id=d0,format=raw,cache=none,aio={aio}",
            img.display()
        ),
        "-device".into(),
        "virtio-blk-pci,drive=d0,disable-legacy=on".into(),
    ]);
    Some((q, a))
}

/// The three disk numbers of one run: seq write MB/s, seq read MB/s, random-read IOPS.
type DiskNumbers = [f64; 3];
const DISK_METRICS: [Metric; 3] = [Metric::BlkSeqWrite, Metric::BlkSeqRead, Metric::BlkRandRead];

/// The probe's `blk=bench` numbers from its console, or why there are none.
fn parse_blk(console: &str) -> std::result::Result<DiskNumbers, String> {
    let keys = [
        "blk_seq_write_mbps",
        "blk_seq_read_mbps",
        "blk_rand_read_iops",
    ];
    let mut v = [0.0; 3];
    for (i, k) in keys.iter().enumerate() {
        match parse::kv_num(console, k) {
            Some(x) if x > 0.0 => v[i] = x,
            Some(_) => return Err(format!("{k}=0 (a request failed)")),
            None => return Err(format!("no {k}= on the console")),
        }
    }
    if parse::kv_num(console, "blk_bench_qd") != Some(BLK_QD as f64) {
        return Err(format!("the probe did not run at queue depth {BLK_QD}"));
    }
    Ok(v)
}

fn run_probe(prog: &Path, a: &[String], timeout: Duration) -> std::result::Result<String, String> {
    let o = proc::output(prog, a, timeout).map_err(|e| format!("{e:#}"))?;
    if let Some(p) = crate::probe_run_problem(&o, &proc::Status::Exited(0)) {
        return Err(p);
    }
    Ok(o.stdout)
}

fn bench_disk(
    env: &Env,
    runs: usize,
    timeout: Duration,
    img: &Path,
    r: &mut Results,
    out: &mut VirtioOutcome,
) {
    log(format!("virtio: disk, {runs} runs: {}", blk_cmdline()));
    let fio = crate::which("fio");
    if fio.is_none() {
        for m in DISK_METRICS {
            r.skip(
                m,
                Sut::Host,
                "fio not found on PATH (scripts/deps.sh installs it)",
            );
        }
    }
    for round in 0..=runs {
        let t = tag(round, runs);
        let mut best: Option<DiskNumbers> = None;
        for sut in [Sut::Ferro, Sut::Q35, Sut::Host, Sut::HostThreads] {
            let res: std::result::Result<DiskNumbers, String> = match sut {
                Sut::Ferro => {
                    let (p, a) = ferro_disk(env, img);
                    run_probe(&p, &a, timeout).and_then(|c| parse_blk(&c))
                }
                Sut::Q35 => {
                    let Some((p, a)) = qemu_disk(env, img, &out.aio) else {
                        continue;
                    };
                    let mut res = run_probe(&p, &a, timeout);
                    if matches!(&res, Err(e) if e.contains("io_uring")) && out.aio == "io_uring" {
                        let why = res.as_ref().err().cloned().unwrap_or_default();
                        log(format!(
                            "virtio: QEMU aio=io_uring failed ({why}); using aio=threads"
                        ));
                        out.notes.push(format!(
                            "QEMU's aio=io_uring failed ({}); QEMU ran with aio=threads",
                            parse::last_lines(&why, 1)
                        ));
                        out.aio = "threads".into();
                        if let Some((p, a)) = qemu_disk(env, img, &out.aio) {
                            res = run_probe(&p, &a, timeout);
                        }
                    }
                    res.and_then(|c| parse_blk(&c))
                }
                Sut::Host => {
                    let Some(fio) = &fio else {
                        continue;
                    };
                    fio_disk(fio, img).map_err(|e| format!("{e:#}"))
                }
                _ => host_disk(img).map_err(|e| format!("{e:#}")),
            };
            match res {
                Ok(v) => {
                    log(format!(
                        "disk {t} {}: seq write {:.0} MB/s, seq read {:.0} MB/s, rand read {:.0} IOPS",
                        sut.label(),
                        v[0],
                        v[1],
                        v[2]
                    ));
                    if round > 0 {
                        for (m, x) in DISK_METRICS.iter().zip(v) {
                            r.add(*m, sut, round, x);
                        }
                    }
                    if matches!(sut, Sut::Host | Sut::HostThreads) {
                        let b = best.get_or_insert(v);
                        for (b, x) in b.iter_mut().zip(v) {
                            *b = b.max(x);
                        }
                    }
                }
                Err(e) => {
                    log(format!("disk {t} {}: FAILED: {e}", sut.label()));
                    if round > 0 {
                        for m in DISK_METRICS {
                            r.fail(m, sut, e.clone());
                        }
                    }
                }
            }
        }
        if let (Some(b), true) = (best, round > 0) {
            for (m, x) in DISK_METRICS.iter().zip(b) {
                r.add(*m, Sut::HostBest, round, x);
            }
        }
    }
}

/// A buffer of `len` bytes in 2 MiB-aligned anonymous memory advised MADV_HUGEPAGE (THP is
/// `madvise` on these hosts): what QEMU does with its guest RAM, and what decides how many
/// segments an O_DIRECT request needs on the disk below (see the section text).
struct HugeBuf {
    map: *mut libc::c_void,
    map_len: usize,
    start: usize,
    len: usize,
}

/// 2 MiB, the x86-64 huge page.
const HUGE: usize = 2 << 20;

impl HugeBuf {
    fn new(len: usize) -> Result<Self> {
        let region = len.div_ceil(HUGE).max(1) * HUGE;
        let map_len = region + HUGE;
        // SAFETY: a new private anonymous mapping with no address hint and no fd: it cannot
        // alias anything; the result is checked before use.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of an I/O buffer");
        }
        let start = (map as usize).next_multiple_of(HUGE) - map as usize;
        // SAFETY: [map + start, + region) lies inside the mapping made above (start < HUGE and
        // map_len = region + HUGE); madvise only changes how the kernel backs it.
        unsafe {
            libc::madvise(
                map.cast::<u8>().add(start).cast(),
                region,
                libc::MADV_HUGEPAGE,
            )
        };
        Ok(Self {
            map,
            map_len,
            start,
            len,
        })
    }

    fn get(&mut self) -> &mut [u8] {
        // SAFETY: [start, start + len) is inside the live mapping this value alone owns, and
        // `&mut self` makes the returned borrow the only one.
        unsafe { std::slice::from_raw_parts_mut(self.map.cast::<u8>().add(self.start), self.len) }
    }
}

impl Drop for HugeBuf {
    fn drop(&mut self) {
        // SAFETY: `map`/`map_len` are exactly the mapping made in `new`, unmapped only here;
        // no slice of it outlives `self`.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

/// `n` requests of `len` bytes at the offsets `at(i)`, [`BLK_QD`] in flight (one per thread);
/// the time from all threads ready to the last completion.
fn parallel(
    f: &File,
    n: u64,
    len: usize,
    at: &(dyn Fn(u64) -> u64 + Sync),
    write: bool,
) -> Result<Duration> {
    let next = AtomicU64::new(0);
    let failed: Mutex<Option<std::io::Error>> = Mutex::new(None);
    let start = Barrier::new(BLK_QD + 1);
    let mut t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..BLK_QD {
            s.spawn(|| {
                let mut buf = match HugeBuf::new(len) {
                    Ok(mut b) => {
                        // Real pages (not the shared zero page) under every request.
                        b.get().fill(0x5a);
                        Some(b)
                    }
                    Err(e) => {
                        failed
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(std::io::Error::other(format!("{e:#}")));
                        None
                    }
                };
                start.wait();
                let Some(buf) = buf.as_mut() else {
                    return;
                };
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let b = buf.get();
                    let res = if write {
                        f.write_all_at(b, at(i))
                    } else {
                        f.read_exact_at(b, at(i))
                    };
                    if let Err(e) = res {
                        failed
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(e);
                        next.store(n, Ordering::Relaxed);
                        break;
                    }
                }
            });
        }
        start.wait();
        t0 = Instant::now();
    });
    let el = t0.elapsed();
    if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e).context(if write { "pwrite" } else { "pread" });
    }
    Ok(el)
}

/// The probe's `blk=bench` done by the host on `img`: the same bytes, request sizes, queue
/// depth and random offsets (the probe's xorshift with its default seed 1).
fn host_disk(img: &Path) -> Result<DiskNumbers> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(img)
        .with_context(|| format!("cannot open {} with O_DIRECT", img.display()))?;
    let size = f.metadata()?.len();
    let chunks = (BLK_MIB * 16).min(size / SEQ_BYTES as u64).max(1);
    let bytes = chunks as f64 * SEQ_BYTES as f64;
    let seq = |i: u64| i * SEQ_BYTES as u64;
    let tw = parallel(&f, chunks, SEQ_BYTES, &seq, true)?;
    f.sync_data().context("fdatasync")?;
    let tr = parallel(&f, chunks, SEQ_BYTES, &seq, false)?;
    let pages = (size / 512 / 8).max(1);
    let mut x = 0x2545_f491_4f6c_dd1du64 ^ 1;
    let offsets: Vec<u64> = (0..BLK_RAND)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % pages) * 8 * 512
        })
        .collect();
    let rand_at = |i: u64| offsets[i as usize];
    let tn = parallel(&f, BLK_RAND, RAND_BYTES, &rand_at, false)?;
    Ok([
        bytes / tw.as_secs_f64() / 1e6,
        bytes / tr.as_secs_f64() / 1e6,
        BLK_RAND as f64 / tn.as_secs_f64(),
    ])
}

/// In fio's JSON report, the number of the first `"key" : N` after the first `"object" :`
/// (fio puts a direction's `bw_bytes` and `iops` at the top of its object, and a job's
/// `error` before any nested object).
fn fio_number(json: &str, object: &str, key: &str) -> Option<f64> {
    let at = json.find(&format!("\"{object}\" :"))?;
    let rest = &json[at..];
    let k = rest.find(&format!("\"{key}\" :"))? + key.len() + 4;
    let v = rest[k..].trim_start();
    let end = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e' || c == '+'))
        .unwrap_or(v.len());
    v[..end].parse().ok()
}

/// fio's numbers for one job: `(bw_bytes, iops)` of its `dir` ("read" or "write").
fn fio_job(fio: &Path, img: &Path, rw: &str, bs: &str, extra: &[&str]) -> Result<(f64, f64)> {
    let mut a = strings(&[
        "--name=ferro-bench",
        "--direct=1",
        "--ioengine=io_uring",
        "--iodepth",
        &BLK_QD.to_string(),
        "--bs",
        bs,
        "--rw",
        rw,
        "--output-format=json",
    ]);
    a.push(format!("--filename={}", img.display()));
    a.extend(strings(extra));
    let o = proc::output(fio, &a, Duration::from_secs(120))?;
    if o.status != proc::Status::Exited(0) {
        bail!(
            "fio {rw}: {}: {}",
            o.status,
            parse::last_lines(&o.output(), 3)
        );
    }
    let dir = if rw.contains("write") {
        "write"
    } else {
        "read"
    };
    if fio_number(&o.stdout, "jobs", "error") != Some(0.0) {
        bail!(
            "fio {rw}: the job failed: {}",
            parse::last_lines(&o.output(), 3)
        );
    }
    let bw = fio_number(&o.stdout, dir, "bw_bytes").unwrap_or(0.0);
    let iops = fio_number(&o.stdout, dir, "iops").unwrap_or(0.0);
    if bw <= 0.0 || iops <= 0.0 {
        bail!("fio {rw}: no {dir} bandwidth in its report");
    }
    Ok((bw, iops))
}

/// The same three workloads with fio (io_uring, O_DIRECT, queue depth [`BLK_QD`]): seq write
/// and read of the probe's [`BLK_MIB`] MiB from offset 0 in 64 KiB requests, then
/// [`BLK_RAND`] 4 KiB random reads over the whole file (fio's own random offsets).
fn fio_disk(fio: &Path, img: &Path) -> Result<DiskNumbers> {
    let size = format!("--size={}M", BLK_MIB);
    let (w, _) = fio_job(fio, img, "write", "64k", &[&size])?;
    let (rd, _) = fio_job(fio, img, "read", "64k", &[&size])?;
    let io = format!("--io_size={}", BLK_RAND * RAND_BYTES as u64);
    let whole = format!("--size={}M", DISK_MIB);
    let (_, iops) = fio_job(fio, img, "randread", "4k", &[&whole, &io])?;
    Ok([w / 1e6, rd / 1e6, iops])
}

// ---------------------------------------------------------------- network

/// A network namespace of ours with a tap in it; deleted (with the tap) on drop.
struct Netns {
    name: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let o = proc::output(Path::new("ip"), &strings(args), Duration::from_secs(20))?;
    if o.status != proc::Status::Exited(0) {
        bail!(
            "ip {}: {}: {}",
            args.join(" "),
            o.status,
            parse::last_lines(&o.output(), 2)
        );
    }
    Ok(())
}

impl Netns {
    fn create() -> Result<Self> {
        let name = format!("fbench{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        let n = ns.name.as_str();
        // No IPv6 on the tap: its router and listener chatter would reach the guest's count.
        let _ = proc::output(
            Path::new("ip"),
            &strings(&[
                "netns",
                "exec",
                n,
                "sysctl",
                "-qw",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]),
            Duration::from_secs(10),
        );
        ip(&["-n", n, "tuntap", "add", "dev", TAP, "mode", "tap"])?;
        ip(&["-n", n, "addr", "add", TAP_ADDR, "dev", TAP])?;
        ip(&["-n", n, "link", "set", TAP, "up"])?;
        Ok(ns)
    }

    /// `prog args` run inside the namespace.
    fn wrap(&self, prog: &Path, args: Vec<String>) -> (PathBuf, Vec<String>) {
        let mut a = strings(&["netns", "exec", &self.name]);
        a.push(prog.display().to_string());
        a.extend(args);
        (PathBuf::from("ip"), a)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            log(format!("warning: {e:#}"));
        }
    }
}

/// What the host side of one network run did.
#[derive(Debug, Default)]
struct PeerCount {
    /// Bench frames from the guest seen on the tap.
    seen: u64,
    /// Frames handed to the tap for the guest.
    sent: u64,
}

/// An AF_PACKET socket for the bench EtherType bound to `tap` in the namespace the calling
/// thread is in.
fn packet_socket(tap: &str) -> Result<OwnedFd> {
    let name = std::ffi::CString::new(tap).context("tap name")?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("no interface {tap}"));
    }
    // SAFETY: socket takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETHERTYPE.to_be()),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_ll is a valid value of this plain C struct.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETHERTYPE.to_be();
    sll.sll_ifindex = index as i32;
    // SAFETY: `sll` is a valid sockaddr_ll and the length passed is its size; the kernel only
    // reads it during the call.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("bind to the tap");
    }
    let size: libc::c_int = 32 << 20;
    // SAFETY: `size` is a valid c_int that outlives the call, and its size is passed.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    Ok(sock)
}

/// Enters the network namespace `ns` (this thread only).
fn enter_netns(ns: &str) -> Result<()> {
    let f = File::open(format!("/run/netns/{ns}")).with_context(|| format!("netns {ns}"))?;
    // SAFETY: `f` is an open namespace file for the duration of the call; setns changes only
    // the calling thread's network namespace, which is this helper thread's own.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

/// Counts the guest's bench frames until the guest listens (marker 0), then sends it frames
/// of `len` bytes until it has counted enough (marker 1) or the run is over.
fn peer(sock: &OwnedFd, len: usize, markers: &Receiver<usize>) -> PeerCount {
    let fd = sock.as_raw_fd();
    let mut c = PeerCount::default();
    let mut buf = vec![0u8; 2048];
    let mut drain = |c: &mut PeerCount| loop {
        // SAFETY: `buf` is valid and writable for its length during the call.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            break;
        }
        let n = n as usize;
        if n >= 18 && buf[14..18] == *b"FVPB" {
            c.seen += 1;
        }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match markers.try_recv() {
            Ok(0) => break,
            Ok(_) | Err(TryRecvError::Disconnected) => {
                drain(&mut c);
                return c;
            }
            Err(TryRecvError::Empty) => {}
        }
        if Instant::now() > deadline {
            return c;
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd that lives across the call.
        unsafe { libc::poll(&mut p, 1, 10) };
        drain(&mut c);
    }
    drain(&mut c);
    // The frame format of guest/probe/README.md, from a locally administered source MAC.
    let mut f = vec![0u8; len];
    f[0..6].fill(0xff);
    f[6..12].copy_from_slice(&[0x02, 0xfb, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    f[14..18].copy_from_slice(b"FVPB");
    for (i, b) in f[22..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let deadline = Instant::now() + Duration::from_secs(NET_SECS + 20);
    let mut seq = 0u32;
    loop {
        for _ in 0..64 {
            f[18..22].copy_from_slice(&seq.to_be_bytes());
            // SAFETY: `f` is valid for reads of its length during the call.
            let n = unsafe { libc::send(fd, f.as_ptr().cast(), f.len(), 0) };
            if n > 0 {
                c.sent += 1;
                seq = seq.wrapping_add(1);
            }
        }
        match markers.try_recv() {
            Ok(0) | Err(TryRecvError::Empty) => {}
            Ok(_) | Err(TryRecvError::Disconnected) => return c,
        }
        if Instant::now() > deadline {
            return c;
        }
    }
}

fn ferro_net(env: &Env, len: usize) -> (PathBuf, Vec<String>) {
    let mut a = crate::ferro_args(&env.probe, &net_cmdline(len));
    a.push("--net".into());
    a.push(format!("tap={TAP}"));
    (env.ferro.clone(), a)
}

fn qemu_net(env: &Env, len: usize) -> Option<(PathBuf, Vec<String>)> {
    let q = env.qemu.clone()?;
    let mut a = crate::qemu_args(Machine::Q35, &env.probe, &net_cmdline(len));
    a.extend([
        "-netdev".to_string(),
        format!("tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off"),
        "-device".into(),
        "virtio-net-pci,netdev=n0,disable-legacy=on".into(),
    ]);
    Some((q, a))
}

/// One network run: the VMM in the namespace, our peer thread on the tap.
fn net_run(
    ns: &Netns,
    prog: &Path,
    args: Vec<String>,
    len: usize,
    timeout: Duration,
) -> std::result::Result<(String, PeerCount), String> {
    let (prog, args) = ns.wrap(prog, args);
    let (ready_tx, ready_rx) = mpsc::channel::<std::result::Result<(), String>>();
    let (mark_tx, mark_rx) = mpsc::channel::<usize>();
    let ns_name = ns.name.clone();
    let helper = std::thread::Builder::new()
        .name("bench-peer".into())
        .spawn(move || -> PeerCount {
            let sock = enter_netns(&ns_name).and_then(|()| packet_socket(TAP));
            match sock {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    peer(&s, len, &mark_rx)
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    PeerCount::default()
                }
            }
        })
        .map_err(|e| format!("cannot start the peer thread: {e}"))?;
    let ready = ready_rx
        .recv()
        .unwrap_or_else(|_| Err("the peer thread ended".into()));
    if let Err(e) = ready {
        drop(mark_tx);
        let _ = helper.join();
        return Err(e);
    }
    let res = proc::run(&proc::Spec {
        program: &prog,
        args: &args,
        timeout,
        markers: &["net_rx=listening", "net_rx_frames="],
        smaps_at: None,
        echo: false,
        idle_timeout: None,
        marker_tx: Some(&mark_tx),
    });
    drop(mark_tx);
    let count = helper.join().unwrap_or_default();
    let o = res.map_err(|e| format!("{e:#}"))?;
    if let Some(p) = crate::probe_run_problem(&o, &proc::Status::Exited(0)) {
        return Err(p);
    }
    Ok((o.stdout, count))
}

/// The probe's net=bench numbers: tx fps, tx MB/s, rx fps, rx MB/s, frames it sent and got.
fn parse_net(console: &str) -> std::result::Result<[f64; 6], String> {
    let keys = [
        "net_tx_fps",
        "net_tx_mbps",
        "net_rx_fps",
        "net_rx_mbps",
        "net_tx_frames",
        "net_rx_frames",
    ];
    let mut v = [0.0; 6];
    for (i, k) in keys.iter().enumerate() {
        v[i] = parse::kv_num(console, k).ok_or_else(|| format!("no {k}= on the console"))?;
    }
    if v[4] != NET_TX_FRAMES as f64 {
        return Err(format!("the guest sent {} of {NET_TX_FRAMES} frames", v[4]));
    }
    if v[5] < 2.0 {
        return Err(format!("the guest received {} frames", v[5]));
    }
    Ok(v)
}

fn bench_net(env: &Env, runs: usize, timeout: Duration, r: &mut Results, out: &mut VirtioOutcome) {
    let all = [
        Metric::NetTxFps,
        Metric::NetTxMbps,
        Metric::NetRxFps,
        Metric::NetRxMbps,
        Metric::NetTxFps60,
        Metric::NetRxFps60,
        Metric::NetTxSeen,
    ];
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(e) => {
            let why = format!("network namespace: {e:#}");
            log(format!("virtio: {why}"));
            for m in all {
                for s in [Sut::Ferro, Sut::Q35] {
                    r.skip(m, s, why.clone());
                }
            }
            return;
        }
    };
    log(format!(
        "virtio: network, {runs} runs, netns {} tap {TAP}: {}",
        ns.name,
        net_cmdline(1514)
    ));
    let mut short_rx = Vec::new();
    for round in 0..=runs {
        let t = tag(round, runs);
        for len in [1514usize, 60] {
            for sut in [Sut::Ferro, Sut::Q35] {
                let (prog, a) = match sut {
                    Sut::Ferro => ferro_net(env, len),
                    _ => match qemu_net(env, len) {
                        Some(c) => c,
                        None => continue,
                    },
                };
                let metrics: &[Metric] = if len == 1514 { &all[..4] } else { &all[4..6] };
                let res = net_run(&ns, &prog, a, len, timeout)
                    .and_then(|(c, p)| parse_net(&c).map(|v| (v, p)));
                match res {
                    Ok((v, p)) => {
                        let seen = p.seen as f64 * 100.0 / NET_TX_FRAMES as f64;
                        log(format!(
                            "net {t} {} {len} B: guest->host {:.0} frames/s {:.0} MB/s (host saw {seen:.1}%), \
                             host->guest {:.0} frames/s {:.0} MB/s ({} of {} frames sent arrived)",
                            sut.label(),
                            v[0],
                            v[1],
                            v[2],
                            v[3],
                            v[5],
                            p.sent
                        ));
                        if v[5] < NET_RX_FRAMES as f64 {
                            short_rx.push(format!(
                                "{} {len} B round {round}: {}",
                                sut.label(),
                                v[5]
                            ));
                        }
                        if round > 0 {
                            if len == 1514 {
                                r.add(Metric::NetTxFps, sut, round, v[0]);
                                r.add(Metric::NetTxMbps, sut, round, v[1]);
                                r.add(Metric::NetRxFps, sut, round, v[2]);
                                r.add(Metric::NetRxMbps, sut, round, v[3]);
                                r.add(Metric::NetTxSeen, sut, round, seen);
                            } else {
                                r.add(Metric::NetTxFps60, sut, round, v[0]);
                                r.add(Metric::NetRxFps60, sut, round, v[2]);
                            }
                        }
                    }
                    Err(e) => {
                        log(format!("net {t} {} {len} B: FAILED: {e}", sut.label()));
                        if round > 0 {
                            for &m in metrics {
                                r.fail(m, sut, e.clone());
                            }
                            if len == 1514 {
                                r.fail(Metric::NetTxSeen, sut, e.clone());
                            }
                        }
                    }
                }
            }
        }
    }
    if !short_rx.is_empty() {
        out.notes.push(format!(
            "runs whose guest counted fewer than {NET_RX_FRAMES} frames within {NET_SECS} s \
             (rates are still first to last frame): {}",
            short_rx.join("; ")
        ));
    }
}

/// Why huge pages decide the sequential rows (checked 2026-12-03 and 2026-12-05).
const THP_NOTE: &str = "
Transparent huge pages decide the sequential rows on this host: THP is `madvise`; QEMU advises
its guest RAM MADV_HUGEPAGE, and so does ferro-vmm when a disk has `cache=none` (`--huge-pages
auto`, the default), so O_DIRECT transfers land in 2 MiB folios and a 64 KiB request is one
segment on the disk below (vda: max_segments 254) instead of sixteen. With `--huge-pages off`
ferro-vmm's sequential reads were lower in every one of 5 alternating pairs (1394-1807 against
1576-2514 MB/s); QEMU's RAM on a memfd backend (shmem THP is `never`) fell from ~1500 to ~900
MB/s in an earlier check. The host-threads rows use MADV_HUGEPAGE buffers for that reason; fio's
buffers are ordinary heap memory.
";

/// ferro-vmm's disk data path, and how its rows against the host got there (checked 2026-12-05).
const DISK_NOTE: &str = "
ferro-vmm's disk path: no copy (io_uring, or preadv/pwritev on the workers, on iovecs of guest
RAM, in huge pages with `cache=none`). Reads and writes of a raw image, single or merged into
sequential runs of up to 256 KiB, go to an io_uring the event loop submits and reaps itself,
one interrupt decision per batch of completions; each entry is submitted the moment it is
prepared. Flushes, discard, write-zeroes, qcow2 and write-through go to 16 worker threads.
While the disk has requests in flight the event loop polls epoll without sleeping for up to
100 µs after its last event, and 100 µs more after the last completion (QEMU's `poll-max-ns`
idea), and while it polls it takes requests off the available ring itself, with the guest's
kicks off (on PVM a kick is a trapped MMIO write, ~30 µs of vCPU time): ~10 kicks per run,
against ~7400 before. The probe is a polling driver (as Linux's virtio-blk poll queues are): it
sets VIRTQ_AVAIL_F_NO_INTERRUPT while it spins on the used ring (up to `blk_spin`, 1000 µs) and
clears it before it sleeps; ferro-vmm and QEMU both honour it.

How the rows got here (alternating A/B runs of the probe on a quiet host, medians): polling
the loop 60k to 67-72k random-read IOPS; the probe's NO_INTERRUPT 66k to 74k (MSIs 3412 to 806
over 40000 reads; an MSI costs the spinning vCPU an exit); its 1000 µs spin (a 256 KiB O_DIRECT
write takes ~280 µs; a probe that slept took the interrupt through PVM's emulated CPL0 path,
137 µs from a batch's last completion to the next write) sequential writes ~2600 to ~2800 MB/s;
the loop taking requests without kicks 75k to 82k IOPS. The last step was the submission
itself: the host's disk (a virtio disk of the outer hypervisor, one queue) works through a batch
in order and completes it at once, so the 16 slots move in lock-step, and block and io_uring
tracepoints showed p50 26 µs from a batch's last completion to the next read at the disk
against fio's 10 µs. io_uring plugs a submission of more than two entries, so none of a batch
reached the disk until the last was prepared (~11 µs) and the disk started late on every
batch; fio submits one entry per call. Submitting each entry at once: random reads ~79k to ~89k
IOPS (8 of 8 alternating pairs), and writes, which had gone to the workers because through the
plugged ring they were no faster, now gain from the ring: ~2250 to ~2490 MB/s (6 of 8 pairs).
Then the reap: the loop took all 16 completions of a batch (~5 µs) before it looked at the
available ring again, while the guest had already refilled the first slots; reaping two at a
time and taking the refills between steps, random reads won 9 of 12 and 10 of 12 alternating
pairs (medians ~100k to ~106k and ~95k to ~101k IOPS), sequential rows unchanged.
Also tried and dropped: the probe sleeping for the interrupt instead of spinning
(`blk_spin=0`), polling the available ring with the driver's kicks left on (no change), 8 or 32
workers, merged runs of 64 KiB (writes ~20 % lower on the workers), 128 KiB or 512 KiB, the
event loop yielding the CPU while it polls, a worker spinning for the next job before it sleeps
(writes ~25 % lower: the 2 CPUs are already taken by the spinning vCPU and the polling loop),
publishing a reap's used entries in one burst (no change), and polling 400 µs instead of 100 µs
while requests are in flight (no clear change).
";

/// The section's text.
pub fn section(r: &Results, o: &VirtioOutcome, runs: usize, date: &str, head: &str) -> String {
    let image = o
        .image
        .as_ref()
        .map_or_else(|| "(none)".to_string(), |p| p.display().to_string());
    let mut s = format!(
        "## virtio devices, probe guest on /dev/kvm\n\n\
         Measured {date} at commit {head}; {runs} alternating runs per system after one warm-up each \
         (ferro-vmm, QEMU q35, host with fio, host with threads); {MEM_MIB} MiB, 1 vCPU, the same probe binary on both VMMs.\n\n\
         - **Disk**: probe cmdline `{}`: the probe writes {BLK_MIB} MiB from sector 0 in 64 KiB \
         requests, flushes (not timed), reads them back, then does {BLK_RAND} 4 KiB reads at \
         random 4 KiB-aligned offsets of the whole {DISK_MIB} MiB disk, always {BLK_QD} requests \
         in flight. Same raw image file for every system ({image}, on the host's disk, filled \
         with data so no read meets a hole): ferro-vmm `--disk path=F,cache=none`; QEMU \
         `-drive file=F,if=none,id=d0,format=raw,cache=none,aio={} -device \
         virtio-blk-pci,drive=d0,disable-legacy=on`. The host on the same file, same request \
         sizes, same queue depth {BLK_QD}, O_DIRECT: **host, fio io_uring**: `fio --direct=1 --ioengine=io_uring --iodepth={BLK_QD}`, `--rw=write` then \
         `--rw=read` with `--bs=64k --size={BLK_MIB}M`, then `--rw=randread --bs=4k \
         --size={DISK_MIB}M --io_size={}` (fio's own random offsets); **host, 16 O_DIRECT \
         threads**: ferro-bench itself, {BLK_QD} threads each keeping one pread/pwrite in \
         flight, with exactly the probe's offsets and order, buffers in MADV_HUGEPAGE memory \
         as QEMU's guest RAM is; the disk targets compare with \
         **the better of the two** in each round (the host's best). MB = 10^6 bytes.\n\
         - **Network**: probe cmdline `{}` (and `net_frame_len=60`), in a network namespace \
         ferro-bench creates with a tap `{TAP}` ({TAP_ADDR}, IPv6 off), deleted afterwards; \
         ferro-vmm `--net tap={TAP}`, QEMU `-netdev tap,id=n0,ifname={TAP},script=no,\
         downscript=no,vhost=off -device virtio-net-pci,netdev=n0,disable-legacy=on`. \
         **guest→host**: the probe sends {NET_TX_FRAMES} broadcast frames as fast as its tx \
         ring allows and reports the rate (its clock, from the first frame queued to the last \
         buffer returned by the device); a thread of ferro-bench in the namespace counts them \
         on an AF_PACKET socket (the \"frames the host's socket saw\" row; frames the socket \
         could not keep up with are the receiver's loss, not the VMM's). **host→guest**: once \
         the probe says `net_rx=listening`, that thread sends frames on the tap as fast as \
         `send()` goes until the probe has counted {NET_RX_FRAMES} (frames the tap cannot \
         queue are dropped by the kernel); the rate is the probe's, from the first frame it \
         received to the last.\n\n",
        blk_cmdline(),
        o.aio,
        BLK_RAND * RAND_BYTES as u64,
        net_cmdline(1514),
    );
    s.push_str(&format!(
        "Host load average (1, 5, 15 min) at the start of this section: {}; at its end: {} \
         ({} CPUs; other engineers' builds and tests share them: per-round ratios are the \
         steadier column).\n\n",
        crate::fmt_load(o.load.0),
        crate::fmt_load(o.load.1),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    s.push_str(&crate::report::summary_table(r, &ROWS));
    let q_host: Vec<String> = DISK_METRICS
        .iter()
        .filter_map(|&m| {
            crate::stats::ratio(r.median(m, Sut::Q35), r.median(m, Sut::HostBest)).map(|x| {
                format!(
                    "{} {}",
                    m.label().trim_start_matches("disk: "),
                    crate::stats::fmt_ratio(x)
                )
            })
        })
        .collect();
    if !q_host.is_empty() {
        s.push_str(&format!(
            "\nQEMU against the host's own numbers: {}.\n",
            q_host.join(", ")
        ));
    }
    s.push_str(THP_NOTE);
    s.push_str(DISK_NOTE);
    s.push_str("\nAll samples:\n\n");
    s.push_str(&crate::report::spread_table(r, &METRICS));
    if !o.notes.is_empty() {
        s.push('\n');
        for n in &o.notes {
            s.push_str(&format!("- {n}\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_blk() {
        let c = "blk_flush=ok\nblk_seq_write_mbps=1324 blk_seq_read_mbps=876 blk_rand_read_iops=31639\n\
                 blk_bench_bytes=134217728 blk_bench_rand=5000 blk_bench_qd=16\n";
        assert_eq!(parse_blk(c).unwrap(), [1324.0, 876.0, 31639.0]);
        assert!(parse_blk(&c.replace("=876", "=0")).is_err());
        assert!(parse_blk(&c.replace("qd=16", "qd=1")).is_err());
        assert!(parse_blk("nothing").is_err());
    }

    #[test]
    fn parses_net() {
        let c = "net_tx_frames=100000 net_tx_fps=90000 net_tx_mbps=136\nnet_rx=listening\n\
                 net_rx_frames=100000 net_rx_bytes=151400000 net_rx_fps=80000 net_rx_mbps=121\n";
        let v = parse_net(c).unwrap();
        assert_eq!(v[0], 90000.0);
        assert_eq!(v[3], 121.0);
        assert!(parse_net(&c.replace("net_tx_frames=100000", "net_tx_frames=5")).is_err());
        assert!(parse_net("net_tx_fps=1").is_err());
    }

    #[test]
    fn parses_fio() {
        let j = r#"{ "jobs" : [ { "jobname" : "x", "error" : 0, "read" : { "io_bytes" : 0,
            "bw_bytes" : 0, "iops" : 0.000000 }, "write" : { "io_bytes" : 134217728,
            "bw_bytes" : 633102490, "bw" : 618264, "iops" : 9660.377358 } } ] }"#;
        assert_eq!(fio_number(j, "jobs", "error"), Some(0.0));
        assert_eq!(fio_number(j, "write", "bw_bytes"), Some(633102490.0));
        assert_eq!(fio_number(j, "write", "iops"), Some(9660.377358));
        assert_eq!(fio_number(j, "read", "bw_bytes"), Some(0.0));
        assert_eq!(fio_number(j, "trim", "iops"), None);
    }

    #[test]
    fn cmdlines() {
        assert!(blk_cmdline().contains("blk=bench blk_mib=448 blk_rand=40000 blk_qd=16"));
        assert!(net_cmdline(60).contains("net=bench net_tx_frames=100000 net_frame_len=60"));
    }
}
