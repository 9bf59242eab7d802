//! qcow2 metadata held under the image's lock: the L1 table, a small L2 cache, the refcount
//! table, and cluster allocation.
//!
//! Crash safety: new clusters are taken from the end of the file. A data cluster and its
//! refcount are written at once; the L2 entry that points at it stays dirty in the cache
//! until [`Meta::writeback`], which syncs first, then writes L2 tables, syncs, then writes
//! L1 entries, and only then drops refcounts of clusters no longer referenced. A crash at
//! any point leaves references only to clusters whose data and refcount are durable: the
//! worst outcome is leaked clusters, which `qemu-img check` reports as leaks, not errors.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::header::{MAX_REFTABLE_BYTES, OFF_REFTABLE};
use super::Geometry;
use crate::error::DiskError;
use crate::file::DiskFile;

/// Bits 9..55 of L1 and L2 entries hold a host offset.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount of the cluster is exactly one: it may be written in place.
pub(crate) const COPIED: u64 = 1 << 63;
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// v3: the cluster reads as zeros.
pub(crate) const ZERO: u64 = 1;

/// L2 tables kept in memory; 16 tables of 64 KiB clusters map 8 GiB.
const L2_CACHE_TABLES: usize = 16;

/// What one L2 entry says about a guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cluster {
    /// Not allocated here: read the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster or 0.
    Zero { host: u64 },
    /// Data at `host`; `copied` means refcount 1 (writable in place).
    Data { host: u64, copied: bool },
    /// Compressed data: `len` bytes at `host` (not cluster-aligned).
    Compressed { host: u64, len: u64 },
}

/// How [`Meta::update_refcount`] changes a refcount.
#[derive(Debug, Clone, Copy)]
enum Refcount {
    /// A cluster taken from past the end of the file: 1, whatever a killed run left there
    /// (it may have set a refcount before the file grew).
    Fresh,
    /// One reference fewer.
    Drop,
}

#[derive(Debug)]
struct L2Table {
    entries: Vec<u64>,
    dirty: bool,
    used: u64,
}

#[derive(Debug)]
pub(crate) struct Meta {
    pub l1: Vec<u64>,
    l1_offset: u64,
    l1_dirty: BTreeSet<usize>,
    l2: HashMap<u64, L2Table>,
    tick: u64,
    rt: Vec<u64>,
    rt_offset: u64,
    /// The last refcount block touched: (its offset, its contents).
    rb_cache: Option<(u64, Vec<u8>)>,
    /// First byte past every cluster in use: where the next cluster is allocated.
    pub next_free: u64,
    /// Host clusters to release once the L2 entries that pointed at them are durable.
    pending_free: Vec<u64>,
}

fn be_table(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

fn table_bytes(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

impl Meta {
    pub(crate) fn load(
        f: &DiskFile,
        geo: &Geometry,
        hdr: &super::header::Header,
        file_len: u64,
    ) -> Result<Self, DiskError> {
        let mut l1 = vec![0u8; hdr.l1_size as usize * 8];
        f.read_exact(&mut l1, hdr.l1_table_offset, "L1 table")?;
        let mut rt = vec![0u8; (u64::from(hdr.refcount_table_clusters) * geo.cs) as usize];
        f.read_exact(&mut rt, hdr.refcount_table_offset, "refcount table")?;
        Ok(Self {
            l1: be_table(&l1),
            l1_offset: hdr.l1_table_offset,
            l1_dirty: BTreeSet::new(),
            l2: HashMap::new(),
            tick: 0,
            rt: be_table(&rt),
            rt_offset: hdr.refcount_table_offset,
            rb_cache: None,
            next_free: file_len.div_ceil(geo.cs) * geo.cs,
            pending_free: Vec::new(),
        })
    }

    /// A host offset found in metadata must be a cluster boundary inside the file.
    fn check_host(
        &self,
        f: &DiskFile,
        geo: &Geometry,
        what: &str,
        host: u64,
    ) -> Result<(), DiskError> {
        if !host.is_multiple_of(geo.cs) {
            return Err(f.corrupt(format!("{what} at {host:#x} is not cluster-aligned")));
        }
        if host < geo.cs || host >= self.next_free {
            return Err(f.corrupt(format!("{what} at {host:#x} is outside the file")));
        }
        Ok(())
    }

    /// A data cluster must also stay clear of the L1 and refcount tables: a corrupt entry
    /// pointing there must not turn guest writes into metadata writes.
    fn check_data_host(
        &self,
        f: &DiskFile,
        geo: &Geometry,
        what: &str,
        host: u64,
    ) -> Result<(), DiskError> {
        self.check_host(f, geo, what, host)?;
        let overlaps = |start: u64, bytes: u64| host < start + bytes && start < host + geo.cs;
        if overlaps(self.l1_offset, self.l1.len() as u64 * 8) {
            return Err(f.corrupt(format!("{what} at {host:#x} overlaps the L1 table")));
        }
        if overlaps(self.rt_offset, self.rt.len() as u64 * 8) {
            return Err(f.corrupt(format!("{what} at {host:#x} overlaps the refcount table")));
        }
        Ok(())
    }

    /// The L2 table offset for L1 index `l1i`, or 0.
    fn l2_offset(&self, f: &DiskFile, geo: &Geometry, l1i: usize) -> Result<u64, DiskError> {
        let Some(&e) = self.l1.get(l1i) else {
            return Err(f.corrupt(format!("L1 index {l1i} beyond the L1 table")));
        };
        let off = e & OFFSET_MASK;
        if off != 0 {
            self.check_host(f, geo, "L2 table", off)?;
        }
        Ok(off)
    }

    /// Brings the L2 table at `off` into the cache (writing back first if a dirty table
    /// must make room) and returns it.
    fn table(&mut self, f: &DiskFile, geo: &Geometry, off: u64) -> Result<&mut L2Table, DiskError> {
        self.tick += 1;
        if !self.l2.contains_key(&off) {
            if self.l2.len() >= L2_CACHE_TABLES {
                let victim = self
                    .l2
                    .iter()
                    .min_by_key(|(_, t)| t.used)
                    .map(|(k, t)| (*k, t.dirty));
                if let Some((k, dirty)) = victim {
                    if dirty {
                        self.writeback(f, geo)?;
                    }
                    self.l2.remove(&k);
                }
            }
            let mut buf = vec![0u8; geo.cs as usize];
            f.read_zero_fill(&mut buf, off)?;
            self.l2.insert(
                off,
                L2Table {
                    entries: be_table(&buf),
                    dirty: false,
                    used: 0,
                },
            );
        }
        let tick = self.tick;
        let t = self
            .l2
            .get_mut(&off)
            .ok_or_else(|| f.corrupt("L2 cache lost a table"))?;
        t.used = tick;
        Ok(t)
    }

    /// Looks up guest cluster `vc` (virtual offset / cluster size).
    pub(crate) fn lookup(
        &mut self,
        f: &DiskFile,
        geo: &Geometry,
        vc: u64,
    ) -> Result<Cluster, DiskError> {
        let l1i = (vc / geo.l2_entries) as usize;
        let l2i = (vc % geo.l2_entries) as usize;
        let off = self.l2_offset(f, geo, l1i)?;
        if off == 0 {
            return Ok(Cluster::Unallocated);
        }
        let e = self.table(f, geo, off)?.entries[l2i];
        self.classify(f, geo, e)
    }

    fn classify(&self, f: &DiskFile, geo: &Geometry, e: u64) -> Result<Cluster, DiskError> {
        if e & COMPRESSED != 0 {
            let (host, len) = super::compressed::parse(e, geo.cluster_bits);
            if host < geo.cs || host >= self.next_free {
                return Err(f.corrupt(format!(
                    "compressed cluster at {host:#x} is outside the file"
                )));
            }
            return Ok(Cluster::Compressed { host, len });
        }
        let host = e & OFFSET_MASK;
        if geo.version >= 3 && e & ZERO != 0 {
            if host != 0 {
                self.check_data_host(f, geo, "preallocated zero cluster", host)?;
            }
            return Ok(Cluster::Zero { host });
        }
        if host == 0 {
            return Ok(Cluster::Unallocated);
        }
        self.check_data_host(f, geo, "data cluster", host)?;
        Ok(Cluster::Data {
            host,
            copied: e & COPIED != 0,
        })
    }

    /// Sets the L2 entry of guest cluster `vc`, allocating its L2 table if needed.
    /// The entry reaches the disk at the next [`Meta::writeback`].
    pub(crate) fn set_entry(
        &mut self,
        f: &DiskFile,
        geo: &Geometry,
        vc: u64,
        entry: u64,
    ) -> Result<(), DiskError> {
        let l1i = (vc / geo.l2_entries) as usize;
        let l2i = (vc % geo.l2_entries) as usize;
        let mut off = self.l2_offset(f, geo, l1i)?;
        if off == 0 {
            off = self.alloc(f, geo)?;
            // Zeros on disk now, so the file has no hole; contents follow at writeback.
            f.write_zero_bytes(off, geo.cs)?;
            self.l1[l1i] = off | COPIED;
            self.l1_dirty.insert(l1i);
        }
        let t = self.table(f, geo, off)?;
        t.entries[l2i] = entry;
        t.dirty = true;
        Ok(())
    }

    /// Frees `host` once the metadata no longer pointing at it is durable.
    pub(crate) fn free_later(&mut self, host: u64) {
        if host != 0 {
            self.pending_free.push(host);
        }
    }

    /// Frees the host clusters compressed data occupies, as [`Meta::free_later`] does.
    pub(crate) fn free_compressed_later(&mut self, geo: &Geometry, host: u64, len: u64) {
        let first = host & !(geo.cs - 1);
        let last = (host + len.max(1) - 1) & !(geo.cs - 1);
        let mut c = first;
        while c <= last {
            self.pending_free.push(c);
            c += geo.cs;
        }
    }

    /// Makes every dirty table durable in crash-safe order, then releases freed clusters.
    pub(crate) fn writeback(&mut self, f: &DiskFile, geo: &Geometry) -> Result<(), DiskError> {
        let dirty: Vec<u64> = self
            .l2
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(k, _)| *k)
            .collect();
        if dirty.is_empty() && self.l1_dirty.is_empty() && self.pending_free.is_empty() {
            return Ok(());
        }
        // Data clusters and refcounts first.
        f.sync()?;
        for off in &dirty {
            if let Some(t) = self.l2.get_mut(off) {
                f.write_all(&table_bytes(&t.entries), *off)?;
                t.dirty = false;
            }
        }
        f.sync()?;
        for &i in &self.l1_dirty {
            f.write_all(&self.l1[i].to_be_bytes(), self.l1_offset + 8 * i as u64)?;
        }
        self.l1_dirty.clear();
        for host in std::mem::take(&mut self.pending_free) {
            self.update_refcount(f, geo, host, Refcount::Drop)?;
        }
        Ok(())
    }

    /// Takes one cluster from the end of the file, refcount 1.
    pub(crate) fn alloc(&mut self, f: &DiskFile, geo: &Geometry) -> Result<u64, DiskError> {
        let off = self.next_free;
        self.next_free = off
            .checked_add(geo.cs)
            .filter(|&e| e <= OFFSET_MASK)
            .ok_or_else(|| f.corrupt("image file too large"))?;
        self.update_refcount(f, geo, off, Refcount::Fresh)?;
        Ok(off)
    }

    /// Changes the refcount of the cluster at `host`, creating a refcount block or growing
    /// the refcount table when the cluster is not covered yet.
    fn update_refcount(
        &mut self,
        f: &DiskFile,
        geo: &Geometry,
        host: u64,
        change: Refcount,
    ) -> Result<(), DiskError> {
        let c = host >> geo.cluster_bits;
        let ri = (c / geo.rc_per_block) as usize;
        let bi = c % geo.rc_per_block;
        if ri >= self.rt.len() {
            self.grow_reftable(f, geo, ri)?;
        }
        if self.rt[ri] == 0 {
            self.new_refblock(f, geo, ri)?;
        }
        let block = self.rt[ri] & OFFSET_MASK;
        self.check_host(f, geo, "refcount block", block)?;
        if self.rb_cache.as_ref().is_none_or(|(o, _)| *o != block) {
            let mut buf = vec![0u8; geo.cs as usize];
            f.read_zero_fill(&mut buf, block)?;
            self.rb_cache = Some((block, buf));
        }
        let Some((_, buf)) = self.rb_cache.as_mut() else {
            return Ok(());
        };
        let old = geo.get_rc(buf, bi);
        let new = match change {
            Refcount::Fresh => 1,
            Refcount::Drop => old
                .checked_sub(1)
                .ok_or_else(|| f.corrupt(format!("refcount of cluster {host:#x} is already 0")))?,
        };
        let (at, len) = geo.set_rc(buf, bi, new);
        let bytes = buf[at..at + len].to_vec();
        f.write_all(&bytes, block + at as u64)
    }

    /// Adds a refcount block for table index `ri` at the end of the file. The block counts
    /// itself when it covers its own cluster; it is durable before the table points at it.
    fn new_refblock(&mut self, f: &DiskFile, geo: &Geometry, ri: usize) -> Result<(), DiskError> {
        let off = self.next_free;
        self.next_free += geo.cs;
        let mut buf = vec![0u8; geo.cs as usize];
        let own = off >> geo.cluster_bits;
        let covers_self = (own / geo.rc_per_block) as usize == ri;
        if covers_self {
            geo.set_rc(&mut buf, own % geo.rc_per_block, 1);
        }
        f.write_all(&buf, off)?;
        if !covers_self {
            self.update_refcount(f, geo, off, Refcount::Fresh)?;
        }
        f.sync()?;
        self.rt[ri] = off;
        f.write_all(&off.to_be_bytes(), self.rt_offset + 8 * ri as u64)?;
        self.rb_cache = Some((off, buf));
        Ok(())
    }

    /// Moves the refcount table to a bigger one at the end of the file that has an entry
    /// `ri`. New table and blocks are durable before the header points at them; the old
    /// table is freed after.
    fn grow_reftable(&mut self, f: &DiskFile, geo: &Geometry, ri: usize) -> Result<(), DiskError> {
        let start = self.next_free;
        let mut len = (self.rt.len() * 2).max(ri + 1);
        let clusters = loop {
            let clusters = (len as u64 * 8).div_ceil(geo.cs);
            // Worst case: the table and one new block per rc_per_block clusters, plus two.
            let end = start + (clusters + clusters / geo.rc_per_block + 2) * geo.cs;
            if ((end >> geo.cluster_bits) / geo.rc_per_block) < len as u64 {
                break clusters;
            }
            len *= 2;
        };
        if clusters * geo.cs > MAX_REFTABLE_BYTES {
            return Err(f.unsupported("refcount table would exceed 8 MiB"));
        }
        len = (clusters * geo.cs / 8) as usize;
        let mut table = self.rt.clone();
        table.resize(len, 0);
        self.next_free += clusters * geo.cs;
        let mut blocks: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
        let mut todo: Vec<u64> = (0..clusters).map(|i| start + i * geo.cs).collect();
        while let Some(host) = todo.pop() {
            let c = host >> geo.cluster_bits;
            let i = (c / geo.rc_per_block) as usize;
            if i >= table.len() {
                return Err(f.corrupt("refcount table growth fell short"));
            }
            if table[i] == 0 {
                let b = self.next_free;
                self.next_free += geo.cs;
                table[i] = b;
                blocks.insert(i, vec![0u8; geo.cs as usize]);
                todo.push(b);
            }
            match blocks.get_mut(&i) {
                Some(buf) => {
                    geo.set_rc(buf, c % geo.rc_per_block, 1);
                }
                None => {
                    // Covered by an existing block: that block is already referenced.
                    let saved = std::mem::replace(&mut self.rt, table.clone());
                    let res = self.update_refcount(f, geo, host, Refcount::Fresh);
                    self.rt = saved;
                    res?;
                }
            }
        }
        for (i, buf) in &blocks {
            f.write_all(buf, table[*i])?;
        }
        f.write_all(&table_bytes(&table), start)?;
        f.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&start.to_be_bytes());
        hdr[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        f.write_all(&hdr, OFF_REFTABLE)?;
        f.sync()?;
        let (old_off, old_len) = (self.rt_offset, self.rt.len() as u64);
        self.rt = table;
        self.rt_offset = start;
        self.rb_cache = None;
        for i in 0..(old_len * 8).div_ceil(geo.cs) {
            self.update_refcount(f, geo, old_off + i * geo.cs, Refcount::Drop)?;
        }
        Ok(())
    }
}
