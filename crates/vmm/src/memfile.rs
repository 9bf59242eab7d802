//! Guest memory in a snapshot: the `memory` file, and guest memory mapped back from it.
//!
//! Layout: the guest's RAM regions one after the other, in guest-address order, each at a
//! page-aligned file offset (the sum of the sizes before it), so the file is exactly as long as
//! the guest's RAM. [`save`] writes only the pages that are not all zero, each run of them
//! with one call (up to 4 MiB) straight from guest memory, on up to 4 threads that split the
//! RAM between them (pages of anonymous memory the guest never touched are not even read:
//! /proc/self/pagemap tells them apart; a page with data stops the zero test at its first
//! non-zero bytes): the rest stay holes of a sparse file, so an idle 512 MiB guest costs a
//! few MiB of disk. [`map`] maps each region `MAP_PRIVATE` from the file: nothing is read up
//! front, pages load when the guest (or a device) first touches them, and guest writes go to
//! private copies, never back to the file. A mapped file must therefore not change while a VM
//! runs from it: [`save`] writes a new file and renames it over the old one (the mapping keeps
//! the old inode), never rewriting it in place.
//!
//! The file is outside input: [`map`] refuses regions that are not page-aligned, overlap, leave
//! the file, or a file of another length than the layout (a truncated file would otherwise be a
//! SIGBUS when the guest touches its missing tail).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::memory::GuestMemory;

/// Guest page size; also the granularity of the holes.
pub const PAGE: u64 = 4096;
/// Threads that write the file at most.
const MAX_THREADS: usize = 4;
/// Most bytes one write call takes.
const MAX_WRITE: usize = 4 << 20;

/// Pages `first..end` of one region, for one writer thread.
struct Piece<'a> {
    region: MemRegion,
    /// The region's first byte in this process.
    host: usize,
    first: usize,
    end: usize,
    touched: Option<&'a [bool]>,
}

impl Piece<'_> {
    /// Writes each run of non-zero pages with one call (up to [`MAX_WRITE`]) straight from
    /// guest memory, O_DIRECT through `direct` when given (guest pages are page-aligned in
    /// memory and in the file, which is all O_DIRECT asks); returns the bytes written.
    fn write(&self, file: &File, direct: Option<&File>, path: &Path) -> Result<u64, MemFileError> {
        let page = PAGE as usize;
        let maybe_data = |p: usize| self.touched.is_none_or(|t| t.get(p) != Some(&false));
        let at = |p: usize| {
            // SAFETY: page `p` (< `self.end`, within the region's `size`) of the region's
            // mapping, which the caller's `mem` keeps alive; nothing writes guest memory
            // during a save (the contract of [`write`]: vCPUs paused, devices locked), so a
            // shared slice of it is sound for as long as this call runs.
            unsafe { std::slice::from_raw_parts((self.host + p * page) as *const u8, page) }
        };
        let mut written = 0u64;
        let mut p = self.first;
        while p < self.end {
            if !maybe_data(p) || is_zero(at(p)) {
                p += 1;
                continue;
            }
            let start = p;
            while p < self.end && (p - start) * page < MAX_WRITE && maybe_data(p) && !is_zero(at(p))
            {
                p += 1;
            }
            let len = (p - start) * page;
            // SAFETY: pages `start..p` (`p <= self.end`, within the region's `size`) of the
            // region's mapping, which the caller's `mem` keeps alive; nothing writes guest
            // memory during a save (vCPUs paused, devices locked), so a shared slice of it is
            // sound while this call runs.
            let run =
                unsafe { std::slice::from_raw_parts((self.host + start * page) as *const u8, len) };
            let at = self.region.file_offset + (start * page) as u64;
            match direct.map(|d| d.write_all_at(run, at)) {
                Some(Ok(())) => {}
                // A filesystem that opens O_DIRECT but refuses these writes: buffered.
                Some(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => file
                    .write_all_at(run, at)
                    .map_err(io(path, "cannot write"))?,
                Some(Err(e)) => return Err(io(path, "cannot write")(e)),
                None => file
                    .write_all_at(run, at)
                    .map_err(io(path, "cannot write"))?,
            }
            written += len as u64;
        }
        Ok(written)
    }
}

/// One RAM region of the guest in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Where its bytes start in the file.
    pub file_offset: u64,
}

/// What [`write()`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The regions, in file order.
    pub regions: Vec<MemRegion>,
    /// Length of the file (the guest's RAM).
    pub file_size: u64,
    /// Bytes of non-zero pages actually written (the rest are holes).
    pub data_bytes: u64,
}

/// Why guest memory could not be written or mapped.
#[derive(Debug, thiserror::Error)]
pub enum MemFileError {
    /// A file operation failed.
    #[error("memory file {path}: {what}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What was being done.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not have the length its layout says (truncated or grown).
    #[error("memory file {path} has {actual} bytes, expected {expected}: it is truncated or not this snapshot's")]
    Length {
        /// The file.
        path: String,
        /// Its length.
        actual: u64,
        /// The layout's.
        expected: u64,
    },
    /// The region list is not a valid layout.
    #[error("memory layout is invalid: {0}")]
    Layout(String),
    /// Guest memory could not be read or mapped.
    #[error("guest memory: {0}")]
    Memory(String),
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> MemFileError {
    let path = path.display().to_string();
    move |source| MemFileError::Io { path, what, source }
}

fn is_zero(page: &[u8]) -> bool {
    // OR-folding fixed-size blocks vectorises; the early exit is per block.
    page.chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Writes the guest's RAM to `path` as a sparse file, through `path` + `.tmp` renamed over
/// `path` once synced (so a VM still running from an older file at `path` keeps its inode), and
/// returns the bytes of data written (non-zero pages). The vCPUs and the devices must not write
/// guest memory meanwhile.
pub fn save(mem: &GuestMemory, path: &Path) -> Result<u64, MemFileError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let written = write(mem, &tmp)?;
    std::fs::rename(&tmp, path).map_err(io(path, "cannot rename the new file into place"))?;
    Ok(written.data_bytes)
}

/// Maps guest memory from the file [`save`] wrote for RAM `ranges` (guest address, size), in
/// address order, back to back in the file. Refuses a file of another length.
pub fn map(ranges: &[(u64, u64)], path: &Path) -> Result<GuestMemory, MemFileError> {
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for &(guest_addr, size) in ranges {
        regions.push(MemRegion {
            guest_addr,
            size,
            file_offset: offset,
        });
        offset = offset
            .checked_add(size)
            .ok_or_else(|| MemFileError::Layout("regions larger than a file can be".into()))?;
    }
    map_regions(path, &regions, offset)
}

/// Writes the guest's RAM to a new sparse file at `path` (replacing any file there) and syncs
/// it; [`save`] is the safe way to replace a snapshot's file. The vCPUs and the devices must not
/// write guest memory meanwhile.
pub fn write(mem: &GuestMemory, path: &Path) -> Result<Written, MemFileError> {
    let file = File::create(path).map_err(io(path, "cannot create"))?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    let mut touched = Vec::new();
    for r in mem.iter() {
        regions.push(MemRegion {
            guest_addr: r.start_addr().0,
            size: r.len(),
            file_offset: offset,
        });
        offset += r.len();
        // Anonymous memory: pages never touched are zero and need not be read at all. (A
        // file mapping's absent pages hold the file's bytes, so those are all read.)
        touched.push(if r.file_offset().is_none() {
            touched_pages(r.as_ptr() as usize, r.len() / PAGE)
        } else {
            None
        });
    }
    file.set_len(offset).map_err(io(path, "cannot size"))?;
    // Pieces of about equal size (whole 2 MiB steps), one list per thread.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS));
    let total: u64 = regions.iter().map(|r| r.size / PAGE).sum();
    let step = (total.div_ceil(threads as u64))
        .next_multiple_of(512)
        .max(512);
    let mut pieces: Vec<Vec<Piece>> = (0..threads).map(|_| Vec::new()).collect();
    let mut before = 0u64;
    for ((r, host), touched) in regions.iter().zip(mem.iter()).zip(&touched) {
        let pages = r.size / PAGE;
        let mut p = 0u64;
        while p < pages {
            let t = ((before + p) / step) as usize;
            let end = ((t as u64 + 1) * step - before).min(pages);
            pieces[t.min(threads - 1)].push(Piece {
                region: *r,
                host: host.as_ptr() as usize,
                first: p as usize,
                end: end as usize,
                touched: touched.as_deref(),
            });
            p = end;
        }
        before += pages;
    }
    // The data goes straight to the device: a buffered write of a new file costs ~3 s of kernel
    // time per GiB on this host (~0.8 s direct), and the sync below would write it all again.
    let direct = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()
    };
    let data_bytes = std::thread::scope(|scope| {
        let file = &file;
        let direct = direct.as_ref();
        let parts: Vec<_> = pieces
            .iter()
            .map(|list| {
                scope.spawn(move || {
                    list.iter().try_fold(0u64, |sum, piece| {
                        Ok(sum + piece.write(file, direct, path)?)
                    })
                })
            })
            .collect();
        parts.into_iter().try_fold(0u64, |sum, p| {
            let n = p
                .join()
                .map_err(|_| MemFileError::Memory("a writer thread panicked".into()))??;
            Ok::<u64, MemFileError>(sum + n)
        })
    })?;
    file.sync_all().map_err(io(path, "cannot sync"))?;
    Ok(Written {
        regions,
        file_size: offset,
        data_bytes,
    })
}

/// Which pages of guest RAM region `r` may hold data: for anonymous memory, the pages the
/// host populated ([`touched_pages`]; the others read as zero); `None` (all of them) for a
/// region mapped from a file, whose absent pages hold the file's bytes, or when it cannot tell.
pub(crate) fn populated(r: &crate::memory::GuestRegion) -> Option<Vec<bool>> {
    if r.file_offset().is_some() {
        return None;
    }
    touched_pages(r.as_ptr() as usize, r.len() / PAGE)
}

/// Which of the `pages` pages of this process's memory at `addr` are present or swapped out,
/// from /proc/self/pagemap (bits 63 and 62 of each 8-byte entry); `None` when it cannot tell.
pub(crate) fn touched_pages(addr: usize, pages: u64) -> Option<Vec<bool>> {
    let pagemap = File::open("/proc/self/pagemap").ok()?;
    let pages = usize::try_from(pages).ok()?;
    let first = (addr as u64 / PAGE).checked_mul(8)?;
    let mut out = Vec::with_capacity(pages);
    let mut raw = vec![0u8; 8 * 4096];
    while out.len() < pages {
        let n = (pages - out.len()).min(raw.len() / 8);
        let buf = &mut raw[..n * 8];
        pagemap
            .read_exact_at(buf, first + out.len() as u64 * 8)
            .ok()?;
        out.extend(buf.chunks_exact(8).map(|e| {
            let e = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            e & (3 << 62) != 0
        }));
    }
    Some(out)
}

/// Checks that `regions` is a layout [`write()`] could have produced for a file of `file_size`.
pub fn check_layout(regions: &[MemRegion], file_size: u64) -> Result<(), MemFileError> {
    let bad = |w: String| Err(MemFileError::Layout(w));
    if regions.is_empty() {
        return bad("no RAM regions".into());
    }
    let mut next_offset = 0u64;
    let mut prev_end = 0u64;
    for (i, r) in regions.iter().enumerate() {
        if r.size == 0 || r.size % PAGE != 0 || r.guest_addr % PAGE != 0 {
            return bad(format!("region {i} is not whole pages"));
        }
        if r.file_offset != next_offset {
            return bad(format!("region {i} is not where the previous one ends"));
        }
        if i > 0 && r.guest_addr < prev_end {
            return bad(format!("region {i} overlaps the one before"));
        }
        let Some(end) = r.guest_addr.checked_add(r.size) else {
            return bad(format!("region {i} passes the end of the address space"));
        };
        if usize::try_from(r.size).is_err() {
            return bad(format!("region {i} is too large"));
        }
        prev_end = end;
        next_offset = r.file_offset.saturating_add(r.size);
    }
    if next_offset != file_size {
        return bad(format!(
            "regions cover {next_offset} bytes, the layout says {file_size}"
        ));
    }
    Ok(())
}

/// Maps guest memory from the file at `path` (MAP_PRIVATE: lazily loaded, guest writes stay in
/// this process). `file_size` and `regions` come from the snapshot's manifest and are checked
/// against each other and against the file.
pub fn map_regions(
    path: &Path,
    regions: &[MemRegion],
    file_size: u64,
) -> Result<GuestMemory, MemFileError> {
    check_layout(regions, file_size)?;
    let file = File::open(path).map_err(io(path, "cannot open"))?;
    let actual = file.metadata().map_err(io(path, "cannot stat"))?.len();
    if actual != file_size {
        return Err(MemFileError::Length {
            path: path.display().to_string(),
            actual,
            expected: file_size,
        });
    }
    let mut out = Vec::with_capacity(regions.len());
    for r in regions {
        let dup = file.try_clone().map_err(io(path, "cannot duplicate"))?;
        // check_layout made sure the size fits a usize.
        let size = usize::try_from(r.size).map_err(|e| MemFileError::Layout(e.to_string()))?;
        let mapping = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(dup, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemFileError::Memory(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
            .ok_or_else(|| MemFileError::Layout("a region passes the end of memory".into()))?;
        out.push(region);
    }
    GuestMemory::from_regions(out).map_err(|e| MemFileError::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::Bytes;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ferro-memfile-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// 1 MiB at 0 and 3 MiB at 16 MiB, with a few written pages.
    fn guest() -> GuestMemory {
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(16 << 20), 3 << 20),
        ])
        .unwrap();
        mem.write_slice(b"first page", GuestAddress(0)).unwrap();
        mem.write_slice(&[0xab; 8192], GuestAddress(0x5000))
            .unwrap();
        // The last byte of the last page of the high region, and one byte at a chunk edge.
        mem.write_slice(&[7], GuestAddress((19 << 20) - 1)).unwrap();
        mem.write_slice(&[9], GuestAddress((17 << 20) - 1)).unwrap();
        mem
    }

    fn same(a: &GuestMemory, b: &GuestMemory) {
        for (ra, rb) in a.iter().zip(b.iter()) {
            assert_eq!(ra.start_addr(), rb.start_addr());
            assert_eq!(ra.len(), rb.len());
            let mut x = vec![0u8; ra.len() as usize];
            let mut y = vec![0u8; rb.len() as usize];
            a.read_slice(&mut x, ra.start_addr()).unwrap();
            b.read_slice(&mut y, rb.start_addr()).unwrap();
            assert!(x == y, "region at {:#x} differs", ra.start_addr().0);
        }
        assert_eq!(a.iter().count(), b.iter().count());
    }

    #[test]
    fn written_sparsely_and_mapped_back() {
        let d = dir("roundtrip");
        let path = d.join("memory");
        let mem = guest();
        let w = write(&mem, &path).unwrap();
        assert_eq!(w.file_size, 4 << 20);
        // Pages 0, 5, 6 of the first region; the two single-byte pages of the second.
        assert_eq!(w.data_bytes, 5 * PAGE);
        assert_eq!(
            w.regions[1],
            MemRegion {
                guest_addr: 16 << 20,
                size: 3 << 20,
                file_offset: 1 << 20
            }
        );
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 4 << 20);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "{} bytes allocated",
            meta.blocks() * 512
        );
        let back = map_regions(&path, &w.regions, w.file_size).unwrap();
        same(&mem, &back);
        // Guest writes stay private: the file keeps the snapshot.
        back.write_slice(&[0xcc; 16], GuestAddress(0)).unwrap();
        let again = map_regions(&path, &w.regions, w.file_size).unwrap();
        same(&mem, &again);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn save_replaces_a_file_a_vm_still_runs_from() {
        let d = dir("replace");
        let path = d.join("memory");
        let mem = guest();
        let ranges: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(save(&mem, &path).unwrap(), 5 * PAGE);
        let running = map(&ranges, &path).unwrap();
        same(&mem, &running);
        // A second snapshot of changed memory into the same place.
        mem.write_slice(&[0x11; 4096], GuestAddress(0x8000))
            .unwrap();
        assert_eq!(save(&mem, &path).unwrap(), 6 * PAGE);
        assert!(!d.join("memory.tmp").exists());
        // The VM mapped from the old file still sees the old bytes.
        let mut b = [0u8; 1];
        running.read_slice(&mut b, GuestAddress(0x8000)).unwrap();
        assert_eq!(b, [0]);
        same(&mem, &map(&ranges, &path).unwrap());
        // A snapshot of a VM restored from a file: pages it never touched are the file's
        // (not present in this process, yet not zero) and must be written too.
        let restored = map(&ranges, &path).unwrap();
        restored
            .write_slice(&[0x22; 16], GuestAddress(0x9000))
            .unwrap();
        let second = d.join("memory2");
        assert_eq!(save(&restored, &second).unwrap(), 7 * PAGE);
        same(&restored, &map(&ranges, &second).unwrap());
        // A layout that does not fit the file.
        assert!(matches!(
            map(&ranges[..1], &path),
            Err(MemFileError::Length { .. })
        ));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_truncated_or_grown_file_is_refused() {
        let d = dir("truncated");
        let path = d.join("memory");
        let w = write(&guest(), &path).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(w.file_size - PAGE).unwrap();
        let e = map_regions(&path, &w.regions, w.file_size).unwrap_err();
        assert!(matches!(e, MemFileError::Length { .. }), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
        f.set_len(w.file_size + PAGE).unwrap();
        assert!(matches!(
            map_regions(&path, &w.regions, w.file_size),
            Err(MemFileError::Length { .. })
        ));
        assert!(matches!(
            map_regions(&d.join("absent"), &w.regions, w.file_size),
            Err(MemFileError::Io { .. })
        ));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn bad_layouts_are_refused() {
        let r = |guest_addr, size, file_offset| MemRegion {
            guest_addr,
            size,
            file_offset,
        };
        let ok = [r(0, 1 << 20, 0), r(4 << 20, 1 << 20, 1 << 20)];
        check_layout(&ok, 2 << 20).unwrap();
        for (regions, size) in [
            (vec![], 0),
            (vec![r(0, 100, 0)], 100),
            (vec![r(1, PAGE, 0)], PAGE),
            (vec![r(0, PAGE, PAGE)], 2 * PAGE),
            (vec![r(0, 2 * PAGE, 0), r(PAGE, PAGE, 2 * PAGE)], 3 * PAGE),
            (vec![r(u64::MAX - PAGE + 1, 2 * PAGE, 0)], 2 * PAGE),
            (ok.to_vec(), 3 << 20),
        ] {
            assert!(
                matches!(check_layout(&regions, size), Err(MemFileError::Layout(_))),
                "{regions:?} {size}"
            );
        }
    }

    /// `cargo test -p ferro-vmm --lib memfile -- --ignored --nocapture`: how long a 512 MiB
    /// guest with 64 MiB of data takes to save and to map back.
    #[test]
    #[ignore]
    fn speed_512_mib() {
        let d = dir("speed");
        let path = d.join("memory");
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 512 << 20)]).unwrap();
        for mib in 0..64u64 {
            mem.write_slice(&[0x5a; 1 << 20], GuestAddress((mib * 8) << 20))
                .unwrap();
        }
        let r = mem.iter().next().unwrap();
        let t = std::time::Instant::now();
        let touched = touched_pages(r.as_ptr() as usize, r.len() / PAGE).unwrap();
        let present = touched.iter().filter(|&&b| b).count() as u64 * PAGE;
        println!(
            "pagemap: {present} bytes present, read in {:?}",
            t.elapsed()
        );
        let t = std::time::Instant::now();
        let data = save(&mem, &path).unwrap();
        let saved = t.elapsed();
        let t = std::time::Instant::now();
        let back = map(&[(0, 512 << 20)], &path).unwrap();
        let mapped = t.elapsed();
        let mut b = [0u8; 1];
        back.read_slice(&mut b, GuestAddress(8 << 20)).unwrap();
        assert_eq!(b, [0x5a]);
        let blocks = std::fs::metadata(&path).unwrap().blocks() * 512;
        println!("save: {data} bytes of data, {blocks} on disk, {saved:?}; map: {mapped:?}");
        std::fs::remove_dir_all(d).unwrap();
    }
}
