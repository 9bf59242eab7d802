//! Errors of the disk crate. Every message is one line and starts with the file it is about.

use std::io;

/// Why a disk image could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskError {
    /// The file could not be opened.
    #[error("{file}: cannot open: {source}")]
    Open {
        /// The image file.
        file: String,
        /// The OS error.
        source: io::Error,
    },
    /// A read, write, sync or allocation on the host file failed.
    #[error("{file}: {op} failed: {source}")]
    Io {
        /// The image file.
        file: String,
        /// What was being done ("read", "write", "sync", ...).
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The file was opened as qcow2 but does not start with "QFI\xfb".
    #[error("{file}: not a qcow2 image (bad magic)")]
    BadMagic {
        /// The image file.
        file: String,
    },
    /// The image's metadata is inconsistent; nothing was changed because of it.
    #[error("{file}: corrupt image: {reason}")]
    Corrupt {
        /// The image file.
        file: String,
        /// What is wrong, with offsets.
        reason: String,
    },
    /// The image uses a feature this crate does not implement.
    #[error("{file}: unsupported: {what}")]
    Unsupported {
        /// The image file.
        file: String,
        /// The feature.
        what: String,
    },
    /// A backing file named in the image does not exist.
    #[error("{file}: backing file {backing} not found")]
    BackingNotFound {
        /// The image that names the backing file.
        file: String,
        /// The backing file name as stored in the image.
        backing: String,
    },
    /// The backing chain comes back to an image already in it.
    #[error("{file}: backing chain loops back to {again}")]
    BackingLoop {
        /// The image whose backing file closes the loop.
        file: String,
        /// The image met twice.
        again: String,
    },
    /// The backing chain is longer than [`crate::MAX_CHAIN_DEPTH`].
    #[error("{file}: backing chain deeper than {max} images")]
    ChainTooDeep {
        /// The image at which the limit was passed.
        file: String,
        /// The limit.
        max: usize,
    },
    /// A write, discard or write-zeroes on an image opened read-only.
    #[error("{file}: image is read-only")]
    ReadOnly {
        /// The image file.
        file: String,
    },
    /// A request reaches past the end of the virtual disk.
    #[error(
        "{file}: request of {len} bytes at {offset} is past the end of the disk ({size} bytes)"
    )]
    OutOfRange {
        /// The image file.
        file: String,
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Virtual disk size.
        size: u64,
    },
    /// The target of a create already exists.
    #[error("{file}: already exists")]
    Exists {
        /// The file asked for.
        file: String,
    },
}

/// The name used in messages for a path.
pub(crate) fn name(path: &std::path::Path) -> String {
    path.display().to_string()
}
