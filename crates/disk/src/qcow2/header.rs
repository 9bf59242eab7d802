//! The qcow2 header (versions 2 and 3), its extensions, and writing a new overlay image.
//! Layout: QEMU's docs/interop/qcow2.txt. All fields are big-endian.

use crate::error::DiskError;
use crate::file::DiskFile;

pub(crate) const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Smallest and largest cluster sizes QEMU accepts: 512 bytes .. 2 MiB.
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limits on the L1 and refcount tables (QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE).
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
const MAX_BACKING_NAME: u32 = 1023;

pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION_TYPE;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// Offsets of header fields we rewrite in place.
pub(crate) const OFF_REFTABLE: u64 = 48; // u64 offset, then u32 clusters at 56
pub(crate) const OFF_AUTOCLEAR: u64 = 88;

/// A parsed and checked qcow2 header.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    /// The backing file name as stored (relative names are relative to the image's folder).
    pub backing_file: Option<String>,
    /// "raw" or "qcow2" from the backing-format extension, if present.
    pub backing_format: Option<String>,
    /// Compression of compressed clusters: 0 zlib (deflate), 1 zstd.
    pub compression_type: u8,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(x)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

impl Header {
    pub(crate) fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Reads and checks the header of `file`, whose length is `file_len`.
    pub(crate) fn read(file: &DiskFile, file_len: u64) -> Result<Self, DiskError> {
        let mut fixed = [0u8; 104];
        let n = file.read_upto(&mut fixed, 0)?;
        if n < 4 || fixed[..4] != MAGIC {
            return Err(DiskError::BadMagic {
                file: file.name().to_string(),
            });
        }
        if n < 72 {
            return Err(file.corrupt(format!("header truncated ({n} bytes)")));
        }
        let version = be32(&fixed, 4);
        if version != 2 && version != 3 {
            return Err(file.unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(&fixed, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(file.corrupt(format!("cluster_bits {cluster_bits} out of range 9..=21")));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(&fixed, 24),
            l1_size: be32(&fixed, 36),
            l1_table_offset: be64(&fixed, 40),
            refcount_table_offset: be64(&fixed, 48),
            refcount_table_clusters: be32(&fixed, 56),
            nb_snapshots: be32(&fixed, 60),
            incompatible: 0,
            autoclear: 0,
            refcount_order: 4,
            backing_file: None,
            backing_format: None,
            compression_type: 0,
        };
        if be32(&fixed, 32) != 0 {
            return Err(file.unsupported("encrypted image"));
        }
        let mut header_len = 72u64;
        if version == 3 {
            if n < 104 {
                return Err(file.corrupt(format!("v3 header truncated ({n} bytes)")));
            }
            h.incompatible = be64(&fixed, 72);
            h.autoclear = be64(&fixed, 88);
            h.refcount_order = be32(&fixed, 96);
            header_len = u64::from(be32(&fixed, 100));
            if header_len < 104 || header_len > cs || !header_len.is_multiple_of(8) {
                return Err(file.corrupt(format!("header length {header_len}")));
            }
            if h.refcount_order > 6 {
                return Err(file.corrupt(format!("refcount order {}", h.refcount_order)));
            }
            if h.incompatible & INCOMPAT_COMPRESSION_TYPE != 0 && header_len > 104 {
                let mut ct = [0u8; 1];
                file.read_upto(&mut ct, 104)?;
                h.compression_type = ct[0];
            }
            if h.incompatible & INCOMPAT_EXTERNAL_DATA != 0 {
                return Err(file.unsupported("external data file"));
            }
            if h.incompatible & INCOMPAT_EXTENDED_L2 != 0 {
                return Err(file.unsupported("extended L2 entries (subclusters)"));
            }
            let unknown = h.incompatible & !INCOMPAT_KNOWN;
            if unknown != 0 {
                return Err(file.unsupported(format!("incompatible features {unknown:#x}")));
            }
        }
        h.check_layout(file, file_len)?;

        // Extensions and the backing file name live in the first cluster.
        let first = cs.min(file_len) as usize;
        let mut cluster = vec![0u8; first];
        file.read_upto(&mut cluster, 0)?;
        h.read_extensions(file, &cluster, header_len as usize)?;
        let bf_off = be64(&fixed, 8);
        let bf_len = be32(&fixed, 16);
        if bf_off != 0 && bf_len != 0 {
            if bf_len > MAX_BACKING_NAME {
                return Err(file.corrupt(format!("backing file name of {bf_len} bytes")));
            }
            let end = bf_off.saturating_add(u64::from(bf_len));
            if end > cluster.len() as u64 {
                return Err(file.corrupt("backing file name outside the first cluster"));
            }
            let raw = &cluster[bf_off as usize..end as usize];
            let name = String::from_utf8(raw.to_vec())
                .map_err(|_| file.corrupt("backing file name is not UTF-8"))?;
            if name.contains('\0') {
                return Err(file.corrupt("backing file name contains NUL"));
            }
            h.backing_file = Some(name);
        }
        Ok(h)
    }

    /// Table positions and sizes that could make us read or allocate absurd amounts.
    fn check_layout(&self, file: &DiskFile, file_len: u64) -> Result<(), DiskError> {
        let cs = self.cluster_size();
        // Bytes covered by one L2 table: cluster_size / 8 entries of cluster_size each.
        let per_l2 = 1u128 << (2 * self.cluster_bits - 3);
        let need_l1 = (u128::from(self.size)).div_ceil(per_l2);
        if u128::from(self.l1_size) < need_l1 {
            return Err(file.corrupt(format!(
                "L1 table of {} entries is too small for {} bytes",
                self.l1_size, self.size
            )));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(file.corrupt(format!("L1 table of {} entries is too large", self.l1_size)));
        }
        if self.l1_size > 0 {
            self.check_table(file, file_len, "L1 table", self.l1_table_offset, l1_bytes)?;
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return Err(file.corrupt(format!(
                "refcount table of {} clusters",
                self.refcount_table_clusters
            )));
        }
        self.check_table(
            file,
            file_len,
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
        )
    }

    fn check_table(
        &self,
        f: &DiskFile,
        file_len: u64,
        what: &str,
        off: u64,
        len: u64,
    ) -> Result<(), DiskError> {
        if !off.is_multiple_of(self.cluster_size()) || off == 0 {
            return Err(f.corrupt(format!(
                "{what} offset {off:#x} is not a non-zero cluster boundary"
            )));
        }
        if off.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(f.corrupt(format!("{what} at {off:#x} is past the end of the file")));
        }
        Ok(())
    }

    fn read_extensions(
        &mut self,
        file: &DiskFile,
        cluster: &[u8],
        mut at: usize,
    ) -> Result<(), DiskError> {
        while at + 8 <= cluster.len() {
            let kind = be32(cluster, at);
            let len = be32(cluster, at + 4) as usize;
            at += 8;
            if kind == EXT_END {
                return Ok(());
            }
            if len > cluster.len() - at {
                return Err(file.corrupt(format!(
                    "header extension {kind:#x} of {len} bytes overruns the header"
                )));
            }
            if kind == EXT_BACKING_FORMAT {
                let fmt = String::from_utf8_lossy(&cluster[at..at + len]).into_owned();
                self.backing_format = Some(fmt);
            }
            at += len.div_ceil(8) * 8;
        }
        Ok(())
    }
}

/// Builds a fresh v3 image of `size` bytes with 64 KiB clusters and a backing file:
/// header + extensions + name in cluster 0, refcount table in cluster 1, one refcount
/// block in cluster 2, the L1 table from cluster 3.
pub(crate) fn new_overlay_image(
    size: u64,
    backing: &str,
    backing_format: &str,
) -> Result<Vec<u8>, String> {
    const BITS: u32 = 16;
    const CS: u64 = 1 << BITS;
    let per_l2 = 1u64 << (2 * BITS - 3);
    let l1_size = size.div_ceil(per_l2).max(1);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(format!("virtual size {size} is too large"));
    }
    let l1_clusters = (l1_size * 8).div_ceil(CS);
    let total_clusters = 3 + l1_clusters;
    // One 16-bit refcount block covers CS / 2 clusters.
    if total_clusters > CS / 2 {
        return Err(format!("virtual size {size} is too large"));
    }
    if backing.len() > MAX_BACKING_NAME as usize {
        return Err("backing file name is longer than 1023 bytes".into());
    }
    let mut img = vec![0u8; (total_clusters * CS) as usize];
    let put32 =
        |img: &mut Vec<u8>, at: usize, v: u32| img[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |img: &mut Vec<u8>, at: usize, v: u64| img[at..at + 8].copy_from_slice(&v.to_be_bytes());

    // Header: 112 bytes (v3 with compression type + padding), then extensions, then the name.
    const HEADER_LEN: usize = 112;
    let ext_len = backing_format.len();
    let ext_end = HEADER_LEN + 8 + ext_len.div_ceil(8) * 8;
    let name_off = ext_end + 8;
    img[..4].copy_from_slice(&MAGIC);
    put32(&mut img, 4, 3);
    put64(&mut img, 8, name_off as u64);
    put32(&mut img, 16, backing.len() as u32);
    put32(&mut img, 20, BITS);
    put64(&mut img, 24, size);
    put32(&mut img, 36, l1_size as u32);
    put64(&mut img, 40, 3 * CS);
    put64(&mut img, 48, CS);
    put32(&mut img, 56, 1);
    put32(&mut img, 96, 4);
    put32(&mut img, 100, HEADER_LEN as u32);
    put32(&mut img, HEADER_LEN, EXT_BACKING_FORMAT);
    put32(&mut img, HEADER_LEN + 4, ext_len as u32);
    img[HEADER_LEN + 8..HEADER_LEN + 8 + ext_len].copy_from_slice(backing_format.as_bytes());
    // End-of-extensions marker: 8 zero bytes at ext_end (already zero).
    img[name_off..name_off + backing.len()].copy_from_slice(backing.as_bytes());

    // Refcount table -> block at cluster 2; every cluster of the image has refcount 1.
    put64(&mut img, CS as usize, 2 * CS);
    for c in 0..total_clusters as usize {
        let at = 2 * CS as usize + 2 * c;
        img[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    Ok(img)
}
