//! qcow2 images (versions 2 and 3): reads through L1/L2 tables with a backing chain,
//! copy-on-write allocation at the end of the file, zero clusters, crash-safe metadata
//! order (see [`meta`]). Compressed clusters (zlib) read, and are copied out on write.
//! Internal snapshots (for writing), zstd compression, encryption,
//! external data files and subclusters are refused with an `Unsupported` error.

mod compressed;
pub(crate) mod header;
mod meta;

use std::sync::{Mutex, MutexGuard};

use crate::error::DiskError;
use crate::file::DiskFile;
use crate::{check_range, BlockBackend};
use header::Header;
use meta::{Cluster, Meta, COPIED, ZERO};

/// Sizes derived from the header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub version: u32,
    pub cluster_bits: u32,
    pub cs: u64,
    pub l2_entries: u64,
    pub refcount_order: u32,
    pub rc_per_block: u64,
}

impl Geometry {
    fn new(h: &Header) -> Self {
        let cs = h.cluster_size();
        Self {
            version: h.version,
            cluster_bits: h.cluster_bits,
            cs,
            l2_entries: cs / 8,
            refcount_order: h.refcount_order,
            rc_per_block: (cs * 8) >> h.refcount_order,
        }
    }

    fn rc_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    pub(crate) fn rc_max(&self) -> u64 {
        u64::MAX >> (64 - self.rc_bits())
    }

    /// Refcount `i` of a block. Entries under 8 bits are packed from the low bit up.
    pub(crate) fn get_rc(&self, buf: &[u8], i: u64) -> u64 {
        let bits = self.rc_bits() as u64;
        if bits >= 8 {
            let n = (bits / 8) as usize;
            let at = i as usize * n;
            buf[at..at + n]
                .iter()
                .fold(0u64, |v, b| v << 8 | u64::from(*b))
        } else {
            let at = (i * bits / 8) as usize;
            let shift = (i * bits % 8) as u32;
            (u64::from(buf[at]) >> shift) & self.rc_max()
        }
    }

    /// Sets refcount `i`; returns the byte range that changed.
    pub(crate) fn set_rc(&self, buf: &mut [u8], i: u64, v: u64) -> (usize, usize) {
        let bits = self.rc_bits() as u64;
        if bits >= 8 {
            let n = (bits / 8) as usize;
            let at = i as usize * n;
            buf[at..at + n].copy_from_slice(&v.to_be_bytes()[8 - n..]);
            (at, n)
        } else {
            let at = (i * bits / 8) as usize;
            let shift = (i * bits % 8) as u32;
            let mask = (self.rc_max() as u8) << shift;
            buf[at] = (buf[at] & !mask) | (((v as u8) << shift) & mask);
            (at, 1)
        }
    }
}

/// Where the bytes of one piece of a read come from.
enum Source {
    Zero,
    /// Guest offset in the backing file.
    Backing(u64),
    Host(u64),
    /// Compressed data at `host`, `len` bytes; the piece starts `in_c` into the cluster.
    Compressed {
        host: u64,
        len: u64,
        in_c: usize,
    },
}

/// An open qcow2 image.
pub(crate) struct Qcow2 {
    file: DiskFile,
    geo: Geometry,
    size: u64,
    /// Compressed clusters use zstd (unsupported) rather than zlib.
    zstd: bool,
    backing: Option<Box<dyn BlockBackend>>,
    meta: Mutex<Meta>,
}

impl Qcow2 {
    /// Opens the image in `file` (header already parsed) over `backing`.
    pub(crate) fn open(
        file: DiskFile,
        hdr: Header,
        backing: Option<Box<dyn BlockBackend>>,
    ) -> Result<Self, DiskError> {
        let file_len = file.len()?;
        let geo = Geometry::new(&hdr);
        if !file.readonly() {
            if hdr.incompatible & header::INCOMPAT_CORRUPT != 0 {
                return Err(
                    file.unsupported("image is marked corrupt; open it read-only or repair it")
                );
            }
            if hdr.incompatible & header::INCOMPAT_DIRTY != 0 {
                return Err(
                    file.unsupported("image is dirty (lazy refcounts); run qemu-img check -r all")
                );
            }
            if hdr.nb_snapshots != 0 {
                return Err(file.unsupported("writing an image with internal snapshots"));
            }
        }
        let meta = Meta::load(&file, &geo, &hdr, file_len)?;
        if !file.readonly() && hdr.autoclear != 0 {
            // Autoclear features (bitmaps, ...) are invalid once someone who does not know
            // them writes: clear them as QEMU does.
            file.write_all(&0u64.to_be_bytes(), header::OFF_AUTOCLEAR)?;
            file.sync()?;
        }
        Ok(Self {
            file,
            geo,
            size: hdr.size,
            zstd: hdr.compression_type != 0,
            backing,
            meta: Mutex::new(meta),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        // A panic while holding the lock cannot leave the file inconsistent (the on-disk
        // order does not depend on it), so carry on with the data.
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.file.readonly() {
            return Err(self.file.readonly_error());
        }
        check_range(self.file.name(), offset, len, self.size)
    }

    /// Reads and inflates the compressed cluster of `len` bytes at `host` into `out`.
    fn read_compressed(&self, host: u64, len: u64, out: &mut [u8]) -> Result<(), DiskError> {
        if self.zstd {
            return Err(self.file.unsupported("zstd-compressed clusters"));
        }
        let mut input = vec![0u8; len as usize];
        self.file.read_zero_fill(&mut input, host)?;
        if !compressed::inflate(&input, out) {
            return Err(self
                .file
                .corrupt(format!("compressed cluster at {host:#x} does not inflate")));
        }
        Ok(())
    }

    /// Reads `buf` at guest `offset` from the backing file; beyond its end reads zeros.
    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let n = b.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        if n > 0 {
            b.read_at(&mut buf[..n], offset)?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// Splits `[offset, offset + len)` into per-cluster pieces: (guest cluster, offset in
    /// cluster, length).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        let cs = self.geo.cs;
        let mut pos = offset;
        let end = offset + len;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let in_c = pos % cs;
            let n = (cs - in_c).min(end - pos);
            let item = (pos / cs, in_c, n);
            pos += n;
            Some(item)
        })
    }

    /// The full new contents of guest cluster `vc` for a write of `data` at `in_c` that does
    /// not cover it: the old contents (zeros, backing data or compressed data) around `data`.
    fn cow_cluster(
        &self,
        vc: u64,
        in_c: u64,
        data: &[u8],
        old: Cluster,
    ) -> Result<Vec<u8>, DiskError> {
        let mut new = vec![0u8; self.geo.cs as usize];
        match old {
            Cluster::Unallocated => {
                let g = vc * self.geo.cs;
                let valid = self.size.saturating_sub(g).min(self.geo.cs) as usize;
                self.read_backing(&mut new[..valid], g)?;
            }
            Cluster::Compressed { host, len } => self.read_compressed(host, len, &mut new)?,
            _ => {}
        }
        new[in_c as usize..in_c as usize + data.len()].copy_from_slice(data);
        Ok(new)
    }

    /// Makes whole clusters `[first, first + count)` read as zeros.
    fn zero_clusters(
        &self,
        first: u64,
        count: u64,
        unmap: bool,
        discard: bool,
    ) -> Result<(), DiskError> {
        let mut m = self.lock();
        let geo = self.geo;
        let mut vc = first;
        while vc < first + count {
            // Without a backing file, a missing L2 table already reads as zeros.
            let l1i = (vc / geo.l2_entries) as usize;
            if self.backing.is_none() && m.l1.get(l1i).is_some_and(|e| e & meta::OFFSET_MASK == 0) {
                vc = (l1i as u64 + 1) * geo.l2_entries;
                continue;
            }
            let old = m.lookup(&self.file, &geo, vc)?;
            let host = match old {
                Cluster::Data { host, .. } | Cluster::Zero { host } => host,
                Cluster::Unallocated | Cluster::Compressed { .. } => 0,
            };
            let entry = if geo.version >= 3 {
                if !unmap && host != 0 {
                    Some(host | COPIED | ZERO)
                } else {
                    Some(ZERO)
                }
            } else if self.backing.is_none() {
                Some(0)
            } else {
                None
            };
            match entry {
                // Unallocated without a backing file already reads as zeros.
                Some(_) if old == Cluster::Unallocated && self.backing.is_none() => {}
                Some(e) => {
                    m.set_entry(&self.file, &geo, vc, e)?;
                    if let Cluster::Compressed { host, len } = old {
                        m.free_compressed_later(&geo, host, len);
                    } else if e & meta::OFFSET_MASK != host {
                        m.free_later(host);
                    }
                }
                // v2 over a backing file has no zero flag: write zeros (discard may skip).
                None if discard => {}
                None => {
                    let zeros = vec![0u8; geo.cs as usize];
                    let len = geo.cs.min(self.size - vc * geo.cs) as usize;
                    let zeros = &zeros[..len];
                    for (h, at, n) in self.write_locked(&mut m, zeros, vc * geo.cs)? {
                        self.file.write_all(&zeros[at..at + n], h)?;
                    }
                }
            }
            vc += 1;
        }
        Ok(())
    }

    /// The write path with the lock held. Pieces that need a new cluster are written here,
    /// host-adjacent ones in one call, before their L2 entries are set. In-place pieces
    /// (host offset, offset in `buf`, length; host-adjacent ones merged) are returned for the
    /// caller to write after releasing the lock.
    fn write_locked(
        &self,
        m: &mut Meta,
        buf: &[u8],
        offset: u64,
    ) -> Result<Vec<(u64, usize, usize)>, DiskError> {
        let cs = self.geo.cs;
        let mut in_place: Vec<(u64, usize, usize)> = Vec::new();
        let mut batch = NewClusters::default();
        let mut done = 0usize;
        for (vc, in_c, n) in self.pieces(offset, buf.len() as u64) {
            let data = &buf[done..done + n as usize];
            match m.lookup(&self.file, &self.geo, vc)? {
                Cluster::Data { host, copied: true } => match in_place.last_mut() {
                    Some(last)
                        if last.0 + last.2 as u64 == host + in_c && last.1 + last.2 == done =>
                    {
                        last.2 += n as usize;
                    }
                    _ => in_place.push((host + in_c, done, n as usize)),
                },
                Cluster::Data {
                    host,
                    copied: false,
                } => {
                    return Err(self.file.corrupt(format!(
                        "data cluster {host:#x} is shared (refcount > 1) and cannot be written"
                    )))
                }
                old => {
                    // A preallocated zero cluster is reused: its L2 entry loses the zero flag
                    // only at writeback, after this data is durable.
                    let host = match old {
                        Cluster::Zero { host } if host != 0 => host,
                        _ => m.alloc(&self.file, &self.geo)?,
                    };
                    if n == cs {
                        // Whole clusters adjacent in `buf` and on the host go out together,
                        // straight from `buf`.
                        if !batch.follows(host, done) {
                            batch.write(self, m, buf)?;
                            batch.host = host;
                            batch.at = done;
                        }
                        batch.len += n as usize;
                        batch.entries.push((vc, host, old));
                    } else {
                        batch.write(self, m, buf)?;
                        let new = self.cow_cluster(vc, in_c, data, old)?;
                        self.file.write_all(&new, host)?;
                        NewClusters::point(self, m, vc, host, old)?;
                    }
                }
            }
            done += n as usize;
        }
        batch.write(self, m, buf)?;
        Ok(in_place)
    }
}

/// Whole new clusters of one write that are adjacent both in the caller's buffer and on the
/// host: written in one call, then pointed at.
#[derive(Default)]
struct NewClusters {
    host: u64,
    /// Where the run starts in the caller's buffer, and its length.
    at: usize,
    len: usize,
    /// (guest cluster, host cluster, what it replaces) whose L2 entries are set once the data
    /// is written.
    entries: Vec<(u64, u64, Cluster)>,
}

impl NewClusters {
    /// Whether a cluster at `host`, from `at` in the buffer, continues the run.
    fn follows(&self, host: u64, at: usize) -> bool {
        !self.entries.is_empty() && self.host + self.len as u64 == host && self.at + self.len == at
    }

    /// Writes the run, then points its L2 entries at it.
    fn write(&mut self, q: &Qcow2, m: &mut Meta, buf: &[u8]) -> Result<(), DiskError> {
        if self.entries.is_empty() {
            return Ok(());
        }
        q.file
            .write_all(&buf[self.at..self.at + self.len], self.host)?;
        for (vc, host, old) in self.entries.drain(..) {
            Self::point(q, m, vc, host, old)?;
        }
        self.len = 0;
        Ok(())
    }

    /// Sets the L2 entry of `vc` to the written cluster at `host`; compressed data it
    /// replaces is freed only after that.
    fn point(q: &Qcow2, m: &mut Meta, vc: u64, host: u64, old: Cluster) -> Result<(), DiskError> {
        m.set_entry(&q.file, &q.geo, vc, host | COPIED)?;
        if let Cluster::Compressed { host, len } = old {
            m.free_compressed_later(&q.geo, host, len);
        }
        Ok(())
    }
}

impl BlockBackend for Qcow2 {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(self.file.name(), offset, buf.len() as u64, self.size)?;
        // Map every piece under the lock (pieces contiguous at their source merged), then
        // read without it.
        let mut plan: Vec<(Source, usize)> = Vec::new();
        {
            let mut m = self.lock();
            for (vc, in_c, n) in self.pieces(offset, buf.len() as u64) {
                let src = match m.lookup(&self.file, &self.geo, vc)? {
                    Cluster::Unallocated if self.backing.is_some() => {
                        Source::Backing(vc * self.geo.cs + in_c)
                    }
                    Cluster::Unallocated | Cluster::Zero { .. } => Source::Zero,
                    Cluster::Data { host, .. } => Source::Host(host + in_c),
                    Cluster::Compressed { host, len } => Source::Compressed {
                        host,
                        len,
                        in_c: in_c as usize,
                    },
                };
                let n = n as usize;
                match (plan.last_mut(), &src) {
                    (Some((Source::Zero, l)), Source::Zero) => *l += n,
                    (Some((Source::Backing(a), l)), Source::Backing(b)) if *a + *l as u64 == *b => {
                        *l += n
                    }
                    (Some((Source::Host(a), l)), Source::Host(b)) if *a + *l as u64 == *b => {
                        *l += n
                    }
                    _ => plan.push((src, n)),
                }
            }
        }
        let mut pos = 0usize;
        let mut cluster = Vec::new();
        for (src, len) in plan {
            let piece = &mut buf[pos..pos + len];
            pos += len;
            match src {
                Source::Zero => piece.fill(0),
                Source::Backing(g) => self.read_backing(piece, g)?,
                Source::Host(h) => self.file.read_zero_fill(piece, h)?,
                Source::Compressed { host, len, in_c } => {
                    cluster.resize(self.geo.cs as usize, 0);
                    self.read_compressed(host, len, &mut cluster)?;
                    piece.copy_from_slice(&cluster[in_c..in_c + piece.len()]);
                }
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.check_write(offset, buf.len() as u64)?;
        let in_place = {
            let mut m = self.lock();
            self.write_locked(&mut m, buf, offset)?
        };
        for (host, at, n) in in_place {
            self.file.write_all(&buf[at..at + n], host)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DiskError> {
        if self.file.readonly() {
            return Ok(());
        }
        let mut m = self.lock();
        m.writeback(&self.file, &self.geo)?;
        self.file.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_write(offset, len)?;
        // Only whole clusters can be dropped; partial ones keep their data (allowed).
        let cs = self.geo.cs;
        let first = offset.div_ceil(cs);
        let end = if offset + len == self.size {
            self.size.div_ceil(cs)
        } else {
            (offset + len) / cs
        };
        if end > first {
            self.zero_clusters(first, end - first, true, true)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DiskError> {
        self.check_write(offset, len)?;
        let cs = self.geo.cs;
        let end = offset + len;
        let first = offset.div_ceil(cs);
        // The last cluster counts as whole when the range runs to the end of the disk.
        let last = if end == self.size {
            self.size.div_ceil(cs)
        } else {
            end / cs
        };
        if last <= first {
            return self.write_at(&vec![0u8; len as usize], offset);
        }
        let head = first * cs - offset;
        if head > 0 {
            self.write_at(&vec![0u8; head as usize], offset)?;
        }
        let tail_start = (last * cs).min(end);
        if tail_start < end {
            self.write_at(&vec![0u8; (end - tail_start) as usize], tail_start)?;
        }
        self.zero_clusters(first, last - first, may_unmap, false)
    }

    fn readonly(&self) -> bool {
        self.file.readonly()
    }

    fn id(&self) -> String {
        self.file.id()
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if !self.file.readonly() {
            let m = self.meta.get_mut().unwrap_or_else(|p| p.into_inner());
            // Best effort: a failure here leaves leaked clusters at worst.
            let _ = m.writeback(&self.file, &self.geo);
            let _ = self.file.sync();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(order: u32) -> Geometry {
        Geometry {
            version: 3,
            cluster_bits: 9,
            cs: 512,
            l2_entries: 64,
            refcount_order: order,
            rc_per_block: (512 * 8) >> order,
        }
    }

    #[test]
    fn refcounts_of_every_width_round_trip() {
        for order in 0..=6 {
            let g = geo(order);
            let mut block = vec![0u8; 512];
            for i in 0..g.rc_per_block {
                let v = (i * 7 + 1) & g.rc_max();
                g.set_rc(&mut block, i, v);
            }
            for i in 0..g.rc_per_block {
                assert_eq!(
                    g.get_rc(&block, i),
                    (i * 7 + 1) & g.rc_max(),
                    "order {order} entry {i}"
                );
            }
            // Setting one entry leaves its neighbours alone.
            g.set_rc(&mut block, 1, 0);
            assert_eq!(g.get_rc(&block, 0), 1 & g.rc_max());
            assert_eq!(g.get_rc(&block, 2), 15 & g.rc_max());
        }
    }

    #[test]
    fn sub_byte_refcounts_fill_from_the_low_bit() {
        // QEMU: refcount_order 0 keeps entry i in bit (i % 8) of byte i / 8.
        let g = geo(0);
        let mut block = vec![0u8; 512];
        g.set_rc(&mut block, 3, 1);
        assert_eq!(block[0], 0b1000);
        let g = geo(4);
        let (at, len) = g.set_rc(&mut block, 2, 0x0102);
        assert_eq!((at, len), (4, 2));
        assert_eq!(block[4..6], [1, 2]);
    }
}
