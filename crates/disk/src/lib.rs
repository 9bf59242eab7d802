//! Disk images for virtio-blk and the image store: raw files and qcow2 (v2 and v3) with
//! backing chains of raw or qcow2 images.
//!
//! [`open`] gives a [`BlockBackend`]: synchronous, `Send + Sync`, meant to be called from the
//! block device's I/O worker threads. Raw images do positioned I/O with no lock; qcow2 keeps
//! its metadata behind one mutex and writes allocated clusters outside it. Nothing here
//! panics on a corrupt image: every inconsistency is a [`DiskError`] naming the file.
#![deny(unsafe_code)]

mod error;
mod file;
mod iovec;
mod qcow2;
mod raw;
pub mod tracked;

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use error::name;
pub use error::DiskError;
use file::DiskFile;
pub use iovec::{bounce_read, bounce_write, IoVec, BOUNCE};
use qcow2::header::{self, Header};

/// Backing files below the top image that [`open`] and [`info`] follow before giving up.
pub const MAX_CHAIN_DEPTH: usize = 16;

/// On-disk format of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// The file is the disk, byte for byte.
    Raw,
    /// QEMU copy-on-write, version 2 or 3.
    Qcow2,
}

impl ImageFormat {
    /// The name QEMU uses ("raw", "qcow2").
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// How [`open`] opens an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// `None` detects qcow2 by its magic "QFI\xfb", else raw. Give the format for images a
    /// guest has written raw: a guest can write that magic into its own first sector.
    pub format: Option<ImageFormat>,
    /// Refuse writes, discards and write-zeroes. Backing files are always read-only.
    pub readonly: bool,
    /// O_DIRECT for aligned requests where the filesystem allows it; buffered otherwise.
    pub direct: bool,
}

/// A disk as the block device sees it. Every method may be called from several threads.
pub trait BlockBackend: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`. Past the end of the disk is an error; unallocated
    /// ranges read as zeros or as the backing file's data.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError>;
    /// Writes `buf` at `offset`; durable after the next [`BlockBackend::flush`].
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError>;
    /// Fills the memory `iov` describes, in order, from `offset`: a read straight into the
    /// caller's memory (a guest's RAM), as [`BlockBackend::read_at`] otherwise behaves. The
    /// default copies through a per-thread bounce buffer ([`bounce_read`]); raw images do a
    /// `preadv` into `iov` itself when the file's alignment allows.
    fn read_vectored(&self, iov: &[IoVec], offset: u64) -> Result<(), DiskError> {
        bounce_read(self, iov, offset)
    }
    /// Writes the memory `iov` describes, in order, at `offset` (see
    /// [`BlockBackend::read_vectored`]); the default bounces ([`bounce_write`]).
    fn write_vectored(&self, iov: &[IoVec], offset: u64) -> Result<(), DiskError> {
        bounce_write(self, iov, offset)
    }
    /// The host file a transfer of `iov` at `offset` (a write when `write`) can go to without
    /// a copy, for callers that run it themselves (io_uring): `Some(fd)` exactly when
    /// [`BlockBackend::read_vectored`] / [`BlockBackend::write_vectored`] would do one
    /// `preadv` / `pwritev` of `iov` at `offset` on `fd`, range and read-only checks passed.
    /// A read that comes back short met the end of a file shorter than the disk: redo it with
    /// `read_vectored`, which zero-fills. The descriptor stays open as long as the backend.
    /// Default: `None` (images with metadata, like qcow2).
    fn vectored_fd(&self, iov: &[IoVec], offset: u64, write: bool) -> Option<RawFd> {
        let _ = (iov, offset, write);
        None
    }
    /// A write of `len` bytes at `offset` that a caller ran itself on a descriptor from
    /// [`BlockBackend::vectored_fd`] has ended (whatever its result); called before the guest
    /// is told. Default: nothing to do.
    fn wrote(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }
    /// Makes every completed write durable, data and metadata.
    fn flush(&self) -> Result<(), DiskError>;
    /// Hints that a range is unused; its contents are unspecified afterwards.
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError>;
    /// Makes a range read as zeros; `may_unmap` lets it free the space.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DiskError>;
    /// Whether writes are refused.
    fn readonly(&self) -> bool;
    /// A stable id of at most 20 bytes (from the file's device and inode) for
    /// VIRTIO_BLK_T_GET_ID.
    fn id(&self) -> String;
}

/// One image below the top of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingInfo {
    /// The name as stored in the image above it.
    pub name: String,
    /// That name resolved (relative names are relative to the folder of the image above).
    pub path: PathBuf,
    /// Its format.
    pub format: ImageFormat,
    /// Its virtual size.
    pub virtual_size: u64,
}

/// What [`info`] reports about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Format of the image itself.
    pub format: ImageFormat,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Bytes the file takes in its folder (its length, not its allocation).
    pub file_size: u64,
    /// qcow2 cluster size; `None` for raw.
    pub cluster_size: Option<u64>,
    /// Backing files, nearest first.
    pub backing_chain: Vec<BackingInfo>,
}

/// Errors unless `[offset, offset + len)` lies inside a disk of `size` bytes.
pub(crate) fn check_range(file: &str, offset: u64, len: u64, size: u64) -> Result<(), DiskError> {
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(DiskError::OutOfRange {
            file: file.to_string(),
            offset,
            len,
            size,
        });
    }
    Ok(())
}

/// One opened level of a chain: its file, format, header and backing file.
struct Level {
    file: DiskFile,
    format: ImageFormat,
    header: Option<Header>,
    backing: Option<(String, PathBuf, Option<ImageFormat>)>,
}

/// Where a backing file named `name` in the image at `image` is.
fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new("")).join(p)
    }
}

/// Opens one level, checking chain depth and loops against `seen` (device, inode).
fn open_level(
    path: &Path,
    format: Option<ImageFormat>,
    readonly: bool,
    direct: bool,
    seen: &mut Vec<(u64, u64)>,
    parent: Option<&str>,
) -> Result<Level, DiskError> {
    if seen.len() > MAX_CHAIN_DEPTH {
        return Err(DiskError::ChainTooDeep {
            file: parent.map_or_else(|| name(path), str::to_string),
            max: MAX_CHAIN_DEPTH,
        });
    }
    let file = DiskFile::open(path, readonly, direct)?;
    if seen.contains(&file.identity()) {
        return Err(DiskError::BackingLoop {
            file: parent.map_or_else(|| name(path), str::to_string),
            again: name(path),
        });
    }
    seen.push(file.identity());
    let format = match format {
        Some(f) => f,
        None => {
            let mut magic = [0u8; 4];
            let n = file.read_upto(&mut magic, 0)?;
            if n == 4 && magic == header::MAGIC {
                ImageFormat::Qcow2
            } else {
                ImageFormat::Raw
            }
        }
    };
    if format == ImageFormat::Raw {
        return Ok(Level {
            file,
            format,
            header: None,
            backing: None,
        });
    }
    let hdr = Header::read(&file, file.len()?)?;
    let backing = match &hdr.backing_file {
        None => None,
        Some(stored) => {
            let bpath = resolve_backing(path, stored);
            if !bpath.exists() {
                return Err(DiskError::BackingNotFound {
                    file: file.name().to_string(),
                    backing: stored.clone(),
                });
            }
            let bfmt = match hdr.backing_format.as_deref() {
                None => None,
                Some("raw") => Some(ImageFormat::Raw),
                Some("qcow2") => Some(ImageFormat::Qcow2),
                Some(other) => return Err(file.unsupported(format!("backing format {other}"))),
            };
            Some((stored.clone(), bpath, bfmt))
        }
    };
    Ok(Level {
        file,
        format,
        header: Some(hdr),
        backing,
    })
}

fn open_chain(
    path: &Path,
    format: Option<ImageFormat>,
    readonly: bool,
    direct: bool,
    seen: &mut Vec<(u64, u64)>,
    parent: Option<&str>,
) -> Result<Box<dyn BlockBackend>, DiskError> {
    let level = open_level(path, format, readonly, direct, seen, parent)?;
    let backing = match &level.backing {
        None => None,
        Some((_, bpath, bfmt)) => Some(open_chain(
            bpath,
            *bfmt,
            true,
            direct,
            seen,
            Some(level.file.name()),
        )?),
    };
    match (level.format, level.header) {
        (ImageFormat::Qcow2, Some(hdr)) => {
            Ok(Box::new(qcow2::Qcow2::open(level.file, hdr, backing)?))
        }
        _ => Ok(Box::new(raw::Raw::new(level.file)?)),
    }
}

/// Opens the image at `path` and its backing chain.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockBackend>, DiskError> {
    open_chain(
        path,
        opts.format,
        opts.readonly,
        opts.direct,
        &mut Vec::new(),
        None,
    )
}

/// Format, size and backing chain of the image at `path` (format detected by magic).
pub fn info(path: &Path) -> Result<ImageInfo, DiskError> {
    let mut seen = Vec::new();
    let top = open_level(path, None, true, false, &mut seen, None)?;
    let describe = |l: &Level| -> Result<(u64, Option<u64>), DiskError> {
        match &l.header {
            Some(h) => Ok((h.size, Some(h.cluster_size()))),
            None => Ok((l.file.len()?, None)),
        }
    };
    let (virtual_size, cluster_size) = describe(&top)?;
    let mut info = ImageInfo {
        format: top.format,
        virtual_size,
        file_size: top.file.len()?,
        cluster_size,
        backing_chain: Vec::new(),
    };
    let mut next = top;
    while let Some((stored, bpath, bfmt)) = next.backing.take() {
        let level = open_level(&bpath, bfmt, true, false, &mut seen, Some(next.file.name()))?;
        info.backing_chain.push(BackingInfo {
            name: stored,
            path: bpath,
            format: level.format,
            virtual_size: describe(&level)?.0,
        });
        next = level;
    }
    Ok(info)
}

/// Creates a qcow2 v3 image at `path` (which must not exist) whose backing file is
/// `backing`, with the backing image's size. A relative `backing` is stored as given and
/// resolved against the folder of `path`, as QEMU does.
pub fn create_qcow2_overlay(path: &Path, backing: &Path) -> Result<(), DiskError> {
    let file = name(path);
    let Some(stored) = backing.to_str() else {
        return Err(DiskError::Unsupported {
            file,
            what: "backing file name is not UTF-8".into(),
        });
    };
    let bpath = resolve_backing(path, stored);
    if !bpath.exists() {
        return Err(DiskError::BackingNotFound {
            file,
            backing: stored.to_string(),
        });
    }
    let base = info(&bpath)?;
    if base.backing_chain.len() + 1 > MAX_CHAIN_DEPTH {
        return Err(DiskError::ChainTooDeep {
            file,
            max: MAX_CHAIN_DEPTH,
        });
    }
    let img = header::new_overlay_image(base.virtual_size, stored, base.format.as_str()).map_err(
        |what| DiskError::Unsupported {
            file: file.clone(),
            what,
        },
    )?;
    write_new_file(path, &img)
}

/// Writes a whole new file and makes it and its directory entry durable.
fn write_new_file(path: &Path, data: &[u8]) -> Result<(), DiskError> {
    use std::io::Write;
    let file = name(path);
    let io = |op, source| DiskError::Io {
        file: file.clone(),
        op,
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => DiskError::Exists { file: file.clone() },
            _ => DiskError::Open {
                file: file.clone(),
                source,
            },
        })?;
    let res = f
        .write_all(data)
        .map_err(|e| io("write", e))
        .and_then(|()| f.sync_all().map_err(|e| io("sync", e)));
    if let Err(e) = res {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("sync folder", e))
}
