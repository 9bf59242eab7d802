//! The storage-migration rows (no shared storage): the probe guest with a raw disk of
//! `DISK_MIB` filled with non-zero data, moved with its disk over loopback TCP.
//!
//! - ferro-vmm: destination `ferro-vmm --incoming tcp:127.0.0.1:0 --incoming-storage DIR`
//!   (it writes DIR/disk0.raw and DIR/kernel), source control request `migrate` with
//!   `"copy_storage": true`.
//! - QEMU, as libvirt's `--copy-storage-all` does it: the destination starts paused (`-S`) with
//!   `-incoming` and a blank image of the same size, exported writable over NBD (QMP
//!   `nbd-server-start` + `nbd-server-add`); the source mirrors its drive into that export
//!   (`drive-mirror`, sync full, mode existing) and, once the job is ready, migrates with
//!   `pause-before-switchover`: stopped before the devices' state goes, it cancels the job
//!   (which leaves the target a point-in-time copy of the stopped source) and continues; once
//!   the migration has completed the destination stops its NBD server and continues.
//!
//! Two guests: the idle beating guest of the migration rows (it never touches its disk), and
//! one that writes the probe's test pattern over the first `WRITE_MIB` of its disk, one 64 KiB
//! request at a time, from its start until after it has moved, then reads it back. Every run
//! checks the destination's copy byte for byte: against the source's image (idle guest) or
//! against what the writing guest must leave (its pattern, then the original data).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{
    cmdline, ferro_args, ferro_request, free_port, guest_side, listening, ms, qemu_args, strings,
    Kind, Migration, Qmp, Vm, AFTER_BEATS, DOWNTIME_MS, MICROVM, WARM_BEATS, WARM_LIMIT,
};
use crate::report::Metric;
use crate::Env;

/// The guest's disk, MiB.
pub const DISK_MIB: u64 = 512;
/// What the writing guest writes, from sector 0, MiB (the rest keeps the original data).
pub const WRITE_MIB: u64 = 448;
const WRITE_SECTORS: u64 = WRITE_MIB << 11;
/// QEMU's drive id (the BlockBackend the mirror and the NBD export name).
const DRIVE: &str = "d0";
/// How long the writing guest may take to finish on the destination.
const FINISH_LIMIT: Duration = Duration::from_secs(120);

/// The guests of the storage rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guest {
    /// The heartbeat only; the disk is never touched.
    Idle,
    /// Writes its test pattern over the disk while it is migrated, then verifies it.
    Writing,
}

impl Guest {
    pub fn name(self) -> &'static str {
        match self {
            Guest::Idle => "idle",
            Guest::Writing => "writing",
        }
    }

    /// total, until the destination runs, guest-side gap, VMM downtime, bytes, disk bytes.
    pub fn metrics(self) -> [Option<Metric>; 6] {
        match self {
            Guest::Idle => [
                Some(Metric::StoreTotal),
                Some(Metric::StoreRun),
                Some(Metric::StoreGap),
                Some(Metric::StoreDowntime),
                Some(Metric::StoreBytes),
                Some(Metric::StoreDiskBytes),
            ],
            Guest::Writing => [
                Some(Metric::StoreWriteTotal),
                Some(Metric::StoreWriteRun),
                None,
                Some(Metric::StoreWriteDowntime),
                Some(Metric::StoreWriteBytes),
                Some(Metric::StoreWriteDiskBytes),
            ],
        }
    }
}

/// Every metric of the storage rows.
pub fn all_metrics() -> Vec<Metric> {
    [Guest::Idle, Guest::Writing]
        .iter()
        .flat_map(|g| g.metrics().into_iter().flatten())
        .collect()
}

/// The writing guest's command line (both VMMs; QEMU's gets `pci_ecam=` in front).
pub fn write_cmdline() -> String {
    format!("smp=off blk=write blk_sectors={WRITE_SECTORS} blk_qd=1 exit=poweroff")
}

fn guest_cmdline(g: Guest) -> String {
    match g {
        Guest::Idle => cmdline(Kind::Idle),
        Guest::Writing => write_cmdline(),
    }
}

/// The probe finds QEMU microvm's ECAM only through `pci_ecam=` (its ACPI tables have no MCFG
/// in 7.2); the idle guest touches no PCI at all.
fn qemu_cmdline(g: Guest) -> String {
    match g {
        Guest::Idle => guest_cmdline(g),
        Guest::Writing => format!("pci_ecam=0xe0000000 {}", write_cmdline()),
    }
}

/// A destination's copy that differs from what it must hold: the bench fails on it.
#[derive(Debug)]
pub struct CopyMismatch(pub String);

impl std::fmt::Display for CopyMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CopyMismatch {}

/// The disk images every run starts from.
pub struct Images {
    /// The source's disk: `DISK_MIB` of non-zero pseudo-random words.
    pub base: PathBuf,
    /// What the writing guest leaves: its pattern over `WRITE_MIB`, then `base`'s data.
    pub expected: PathBuf,
}

/// Word `w` of sector `s` of the probe's `blk=write` pattern with seed 1
/// (guest/probe/README.md).
fn pattern_word(s: u64, w: u64) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (s * 64 + w);
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Writes both images into `dir`.
pub fn make_images(dir: &Path) -> Result<Images> {
    const CHUNK: usize = 1 << 20;
    let base = dir.join("store-base.raw");
    let expected = dir.join("store-expected.raw");
    let mut b = File::create(&base).with_context(|| format!("create {}", base.display()))?;
    let mut e =
        File::create(&expected).with_context(|| format!("create {}", expected.display()))?;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut buf = vec![0u8; CHUNK];
    let mut pat = vec![0u8; CHUNK];
    for mib in 0..DISK_MIB {
        for c in buf.chunks_exact_mut(8) {
            // xorshift64: never zero, so no word of the disk is.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        b.write_all(&buf)
            .with_context(|| format!("write {}", base.display()))?;
        let want = if mib < WRITE_MIB {
            let s0 = mib << 11;
            for (i, c) in pat.chunks_exact_mut(8).enumerate() {
                let i = i as u64;
                c.copy_from_slice(&pattern_word(s0 + i / 64, i % 64).to_le_bytes());
            }
            &pat
        } else {
            &buf
        };
        e.write_all(want)
            .with_context(|| format!("write {}", expected.display()))?;
    }
    Ok(Images { base, expected })
}

/// Fails with [`CopyMismatch`] unless `copy` holds the same bytes as `reference`.
fn check_copy(copy: &Path, reference: &Path) -> Result<()> {
    const CHUNK: usize = 4 << 20;
    let a = File::open(copy).with_context(|| format!("open {}", copy.display()))?;
    let b = File::open(reference).with_context(|| format!("open {}", reference.display()))?;
    let (la, lb) = (a.metadata()?.len(), b.metadata()?.len());
    if la != lb {
        return Err(CopyMismatch(format!(
            "the destination's copy {} has {la} bytes, {} has {lb}",
            copy.display(),
            reference.display()
        ))
        .into());
    }
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut off = 0u64;
    while off < la {
        let n = CHUNK.min((la - off) as usize);
        a.read_exact_at(&mut ba[..n], off)
            .with_context(|| format!("read {}", copy.display()))?;
        b.read_exact_at(&mut bb[..n], off)
            .with_context(|| format!("read {}", reference.display()))?;
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap_or(0) as u64;
            return Err(CopyMismatch(format!(
                "the destination's copy {} differs from {} at byte {} (sector {})",
                copy.display(),
                reference.display(),
                off + i,
                (off + i) / 512
            ))
            .into());
        }
        off += n as u64;
    }
    Ok(())
}

/// Whether `e` is (or wraps) a [`CopyMismatch`].
pub fn is_copy_mismatch(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<CopyMismatch>())
}

/// What one storage migration measured.
#[derive(Debug, Default)]
pub struct StoreRun {
    /// ferro-vmm: the migrate request to its answer; QEMU: `drive-mirror` to `query-migrate`
    /// saying completed (host clock, both).
    pub total_ms: f64,
    /// ferro-vmm: the same (the answer comes once the destination runs the VM); QEMU: until
    /// the destination's `cont` has answered, after the block job ended.
    pub run_ms: f64,
    pub gap_ms: Option<f64>,
    pub downtime_ms: Option<f64>,
    pub bytes: f64,
    pub disk_bytes: f64,
    pub note: Option<String>,
    /// More of the VMM's own figures, for the log.
    pub detail: String,
}

/// A fresh directory for one run.
fn fresh(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))
}

fn copy_image(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Waits until the source guest is where the migration starts: beat `WARM_BEATS` (idle), or
/// the disk found and the writes about to start (writing).
fn wait_start(src: &mut Vm, g: Guest, what: &str) -> Result<()> {
    match g {
        Guest::Idle => src.wait_beat(what, WARM_BEATS, WARM_LIMIT),
        Guest::Writing => src.wait(what, WARM_LIMIT, |v| v.stdout().contains("blk_capacity=")),
    }
}

/// The writing guest after the move: it must finish on the destination, its read-back
/// verified; a note when it had finished its writes before the switch-over (the copy was
/// then not raced).
fn finish_writing(src: &Vm, dst: &mut Vm, what: &str) -> Result<Option<String>> {
    dst.wait(what, FINISH_LIMIT, |v| v.stdout().contains("probe=exit:"))?;
    let (s, d) = (src.stdout(), dst.stdout());
    let both = format!("{s}{d}");
    for want in ["blk_write=ok", "blk_flush=ok"] {
        if !both.contains(want) {
            bail!(
                "{what}: the guest did not report {want}: {}",
                crate::parse::last_lines(&d, 4)
            );
        }
    }
    if !d.contains("blk_verify=ok") {
        bail!(
            "{what}: the guest's read-back on the destination failed: {}",
            crate::parse::last_lines(&d, 4)
        );
    }
    if dst.wait_exit(Duration::from_secs(10)).is_none() {
        bail!("{what} did not exit after the guest powered off");
    }
    Ok(s.contains("blk_write=")
        .then(|| "the guest had finished its writes before the switch-over".to_string()))
}

pub fn migrate_ferro(
    env: &Env,
    dir: &Path,
    img: &Images,
    g: Guest,
    limit: Duration,
) -> Result<StoreRun> {
    let work = dir.join("store-ferro");
    fresh(&work)?;
    let disk = work.join("src.raw");
    copy_image(&img.base, &disk)?;
    let dst_dir = work.join("dst");
    let ctl = work.join("src.sock");
    let mut dst_args = strings(&["--incoming", "tcp:127.0.0.1:0", "--incoming-storage"]);
    dst_args.push(dst_dir.display().to_string());
    dst_args.extend(strings(&["--serial", "stdio"]));
    let mut dst = Vm::spawn(&env.ferro, &dst_args, limit)?;
    dst.wait("destination ferro-vmm", Duration::from_secs(10), |v| {
        listening(&v.stderr()).is_some()
    })?;
    let addr = listening(&dst.stderr()).context("no listening address")?;
    let mut args = ferro_args(env, &guest_cmdline(g), &ctl);
    args.push("--disk".into());
    args.push(format!("path={}", disk.display()));
    let mut src = Vm::spawn(&env.ferro, &args, limit)?;
    wait_start(&mut src, g, "source ferro-vmm")?;
    let from = Instant::now();
    let req =
        json!({"cmd": "migrate", "to": addr, "downtime_ms": DOWNTIME_MS, "copy_storage": true});
    let answer = ferro_request(&ctl, &req, limit)?;
    let total_ms = ms(from.elapsed());
    let mig = &answer["status"]["migration"];
    let num = |k: &str| mig[k].as_f64();
    let mut s = StoreRun {
        total_ms,
        run_ms: total_ms,
        downtime_ms: num("downtime_ms"),
        bytes: num("bytes").context("no bytes in the answer")?,
        disk_bytes: num("disk_bytes").context("no disk_bytes in the answer")?,
        detail: format!(
            "VMM total {:?} ms, rounds {:?}, bandwidth {:?} MiB/s",
            num("total_ms"),
            num("rounds"),
            num("bandwidth_bps").map(|b| (b / (1 << 20) as f64).round())
        ),
        ..Default::default()
    };
    match src.wait_exit(Duration::from_secs(10)) {
        Some(0) => {}
        other => bail!(
            "the source did not exit 0 after the migration ({other:?}): {}",
            crate::parse::last_lines(&src.stderr(), 2)
        ),
    }
    let copy = dst_dir.join("disk0.raw");
    match g {
        Guest::Idle => {
            let at = src.last_beat().unwrap_or(0);
            dst.wait_beat(
                "destination ferro-vmm",
                at + AFTER_BEATS,
                Duration::from_secs(20),
            )?;
            let mut m = Migration::default();
            guest_side(&src, &dst, from, &mut m)?;
            s.gap_ms = Some(m.guest_gap_ms);
            s.note = m.note;
            drop(dst);
            check_copy(&copy, &disk)?;
        }
        Guest::Writing => {
            s.note = finish_writing(&src, &mut dst, "destination ferro-vmm")?;
            check_copy(&copy, &img.expected)?;
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(s)
}

/// The QEMU command line of these rows: the migration rows' one on microvm with PCIe, and
/// the disk as a virtio-blk-pci.
fn qemu_store_args(
    env: &Env,
    cmdline: &str,
    qmp: &Path,
    disk: &Path,
    incoming: Option<&str>,
) -> Vec<String> {
    let mut a: Vec<String> = qemu_args(env, cmdline, qmp, None)
        .into_iter()
        .map(|x| {
            if x == MICROVM {
                format!("{MICROVM},pcie=on")
            } else {
                x
            }
        })
        .collect();
    a.push("-drive".into());
    a.push(format!(
        "file={},if=none,id={DRIVE},format=raw",
        disk.display()
    ));
    a.push("-device".into());
    a.push(format!("virtio-blk-pci,drive={DRIVE},disable-legacy=on"));
    if let Some(i) = incoming {
        // Paused until the mirror has ended, as libvirt starts it.
        a.push("-S".into());
        a.push("-incoming".into());
        a.push(i.into());
    }
    a
}

/// The mirror job's entry in `query-block-jobs`, if it is still there.
fn mirror_job(q: &mut Qmp) -> Result<Option<Value>> {
    let jobs = q.cmd("query-block-jobs", json!({}))?;
    Ok(jobs
        .as_array()
        .and_then(|a| a.iter().find(|j| j["device"] == DRIVE))
        .cloned())
}

/// The last block-job event of the mirror, for error messages.
fn last_job_event(q: &Qmp) -> String {
    q.events
        .iter()
        .rev()
        .find(|e| {
            e["event"]
                .as_str()
                .is_some_and(|n| n.starts_with("BLOCK_JOB_"))
        })
        .map(|e| e.to_string())
        .unwrap_or_else(|| "no block-job event".into())
}

/// Polls until the mirror is ready (source and target in sync, the job mirroring new
/// writes); the job's `offset` then.
fn wait_mirror_ready(q: &mut Qmp, src: &mut Vm, limit: Duration) -> Result<f64> {
    let until = Instant::now() + limit;
    loop {
        let Some(j) = mirror_job(q)? else {
            bail!(
                "the mirror job ended before it was ready: {}",
                last_job_event(q)
            );
        };
        if j["io-status"].as_str().is_some_and(|s| s != "ok") {
            bail!("the mirror job met an I/O error: {j}");
        }
        if j["ready"] == true {
            return Ok(j["offset"].as_f64().unwrap_or(0.0));
        }
        src.check_alive("source QEMU")?;
        if Instant::now() >= until {
            bail!("the mirror job was not ready after {limit:?}: {j}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// After `block-job-cancel` on a ready mirror: waits for the job to end; the bytes it copied
/// (`offset` of its BLOCK_JOB_COMPLETED event).
fn wait_mirror_end(q: &mut Qmp, limit: Duration) -> Result<f64> {
    let until = Instant::now() + limit;
    while mirror_job(q)?.is_some() {
        if Instant::now() >= until {
            bail!("the mirror job had not ended {limit:?} after block-job-cancel");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let ev = q
        .events
        .iter()
        .rev()
        .find(|e| {
            matches!(
                e["event"].as_str(),
                Some("BLOCK_JOB_COMPLETED") | Some("BLOCK_JOB_CANCELLED")
            ) && e["data"]["device"] == DRIVE
        })
        .cloned()
        .context("the mirror job ended without a BLOCK_JOB_COMPLETED event")?;
    if ev["event"] != "BLOCK_JOB_COMPLETED" {
        bail!("the mirror job was cancelled out of sync: {ev}");
    }
    if let Some(e) = ev["data"].get("error") {
        bail!("the mirror job failed: {e}");
    }
    ev["data"]["offset"]
        .as_f64()
        .context("no offset in BLOCK_JOB_COMPLETED")
}

/// `: QEMU said ...` with the last lines of a QEMU's stderr, or nothing.
fn said(v: &Vm) -> String {
    let e = v.stderr();
    if e.trim().is_empty() {
        String::new()
    } else {
        format!(": QEMU said {}", crate::parse::last_lines(&e, 3))
    }
}

/// Polls `query-migrate` until its status is `want`; its last answer.
fn wait_status(q: &mut Qmp, want: &str, limit: Duration) -> Result<Value> {
    let until = Instant::now() + limit;
    loop {
        let v = q.cmd("query-migrate", json!({}))?;
        match v["status"].as_str() {
            Some(s) if s == want => return Ok(v),
            Some("failed") | Some("cancelled") => bail!("QEMU migration failed: {v}"),
            Some("completed") => bail!("QEMU migration completed before {want}: {v}"),
            _ => {}
        }
        if Instant::now() >= until {
            bail!("QEMU migration not {want} after {limit:?}: {v}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn migrate_qemu(
    env: &Env,
    qemu: &Path,
    dir: &Path,
    img: &Images,
    g: Guest,
    limit: Duration,
) -> Result<StoreRun> {
    let work = dir.join("store-qemu");
    fresh(&work)?;
    let src_img = work.join("src.raw");
    copy_image(&img.base, &src_img)?;
    let dst_img = work.join("dst.raw");
    File::create(&dst_img)
        .and_then(|f| f.set_len(DISK_MIB << 20))
        .with_context(|| format!("create {}", dst_img.display()))?;
    let (sq, dq, nbd) = (
        work.join("src.qmp"),
        work.join("dst.qmp"),
        work.join("nbd.sock"),
    );
    let port = free_port()?;
    let uri = format!("tcp:127.0.0.1:{port}");
    let line = qemu_cmdline(g);
    let mut dst = Vm::spawn(
        qemu,
        &qemu_store_args(env, &line, &dq, &dst_img, Some(&uri)),
        limit,
    )?;
    let mut dqmp = Qmp::connect(&dq, Duration::from_secs(10))?;
    dqmp.migration_parameters()?;
    dqmp.cmd(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
    )
    .with_context(|| format!("destination nbd-server-start{}", said(&dst)))?;
    dqmp.cmd("nbd-server-add", json!({"device": DRIVE, "writable": true}))
        .with_context(|| format!("destination nbd-server-add{}", said(&dst)))?;
    let mut src = Vm::spawn(
        qemu,
        &qemu_store_args(env, &line, &sq, &src_img, None),
        limit,
    )?;
    let mut sqmp = Qmp::connect(&sq, Duration::from_secs(10))?;
    sqmp.migration_parameters()?;
    // As libvirt: the source stops before it sends the devices' state, so that the mirror is
    // cancelled (and so in sync) while the source's disk is still active.
    sqmp.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]}),
    )?;
    wait_start(&mut src, g, "source QEMU")?;
    let from = Instant::now();
    sqmp.cmd(
        "drive-mirror",
        json!({
            "device": DRIVE,
            "target": format!("nbd:unix:{}:exportname={DRIVE}", nbd.display()),
            "sync": "full",
            "mode": "existing",
            "format": "raw",
        }),
    )
    .with_context(|| format!("source drive-mirror{}", said(&src)))?;
    let ready_offset = wait_mirror_ready(&mut sqmp, &mut src, limit)
        .with_context(|| format!("source mirror job{}", said(&src)))?;
    let ready_ms = ms(from.elapsed());
    sqmp.cmd("migrate", json!({"uri": uri}))?;
    wait_status(&mut sqmp, "pre-switchover", limit)
        .with_context(|| format!("source migrate{}", said(&src)))?;
    let paused_ms = ms(from.elapsed());
    sqmp.cmd("block-job-cancel", json!({"device": DRIVE}))
        .with_context(|| format!("source block-job-cancel{}", said(&src)))?;
    let disk_bytes = wait_mirror_end(&mut sqmp, Duration::from_secs(60))
        .with_context(|| format!("source block-job-cancel{}", said(&src)))?;
    sqmp.cmd("migrate-continue", json!({"state": "pre-switchover"}))
        .with_context(|| format!("source migrate-continue{}", said(&src)))?;
    let v = wait_status(&mut sqmp, "completed", limit)
        .with_context(|| format!("source migrate after the switch-over{}", said(&src)))?;
    let total_ms = ms(from.elapsed());
    dqmp.cmd("nbd-server-stop", json!({}))
        .with_context(|| format!("destination nbd-server-stop{}", said(&dst)))?;
    dqmp.cmd("cont", json!({}))
        .with_context(|| format!("destination cont{}", said(&dst)))?;
    let run_ms = ms(from.elapsed());
    let ram = v["ram"]["transferred"]
        .as_f64()
        .context("no ram.transferred")?;
    let mut s = StoreRun {
        total_ms,
        run_ms,
        downtime_ms: v["downtime"].as_f64(),
        bytes: ram + disk_bytes,
        disk_bytes,
        detail: format!(
            "mirror ready after {ready_ms:.0} ms ({:.0} MiB copied by then), paused before the \
             switch-over at {paused_ms:.0} ms, migrate total-time {:?} ms, rounds {:?}",
            ready_offset / (1 << 20) as f64,
            v["total-time"].as_f64(),
            v["ram"]["dirty-sync-count"].as_f64()
        ),
        ..Default::default()
    };
    let _ = sqmp.cmd("quit", json!({}));
    src.wait_exit(Duration::from_secs(5));
    match g {
        Guest::Idle => {
            let at = src.last_beat().unwrap_or(0);
            dst.wait_beat(
                "destination QEMU",
                at + AFTER_BEATS,
                Duration::from_secs(20),
            )?;
            let mut m = Migration::default();
            guest_side(&src, &dst, from, &mut m)?;
            s.gap_ms = Some(m.guest_gap_ms);
            s.note = m.note;
            drop(dqmp);
            drop(dst);
            check_copy(&dst_img, &src_img)?;
        }
        Guest::Writing => {
            s.note = finish_writing(&src, &mut dst, "destination QEMU")?;
            check_copy(&dst_img, &img.expected)?;
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_pattern() {
        assert_ne!(pattern_word(1, 0), pattern_word(0, 0));
        assert!(write_cmdline().contains("blk_sectors=917504 blk_qd=1"));
        assert!(qemu_cmdline(Guest::Writing).starts_with("pci_ecam=0xe0000000 "));
    }

    #[test]
    fn copies_are_compared() {
        let dir = std::env::temp_dir().join(format!("ferro-bench-cmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        let data: Vec<u8> = (0..(5u32 << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&a, &data).unwrap();
        std::fs::write(&b, &data).unwrap();
        assert!(check_copy(&a, &b).is_ok());
        let mut other = data.clone();
        other[(4 << 20) + 3] ^= 1;
        std::fs::write(&b, &other).unwrap();
        let e = check_copy(&a, &b).unwrap_err();
        assert!(is_copy_mismatch(&e), "{e:#}");
        assert!(e.to_string().contains("at byte 4194307"), "{e:#}");
        std::fs::write(&b, &data[..100]).unwrap();
        assert!(is_copy_mismatch(&check_copy(&a, &b).unwrap_err()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
