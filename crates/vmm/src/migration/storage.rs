//! Storage migration: the disks, the kernel and the initrd go with the VM, for a destination
//! that does not see the source's files (no shared storage).
//!
//! The source copies each disk whole before the memory (blocks that read as zeros are left
//! out: the destination's image starts empty), with the disk's write log
//! ([`ferro_disk::tracked::WriteLog`]) on from before the first read; each later copy round
//! resends the blocks the guest wrote meanwhile, and the stop-and-copy round, once the block
//! devices have drained and flushed, the last ones. The copy rounds go on until the dirty
//! pages *and* dirty disk blocks together fit the downtime. The kernel and initrd go first,
//! whole (a reboot on the destination boots them again).
//!
//! The destination writes everything into a directory of its own (`ferro-vmm --incoming
//! tcp:... --incoming-storage DIR`): `kernel`, `initrd`, `disk{i}.raw` (raw, sparse: the
//! guest-visible contents whatever the source's format), which [`VmConfig::relocated`]
//! names. It creates them new (an existing file is refused, never overwritten), writes
//! every record after checking it against the sizes the source announced (into the page
//! cache: the copy runs at memory speed, not the disk's), and removes them again if the VM
//! does not come. Once the VM runs there, a thread writes them back to the disk and the
//! control socket's `status` says when that is done (`storage_synced`): until then the
//! source's files are the durable copy of what the guest had flushed, so whoever drives the
//! migration deletes them only after (the daemon does). A guest's own FLUSH on the
//! destination makes the whole file durable as usual.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use ferro_api::VmConfig;
use ferro_disk::tracked::{Tracked, TRACK_BLOCK};
use ferro_disk::BlockBackend;
use serde::{Deserialize, Serialize};

use super::wire::{self, FileKind, SECTOR};
use super::MigrationError;

/// Bytes read from a disk or file per record (at most).
pub const CHUNK: u64 = 1 << 20;
/// Alignment of the destination's direct writes (offset, length and memory).
const DIRECT_ALIGN: usize = 4096;

/// What a storage migration copies, in the [`super::Setup`] record: sizes in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageCopy {
    /// Each disk's virtual size, in configuration order.
    pub disks: Vec<u64>,
    /// The kernel file's size.
    pub kernel: u64,
    /// The initrd file's size, when the VM has one.
    pub initrd: Option<u64>,
}

fn vmm(e: impl std::fmt::Display) -> MigrationError {
    MigrationError::Vmm(e.to_string())
}

fn bad(what: String) -> MigrationError {
    MigrationError::Malformed(what)
}

/// Source: what it will copy, from the VM's configuration and its opened disks.
pub fn describe(config: &VmConfig, disks: &[Arc<Tracked>]) -> Result<StorageCopy, MigrationError> {
    let size = |what: &str, p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.len())
            .map_err(|e| vmm(format!("cannot copy the {what} {}: {e}", p.display())))
    };
    if disks.len() != config.disks.len() {
        return Err(vmm(format!(
            "{} disks configured, {} open",
            config.disks.len(),
            disks.len()
        )));
    }
    Ok(StorageCopy {
        // Whole sectors: the guest sees no more than that.
        disks: disks.iter().map(|d| d.size() / SECTOR * SECTOR).collect(),
        kernel: size("kernel", &config.kernel)?,
        initrd: config
            .initrd
            .as_deref()
            .map(|p| size("initrd", p))
            .transpose()?,
    })
}

/// Source: sends the kernel and initrd whole, as `copy` described them.
pub fn send_files(
    w: &mut impl Write,
    config: &VmConfig,
    copy: &StorageCopy,
) -> Result<u64, MigrationError> {
    let mut files = vec![(FileKind::Kernel, config.kernel.as_path(), copy.kernel)];
    if let (Some(p), Some(n)) = (config.initrd.as_deref(), copy.initrd) {
        files.push((FileKind::Initrd, p, n));
    }
    let mut buf = vec![0u8; CHUNK as usize];
    let mut sent = 0;
    for (kind, path, size) in files {
        let what = || format!("cannot copy {}", path.display());
        let f = File::open(path).map_err(|e| vmm(format!("{}: {e}", what())))?;
        let mut at = 0u64;
        while at < size {
            let n = (size - at).min(CHUNK) as usize;
            f.read_exact_at(&mut buf[..n], at)
                .map_err(|e| vmm(format!("{}: {e}", what())))?;
            wire::write_file(w, kind, at, &buf[..n])?;
            at += n as u64;
            sent += n as u64;
        }
    }
    Ok(sent)
}

/// Source: copies the disks' blocks to the destination, reading through the same backends the
/// block devices use.
pub struct DiskCopier {
    disks: Vec<Arc<Tracked>>,
    sizes: Vec<u64>,
    buf: Vec<u8>,
}

impl DiskCopier {
    /// Starts every disk's write log: from here on each guest write is resent.
    pub fn start(disks: Vec<Arc<Tracked>>, sizes: Vec<u64>) -> Self {
        for d in &disks {
            d.log().start();
        }
        Self {
            disks,
            sizes,
            buf: vec![0u8; CHUNK as usize],
        }
    }

    /// Bytes of blocks written since they were last taken.
    pub fn dirty_bytes(&self) -> u64 {
        self.disks
            .iter()
            .map(|d| d.log().count() * TRACK_BLOCK)
            .sum()
    }

    /// Sends every block of every disk that does not read as zeros. Returns the bytes sent.
    pub fn everything(&mut self, w: &mut impl Write) -> Result<u64, MigrationError> {
        let mut sent = 0;
        for i in 0..self.disks.len() {
            let size = self.sizes[i];
            let mut at = 0;
            while at < size {
                let len = (size - at).min(CHUNK);
                sent += self.range(w, i, at, len, false)?;
                at += len;
            }
        }
        Ok(sent)
    }

    /// Sends the blocks written since the last call (or since [`DiskCopier::start`]); blocks
    /// that read as zeros now go as zero ranges. Returns the bytes of disk contents sent.
    pub fn dirty(&mut self, w: &mut impl Write) -> Result<u64, MigrationError> {
        let mut sent = 0;
        for i in 0..self.disks.len() {
            let bits = self.disks[i].log().take();
            let size = self.sizes[i];
            let per_chunk = CHUNK / TRACK_BLOCK;
            let mut run: Option<(u64, u64)> = None;
            let blocks = bits.iter().enumerate().flat_map(|(wi, &word)| {
                (0..64u64)
                    .filter(move |b| word & (1 << b) != 0)
                    .map(move |b| wi as u64 * 64 + b)
            });
            for b in blocks.chain(std::iter::once(u64::MAX)) {
                match run {
                    Some((first, n)) if b != u64::MAX && b == first + n && n < per_chunk => {
                        run = Some((first, n + 1))
                    }
                    _ => {
                        if let Some((first, n)) = run.take() {
                            let at = first * TRACK_BLOCK;
                            let len = (n * TRACK_BLOCK).min(size.saturating_sub(at));
                            if len > 0 {
                                sent += self.range(w, i, at, len, true)?;
                            }
                        }
                        if b != u64::MAX {
                            run = Some((b, 1));
                        }
                    }
                }
            }
        }
        Ok(sent)
    }

    /// Stops every disk's write log.
    pub fn stop(&self) {
        for d in &self.disks {
            d.log().stop();
        }
    }

    /// Reads `[at, at + len)` of disk `i` (at most [`CHUNK`]) and sends it block by block:
    /// runs of blocks with data as [`wire::Kind::Disk`] records, runs that read as zeros as
    /// [`wire::Kind::DiskZeros`] when `zeros` (a block sent before may hold data there).
    fn range(
        &mut self,
        w: &mut impl Write,
        i: usize,
        at: u64,
        len: u64,
        zeros: bool,
    ) -> Result<u64, MigrationError> {
        let buf = &mut self.buf[..len as usize];
        self.disks[i]
            .read_at(buf, at)
            .map_err(|e| vmm(format!("reading disk {i} to copy it: {e}")))?;
        let disk = i as u32;
        let mut sent = 0;
        // (start, end, data?) of the current run inside `buf`.
        let mut cur: Option<(usize, usize, bool)> = None;
        let mut emit = |w: &mut dyn Write, (s, e, data): (usize, usize, bool)| {
            if data {
                sent += (e - s) as u64;
                wire::write_disk(w, disk, at + s as u64, &buf[s..e])
            } else if zeros {
                wire::write_disk_zeros(w, disk, at + s as u64, (e - s) as u64)
            } else {
                Ok(())
            }
        };
        let step = TRACK_BLOCK as usize;
        let mut s = 0;
        while s < buf.len() {
            let e = (s + step).min(buf.len());
            let data = buf[s..e].iter().any(|&b| b != 0);
            cur = match cur {
                Some((cs, _, cd)) if cd == data => Some((cs, e, cd)),
                Some(run) => {
                    emit(w, run)?;
                    Some((s, e, data))
                }
                None => Some((s, e, data)),
            };
            s = e;
        }
        if let Some(run) = cur {
            emit(w, run)?;
        }
        Ok(sent)
    }
}

impl Drop for DiskCopier {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Destination: the files a storage migration writes, removed again unless
/// [`StorageSink::keep`] is called.
pub struct StorageSink {
    disks: Vec<(File, u64)>,
    /// Per disk, the same file opened O_DIRECT (`None` where the filesystem refuses it).
    direct: Vec<Option<File>>,
    /// An aligned staging area for direct writes (see [`StorageSink::write_disk`]).
    bounce: std::cell::RefCell<Vec<u8>>,
    kernel: (File, u64),
    initrd: Option<(File, u64)>,
    created: Vec<PathBuf>,
    kept: bool,
}

impl StorageSink {
    /// Creates the files `copy` announces in `dir` (made if missing), as
    /// [`VmConfig::relocated`] names them; refuses files that exist already.
    pub fn create(
        dir: &Path,
        config: &VmConfig,
        copy: &StorageCopy,
    ) -> Result<Self, MigrationError> {
        if copy.disks.len() != config.disks.len()
            || copy.initrd.is_some() != config.initrd.is_some()
        {
            return Err(bad(format!(
                "the storage copy names {} disks{}, the configuration {}{}",
                copy.disks.len(),
                if copy.initrd.is_some() {
                    " and an initrd"
                } else {
                    ""
                },
                config.disks.len(),
                if config.initrd.is_some() {
                    " and an initrd"
                } else {
                    ""
                },
            )));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| vmm(format!("cannot create {}: {e}", dir.display())))?;
        let target = config.relocated(dir);
        let mut sink = Self {
            disks: Vec::new(),
            direct: Vec::new(),
            bounce: std::cell::RefCell::new(Vec::new()),
            kernel: (File::open("/dev/null").map_err(vmm)?, 0),
            initrd: None,
            created: Vec::new(),
            kept: false,
        };
        let make = |sink: &mut Self, path: &Path, size: u64| -> Result<File, MigrationError> {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| vmm(format!("cannot create {}: {e}", path.display())))?;
            sink.created.push(path.to_path_buf());
            f.set_len(size).map_err(|e| {
                vmm(format!(
                    "cannot size {} to {size} bytes: {e}",
                    path.display()
                ))
            })?;
            Ok(f)
        };
        sink.kernel = (make(&mut sink, &target.kernel, copy.kernel)?, copy.kernel);
        if let (Some(p), Some(n)) = (target.initrd.as_deref(), copy.initrd) {
            sink.initrd = Some((make(&mut sink, p, n)?, n));
        }
        for (d, &n) in target.disks.iter().zip(&copy.disks) {
            let f = make(&mut sink, &d.path, n)?;
            sink.disks.push((f, n));
            let direct = {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&d.path)
                    .ok()
            };
            sink.direct.push(direct);
        }
        Ok(sink)
    }

    fn disk(&self, disk: u32, offset: u64, len: u64) -> Result<&File, MigrationError> {
        let (f, size) = self
            .disks
            .get(disk as usize)
            .ok_or_else(|| bad(format!("a record for disk {disk} of {}", self.disks.len())))?;
        if offset.checked_add(len).is_none_or(|end| end > *size) {
            return Err(bad(format!(
                "{len} bytes at {offset} of disk {disk}, which has {size}"
            )));
        }
        Ok(f)
    }

    /// Writes a [`wire::Kind::Disk`] record's bytes: straight to the device (O_DIRECT, through
    /// an aligned copy) when they are whole 4 KiB blocks, which every block but a disk's odd
    /// tail is. Buffered writes of a new file's data cost ~3 s of kernel time per GiB on this
    /// host, direct ones ~0.3 s and leave little to write back after the switch-over.
    pub fn write_disk(&self, disk: u32, offset: u64, data: &[u8]) -> Result<(), MigrationError> {
        let f = self.disk(disk, offset, data.len() as u64)?;
        let err = |e: std::io::Error| vmm(format!("writing disk {disk}: {e}"));
        let aligned = offset.is_multiple_of(DIRECT_ALIGN as u64)
            && data.len().is_multiple_of(DIRECT_ALIGN)
            && data.len() <= CHUNK as usize;
        if let (true, Some(Some(d))) = (aligned, self.direct.get(disk as usize)) {
            let mut bounce = self.bounce.borrow_mut();
            if bounce.is_empty() {
                bounce.resize(CHUNK as usize + DIRECT_ALIGN, 0);
            }
            let at = bounce.as_ptr().align_offset(DIRECT_ALIGN);
            if let Some(buf) = bounce.get_mut(at..at + data.len()) {
                buf.copy_from_slice(data);
                match d.write_all_at(buf, offset) {
                    Ok(()) => return Ok(()),
                    // A filesystem that takes O_DIRECT opens but not these writes.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    Err(e) => return Err(err(e)),
                }
            }
        }
        f.write_all_at(data, offset).map_err(err)
    }

    /// Makes `[offset, offset + len)` of a disk read as zeros.
    pub fn zero_disk(&self, disk: u32, offset: u64, len: u64) -> Result<(), MigrationError> {
        let f = self.disk(disk, offset, len)?;
        if punch_hole(f, offset, len) {
            return Ok(());
        }
        let zeros = vec![0u8; len.min(CHUNK) as usize];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(CHUNK) as usize;
            f.write_all_at(&zeros[..n], offset + at)
                .map_err(|e| vmm(format!("writing disk {disk}: {e}")))?;
            at += n as u64;
        }
        Ok(())
    }

    /// Writes a [`wire::Kind::File`] record's bytes.
    pub fn write_file(
        &self,
        kind: FileKind,
        offset: u64,
        data: &[u8],
    ) -> Result<(), MigrationError> {
        let (f, size) = match kind {
            FileKind::Kernel => &self.kernel,
            FileKind::Initrd => self
                .initrd
                .as_ref()
                .ok_or_else(|| bad("an initrd record for a VM without one".into()))?,
        };
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > *size)
        {
            return Err(bad(format!(
                "{} bytes at {offset} of the {kind:?} file, which has {size}",
                data.len()
            )));
        }
        f.write_all_at(data, offset)
            .map_err(|e| vmm(format!("writing the {kind:?} file: {e}")))
    }

    /// Makes everything written so far durable.
    pub fn sync(&self) -> Result<(), MigrationError> {
        let all = self
            .disks
            .iter()
            .chain(std::iter::once(&self.kernel))
            .chain(self.initrd.as_ref());
        for (f, _) in all {
            f.sync_data()
                .map_err(|e| vmm(format!("syncing the copied storage: {e}")))?;
        }
        Ok(())
    }

    /// The VM runs from these files now: they stay, and a thread writes them back to the
    /// disk ([`writeback`] says when that is done). Until then the source's copy is the durable
    /// one (the daemon deletes it only after), so the switch-over waits for no disk.
    pub fn keep(mut self) {
        self.kept = true;
        let files: Vec<(File, u64)> = std::mem::take(&mut self.disks)
            .into_iter()
            .chain(std::iter::once(std::mem::replace(
                &mut self.kernel,
                (
                    match File::open("/dev/null") {
                        Ok(f) => f,
                        Err(_) => return,
                    },
                    0,
                ),
            )))
            .chain(self.initrd.take())
            .collect();
        WRITEBACK.store(PENDING, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("storage-sync".into())
            .spawn(move || {
                let t = std::time::Instant::now();
                let r = files.iter().try_for_each(|(f, _)| f.sync_data());
                match r {
                    Ok(()) => {
                        WRITEBACK.store(DONE, Ordering::SeqCst);
                        eprintln!(
                            "ferro-vmm: the copied storage is on disk ({:.0} ms after the switch-over)",
                            t.elapsed().as_secs_f64() * 1000.0
                        );
                    }
                    Err(e) => {
                        WRITEBACK.store(FAILED, Ordering::SeqCst);
                        eprintln!("ferro-vmm: writing back the copied storage: {e}");
                    }
                }
            });
        if spawned.is_err() {
            WRITEBACK.store(FAILED, Ordering::SeqCst);
        }
    }
}

const NONE: u8 = 0;
const PENDING: u8 = 1;
const DONE: u8 = 2;
const FAILED: u8 = 3;
/// Where the write-back of a storage migration's files stands on this destination.
static WRITEBACK: AtomicU8 = AtomicU8::new(NONE);

/// Destination of a storage migration: `Some(true)` once the copied files are on the disk,
/// `Some(false)` while they are written back (or that failed: stderr says why); `None` when
/// this VMM took no storage.
pub fn writeback() -> Option<bool> {
    match WRITEBACK.load(Ordering::SeqCst) {
        NONE => None,
        DONE => Some(true),
        _ => Some(false),
    }
}

impl Drop for StorageSink {
    fn drop(&mut self) {
        if !self.kept {
            for p in &self.created {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Frees `[offset, offset + len)` of `f` so it reads as zeros; false when the filesystem
/// cannot.
fn punch_hole(f: &File, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return false;
    };
    // SAFETY: fallocate on a descriptor this process owns, with plain integer arguments; it
    // changes only that file's contents in the given range.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        )
    };
    r == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::wire::{read_record, Record};

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferro-storage-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn raw_disk(dir: &Path, size: u64) -> (PathBuf, Arc<Tracked>) {
        let p = dir.join("src.raw");
        File::create(&p).unwrap().set_len(size).unwrap();
        let d = ferro_disk::open(&p, &ferro_disk::OpenOptions::default()).unwrap();
        (p, Arc::new(Tracked::new(d.into())))
    }

    /// Applies a stream of storage records to `sink`.
    fn apply(bytes: &[u8], sink: &StorageSink) -> usize {
        let mut r = bytes;
        let mut buf = Vec::new();
        let mut n = 0;
        while !r.is_empty() {
            match read_record(&mut r, &mut buf).unwrap() {
                Record::Disk(d, o, data) => sink.write_disk(d, o, data).unwrap(),
                Record::DiskZeros(d, o, l) => sink.zero_disk(d, o, l).unwrap(),
                Record::File(k, o, data) => sink.write_file(k, o, data).unwrap(),
                other => panic!("{other:?}"),
            }
            n += 1;
        }
        n
    }

    #[test]
    fn a_disk_written_during_the_copy_arrives_as_it_ends() {
        let dir = scratch("copy");
        let size = 8 << 20;
        let (src_path, disk) = raw_disk(&dir, size);
        disk.write_at(&[1; 4096], 0).unwrap();
        disk.write_at(&[2; 512], 5 << 20).unwrap();
        let kernel = dir.join("vmlinuz");
        std::fs::write(&kernel, vec![9u8; 3 << 20 | 5]).unwrap();
        let mut config = VmConfig::new(&kernel);
        config.disks.push("path=/x".parse().unwrap());
        let copy = describe(&config, std::slice::from_ref(&disk)).unwrap();
        assert_eq!(copy.disks, [size]);
        let dst = dir.join("dst");
        let sink = StorageSink::create(&dst, &config, &copy).unwrap();

        let mut w = Vec::new();
        send_files(&mut w, &config, &copy).unwrap();
        let mut c = DiskCopier::start(vec![disk.clone()], copy.disks.clone());
        let sent = c.everything(&mut w).unwrap();
        // Only the two 64 KiB blocks with data travel.
        assert_eq!(sent, 2 * TRACK_BLOCK);
        apply(&w, &sink);
        // The guest writes on: new data, and zeros over data sent before.
        disk.write_at(&[3; 512], 7 << 20).unwrap();
        disk.write_zeroes(5 << 20, 512, false).unwrap();
        assert_eq!(c.dirty_bytes(), 2 * TRACK_BLOCK);
        let mut w = Vec::new();
        c.dirty(&mut w).unwrap();
        assert_eq!(c.dirty_bytes(), 0);
        apply(&w, &sink);
        sink.sync().unwrap();
        sink.keep();
        drop(c);
        assert!(!disk.log().is_on());
        let target = config.relocated(&dst);
        assert_eq!(
            std::fs::read(&target.disks[0].path).unwrap(),
            std::fs::read(&src_path).unwrap()
        );
        assert_eq!(
            std::fs::read(&target.kernel).unwrap(),
            std::fs::read(&kernel).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_records_and_existing_files_are_refused_and_nothing_is_left() {
        let dir = scratch("refuse");
        let kernel = dir.join("k");
        std::fs::write(&kernel, b"kernel").unwrap();
        let mut config = VmConfig::new(&kernel);
        config.disks.push("path=/x".parse().unwrap());
        let copy = StorageCopy {
            disks: vec![1 << 20],
            kernel: 6,
            initrd: None,
        };
        let dst = dir.join("dst");
        {
            let sink = StorageSink::create(&dst, &config, &copy).unwrap();
            assert!(sink.write_disk(1, 0, &[0; 512]).is_err(), "no disk 1");
            assert!(
                sink.write_disk(0, 1 << 20, &[0; 512]).is_err(),
                "past the end"
            );
            assert!(sink.zero_disk(0, u64::MAX - 511, 512).is_err(), "overflow");
            assert!(
                sink.write_file(FileKind::Kernel, 4, b"xyz").is_err(),
                "past the end"
            );
            assert!(
                sink.write_file(FileKind::Initrd, 0, b"x").is_err(),
                "no initrd"
            );
            // Another migration into the same place while this one holds it.
            let again = StorageSink::create(&dst, &config, &copy);
            assert!(again.is_err());
            assert!(
                dst.join("kernel").exists(),
                "the failed second one removed the first's files"
            );
        }
        assert_eq!(
            std::fs::read_dir(&dst).unwrap().count(),
            0,
            "files left behind"
        );
        let wrong = StorageCopy {
            disks: vec![],
            ..copy
        };
        assert!(StorageSink::create(&dst, &config, &wrong).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
