//! The migration stream's framing: the hello both peers send first, and the records after it
//! (layout in the [`super`] module docs). Pure byte handling over `Read`/`Write`, no KVM, so
//! every rule a hostile or broken peer could break is unit-tested here.
//!
//! Page data is the one part that does not go through a buffer here: a [`Kind::Pages`] record
//! is a list of page runs (guest address, page count) followed by their bytes, which the
//! sender writes with `writev` straight from guest RAM ([`pages_head`]) and the receiver reads
//! straight into guest RAM after checking each run ([`read_record`] returns the runs and
//! leaves their bytes in the stream).

use std::io::{ErrorKind, Read, Write};

use super::MigrationError;

/// First bytes of every hello.
pub const MAGIC: [u8; 8] = *b"FERROMIG";
/// Version of the stream this code writes and reads (2: page records are runs of pages with
/// their bytes after the list, rather than one address per 4 KiB page; 3: disk and file
/// records for storage migration).
pub const VERSION: u32 = 3;
/// Guest page size; every page record carries whole pages of it.
pub const PAGE: u64 = 4096;
/// Bytes of one run in a [`Kind::Pages`] record's list: its address and its page count.
pub const RUN_ENTRY: usize = 12;
/// Largest record payload accepted (the machine state of 32 vCPUs is well under this).
pub const MAX_RECORD: u32 = 64 << 20;
/// Most runs one [`Kind::Pages`] record may list (with the head, one `writev` of at most
/// `IOV_MAX` = 1024 pieces).
pub const MAX_RUNS: usize = 1000;

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source: the VM's configuration and RAM layout (JSON).
    Config = 1,
    /// Source: `u32` count, then per run its first page's guest address (`u64`) and its page
    /// count (`u32`), then the bytes of every run, in list order.
    Pages = 2,
    /// Source: `u32` count, then per run its first page's address and its page count (`u64`s):
    /// pages that are zero now.
    Zeros = 3,
    /// Source: `u32` number of the copy round that starts.
    Round = 4,
    /// Source: FNV-1a 64 of the state (`u64`), then the machine state (JSON).
    State = 5,
    /// Source: nothing follows; build the VM and run it.
    End = 6,
    /// Source: it gave up; UTF-8 reason.
    Abort = 7,
    /// Source, optional: `u32` count, then per 2 MiB of guest memory a `u64` hash
    /// ([`super::chunk_hashes`]) the destination checks its copy against.
    Verify = 8,
    /// Source, storage migration: disk `u32` (configuration order), byte offset `u64`, then
    /// the bytes (whole 512-byte sectors) that go there.
    Disk = 9,
    /// Source, storage migration: disk `u32`, byte offset `u64`, length `u64`: a range that
    /// reads as zeros now.
    DiskZeros = 10,
    /// Source, storage migration: file `u8` (0 kernel, 1 initrd), byte offset `u64`, then
    /// the bytes that go there.
    File = 11,
    /// Source, first after the hello when it has one: the destination's one-time migration
    /// token (bytes).
    Auth = 13,
    /// Destination: the VM is built and runs.
    Ack = 0x41,
    /// Destination: it cannot take the VM; UTF-8 reason.
    Refuse = 0x42,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Config,
            2 => Self::Pages,
            3 => Self::Zeros,
            4 => Self::Round,
            5 => Self::State,
            6 => Self::End,
            7 => Self::Abort,
            8 => Self::Verify,
            9 => Self::Disk,
            10 => Self::DiskZeros,
            11 => Self::File,
            13 => Self::Auth,
            0x41 => Self::Ack,
            0x42 => Self::Refuse,
            _ => return None,
        })
    }
}

/// A record read from the stream; borrowed parts point into the reader's buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// [`Kind::Config`].
    Config(&'a [u8]),
    /// [`Kind::Pages`]: (first page address, page count) runs whose lengths add up to the
    /// record's. Their bytes (`pages x 4096` each, in this order) are still in the stream: the
    /// caller reads them before the next record.
    Pages(Vec<(u64, u32)>),
    /// [`Kind::Zeros`]: (first page address, page count) runs.
    Zeros(Vec<(u64, u64)>),
    /// [`Kind::Round`].
    Round(u32),
    /// [`Kind::State`], checksum already checked.
    State(&'a [u8]),
    /// [`Kind::End`].
    End,
    /// [`Kind::Abort`].
    Abort(String),
    /// [`Kind::Verify`].
    Verify(Vec<u64>),
    /// [`Kind::Disk`]: disk, offset, bytes.
    Disk(u32, u64, &'a [u8]),
    /// [`Kind::DiskZeros`]: disk, offset, length.
    DiskZeros(u32, u64, u64),
    /// [`Kind::File`]: which file, offset, bytes.
    File(FileKind, u64, &'a [u8]),
    /// [`Kind::Auth`].
    Auth(&'a [u8]),
    /// [`Kind::Ack`].
    Ack,
    /// [`Kind::Refuse`].
    Refuse(String),
}

/// The files besides disks a storage migration copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FileKind {
    /// The kernel image.
    Kernel = 0,
    /// The initial ramdisk.
    Initrd = 1,
}

/// Bytes of a [`Kind::Disk`] or [`Kind::File`] record before its data.
pub const DISK_HEAD: usize = 12;
/// Sector size: disk records carry whole sectors at sector offsets.
pub const SECTOR: u64 = 512;

fn u64_at(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// FNV-1a 64, the state's checksum.
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn io(e: std::io::Error) -> MigrationError {
    if e.kind() == ErrorKind::UnexpectedEof {
        MigrationError::Closed
    } else {
        MigrationError::Io(e)
    }
}

fn malformed(what: String) -> MigrationError {
    MigrationError::Malformed(what)
}

/// Writes this side's hello: [`MAGIC`], [`VERSION`], 4 reserved zero bytes.
pub fn write_hello(w: &mut impl Write) -> Result<(), MigrationError> {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    w.write_all(&h).map_err(io)?;
    w.flush().map_err(io)
}

/// Reads the peer's hello and refuses another magic or version.
pub fn read_hello(r: &mut impl Read) -> Result<(), MigrationError> {
    let mut h = [0u8; 16];
    r.read_exact(&mut h).map_err(io)?;
    if h[..8] != MAGIC {
        return Err(MigrationError::Magic);
    }
    let version = u32_at(&h[8..12]);
    if version != VERSION {
        return Err(MigrationError::Version(version));
    }
    Ok(())
}

/// Writes one record: kind byte, payload length (`u32`), payload.
pub fn write_record(
    w: &mut (impl Write + ?Sized),
    kind: Kind,
    payload: &[u8],
) -> Result<(), MigrationError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_RECORD)
        .ok_or_else(|| malformed(format!("a record of {} bytes", payload.len())))?;
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head).map_err(io)?;
    w.write_all(payload).map_err(io)
}

/// Writes a [`Kind::State`] record for the serialised machine state `state`.
pub fn write_state(w: &mut impl Write, state: &[u8]) -> Result<(), MigrationError> {
    let mut payload = Vec::with_capacity(8 + state.len());
    payload.extend_from_slice(&fnv64(state).to_le_bytes());
    payload.extend_from_slice(state);
    write_record(w, Kind::State, &payload)
}

/// Writes a [`Kind::Zeros`] record.
pub fn write_zeros(w: &mut impl Write, runs: &[(u64, u64)]) -> Result<(), MigrationError> {
    let mut payload = Vec::with_capacity(4 + runs.len() * 16);
    payload.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for (addr, n) in runs {
        payload.extend_from_slice(&addr.to_le_bytes());
        payload.extend_from_slice(&n.to_le_bytes());
    }
    write_record(w, Kind::Zeros, &payload)
}

/// Writes a record whose payload is `head` then `data` (no copy of `data` here).
fn write_parts(
    w: &mut (impl Write + ?Sized),
    kind: Kind,
    head: &[u8],
    data: &[u8],
) -> Result<(), MigrationError> {
    let total = head.len() + data.len();
    let len = u32::try_from(total)
        .ok()
        .filter(|&l| l <= MAX_RECORD)
        .ok_or_else(|| malformed(format!("a record of {total} bytes")))?;
    let mut h = [0u8; 5];
    h[0] = kind as u8;
    h[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&h).map_err(io)?;
    w.write_all(head).map_err(io)?;
    w.write_all(data).map_err(io)
}

/// Writes a [`Kind::Disk`] record: `data` goes at byte `offset` of disk `disk`.
pub fn write_disk(
    w: &mut (impl Write + ?Sized),
    disk: u32,
    offset: u64,
    data: &[u8],
) -> Result<(), MigrationError> {
    let mut head = [0u8; DISK_HEAD];
    head[..4].copy_from_slice(&disk.to_le_bytes());
    head[4..].copy_from_slice(&offset.to_le_bytes());
    write_parts(w, Kind::Disk, &head, data)
}

/// Writes a [`Kind::DiskZeros`] record.
pub fn write_disk_zeros(
    w: &mut (impl Write + ?Sized),
    disk: u32,
    offset: u64,
    len: u64,
) -> Result<(), MigrationError> {
    let mut payload = [0u8; 20];
    payload[..4].copy_from_slice(&disk.to_le_bytes());
    payload[4..12].copy_from_slice(&offset.to_le_bytes());
    payload[12..].copy_from_slice(&len.to_le_bytes());
    write_record(w, Kind::DiskZeros, &payload)
}

/// Writes a [`Kind::File`] record.
pub fn write_file(
    w: &mut (impl Write + ?Sized),
    file: FileKind,
    offset: u64,
    data: &[u8],
) -> Result<(), MigrationError> {
    let mut head = [0u8; 9];
    head[0] = file as u8;
    head[1..].copy_from_slice(&offset.to_le_bytes());
    write_parts(w, Kind::File, &head, data)
}

/// Writes a [`Kind::Verify`] record.
pub fn write_verify(w: &mut impl Write, hashes: &[u64]) -> Result<(), MigrationError> {
    let mut payload = Vec::with_capacity(4 + hashes.len() * 8);
    payload.extend_from_slice(&(hashes.len() as u32).to_le_bytes());
    for h in hashes {
        payload.extend_from_slice(&h.to_le_bytes());
    }
    write_record(w, Kind::Verify, &payload)
}

/// The head of a [`Kind::Pages`] record for `runs` (first page address, page count): kind,
/// length, run list; the pages' bytes are to follow it on the stream, run after run. Appended
/// to `out`.
pub fn pages_head(out: &mut Vec<u8>, runs: &[(u64, u32)]) -> Result<(), MigrationError> {
    let pages: u64 = runs.iter().map(|&(_, n)| u64::from(n)).sum();
    let len = (4 + runs.len() * RUN_ENTRY) as u64 + pages * PAGE;
    let len = u32::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_RECORD && runs.len() <= MAX_RUNS)
        .ok_or_else(|| malformed(format!("a page record of {len} bytes, {} runs", runs.len())))?;
    out.push(Kind::Pages as u8);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for (addr, n) in runs {
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
    }
    Ok(())
}

/// Writes a whole [`Kind::Pages`] record from `runs` and their `data` (tests and tools; the
/// migration sends the data from guest RAM).
pub fn write_pages(
    w: &mut impl Write,
    runs: &[(u64, u32)],
    data: &[u8],
) -> Result<(), MigrationError> {
    let mut head = Vec::new();
    pages_head(&mut head, runs)?;
    w.write_all(&head).map_err(io)?;
    w.write_all(data).map_err(io)
}

/// Reads one record into `buf` (reused between calls) and checks its framing: known kind,
/// length within [`MAX_RECORD`], payload that fits its kind, state checksum. Of a
/// [`Kind::Pages`] record it reads only the run list (checked against the length): the pages'
/// bytes stay in the stream for the caller to read where they belong.
pub fn read_record<'a>(
    r: &mut impl Read,
    buf: &'a mut Vec<u8>,
) -> Result<Record<'a>, MigrationError> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).map_err(io)?;
    let kind = Kind::from_byte(head[0])
        .ok_or_else(|| malformed(format!("unknown record kind {:#04x}", head[0])))?;
    let len = u32_at(&head[1..]);
    if len > MAX_RECORD {
        return Err(malformed(format!("a record of {len} bytes")));
    }
    buf.clear();
    if kind == Kind::Pages {
        return read_runs(r, len);
    }
    // Read through `take`, so a lying length costs no more memory than the bytes that came.
    let got = r.take(u64::from(len)).read_to_end(buf).map_err(io)?;
    if got != len as usize {
        return Err(MigrationError::Closed);
    }
    let p: &'a [u8] = buf;
    let counted = |entry: usize| -> Result<&'a [u8], MigrationError> {
        if p.len() < 4 {
            return Err(malformed(format!("{kind:?} record of {} bytes", p.len())));
        }
        let n = u32_at(p) as usize;
        if n.checked_mul(entry).and_then(|b| b.checked_add(4)) != Some(p.len()) {
            return Err(malformed(format!(
                "{kind:?} record says {n} entries in {} bytes",
                p.len()
            )));
        }
        Ok(&p[4..])
    };
    let empty = |rec: Record<'a>| -> Result<Record<'a>, MigrationError> {
        if p.is_empty() {
            Ok(rec)
        } else {
            Err(malformed(format!("{kind:?} record with a payload")))
        }
    };
    let text = || String::from_utf8_lossy(p).into_owned();
    Ok(match kind {
        Kind::Config => Record::Config(p),
        // Returned by `read_runs` above, before the payload is read.
        Kind::Pages => return Err(malformed("a page record read whole".into())),
        Kind::Zeros => Record::Zeros(
            counted(16)?
                .chunks_exact(16)
                .map(|e| (u64_at(e), u64_at(&e[8..])))
                .collect(),
        ),
        Kind::Verify => Record::Verify(counted(8)?.chunks_exact(8).map(u64_at).collect()),
        Kind::Round if p.len() == 4 => Record::Round(u32_at(p)),
        Kind::Round => return Err(malformed(format!("Round record of {} bytes", p.len()))),
        Kind::State => {
            if p.len() < 8 {
                return Err(malformed(format!("State record of {} bytes", p.len())));
            }
            let (sum, state) = p.split_at(8);
            if u64_at(sum) != fnv64(state) {
                return Err(MigrationError::Checksum);
            }
            Record::State(state)
        }
        Kind::Disk => {
            if p.len() < DISK_HEAD {
                return Err(malformed(format!("Disk record of {} bytes", p.len())));
            }
            let (disk, offset, data) = (u32_at(p), u64_at(&p[4..]), &p[DISK_HEAD..]);
            if data.is_empty()
                || !offset.is_multiple_of(SECTOR)
                || !(data.len() as u64).is_multiple_of(SECTOR)
            {
                return Err(malformed(format!(
                    "Disk record of {} bytes at {offset}: not whole sectors",
                    data.len()
                )));
            }
            Record::Disk(disk, offset, data)
        }
        Kind::DiskZeros => {
            if p.len() != 20 {
                return Err(malformed(format!("DiskZeros record of {} bytes", p.len())));
            }
            let (disk, offset, len) = (u32_at(p), u64_at(&p[4..]), u64_at(&p[12..]));
            if len == 0 || !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
                return Err(malformed(format!(
                    "DiskZeros record of {len} bytes at {offset}: not whole sectors"
                )));
            }
            Record::DiskZeros(disk, offset, len)
        }
        Kind::File => {
            if p.len() < 9 {
                return Err(malformed(format!("File record of {} bytes", p.len())));
            }
            let file = match p[0] {
                0 => FileKind::Kernel,
                1 => FileKind::Initrd,
                f => return Err(malformed(format!("File record for unknown file {f}"))),
            };
            Record::File(file, u64_at(&p[1..]), &p[9..])
        }
        Kind::End => empty(Record::End)?,
        Kind::Ack => empty(Record::Ack)?,
        Kind::Auth => Record::Auth(p),
        Kind::Abort => Record::Abort(text()),
        Kind::Refuse => Record::Refuse(text()),
    })
}

/// The run list of a [`Kind::Pages`] record of `len` bytes, after its head: at least one run
/// and at most [`MAX_RUNS`], none empty, and the pages' bytes exactly what the length leaves.
fn read_runs<'a>(r: &mut impl Read, len: u32) -> Result<Record<'a>, MigrationError> {
    let mut n = [0u8; 4];
    if len < 4 {
        return Err(malformed(format!("Pages record of {len} bytes")));
    }
    r.read_exact(&mut n).map_err(io)?;
    let n = u32_at(&n) as usize;
    if n == 0 || n > MAX_RUNS || 4 + n * RUN_ENTRY > len as usize {
        return Err(malformed(format!(
            "Pages record says {n} runs in {len} bytes"
        )));
    }
    let mut list = vec![0u8; n * RUN_ENTRY];
    r.read_exact(&mut list).map_err(io)?;
    let runs: Vec<(u64, u32)> = list
        .chunks_exact(RUN_ENTRY)
        .map(|e| (u64_at(e), u32_at(&e[8..])))
        .collect();
    let pages: u64 = runs.iter().map(|&(_, p)| u64::from(p)).sum();
    let data = u64::from(len) - (4 + n * RUN_ENTRY) as u64;
    if runs.iter().any(|&(_, p)| p == 0) || pages * PAGE != data {
        return Err(malformed(format!(
            "Pages record of {len} bytes lists {pages} pages in {n} runs"
        )));
    }
    Ok(Record::Pages(runs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> Vec<u8> {
        let mut w = Vec::new();
        write_hello(&mut w).unwrap();
        write_record(&mut w, Kind::Config, br#"{"a":1}"#).unwrap();
        write_record(&mut w, Kind::Round, &3u32.to_le_bytes()).unwrap();
        let mut data = vec![0xab; 4096];
        data.resize(3 * 4096, 0);
        data[3 * 4096 - 1] = 7;
        write_pages(&mut w, &[(0x1000, 1), (0x5000, 2)], &data).unwrap();
        write_zeros(&mut w, &[(0x2000, 3), (0x10_0000, 1)]).unwrap();
        write_verify(&mut w, &[1, u64::MAX]).unwrap();
        write_disk(&mut w, 1, 4096, &[5; 1024]).unwrap();
        write_disk_zeros(&mut w, 0, 1 << 20, 65536).unwrap();
        write_file(&mut w, FileKind::Initrd, 7, b"abc").unwrap();
        write_state(&mut w, b"{\"state\":true}").unwrap();
        write_record(&mut w, Kind::End, &[]).unwrap();
        w
    }

    #[test]
    fn encode_then_decode() {
        let bytes = stream();
        let mut r = &bytes[..];
        read_hello(&mut r).unwrap();
        let mut buf = Vec::new();
        assert_eq!(
            read_record(&mut r, &mut buf).unwrap(),
            Record::Config(br#"{"a":1}"#)
        );
        assert_eq!(read_record(&mut r, &mut buf).unwrap(), Record::Round(3));
        assert_eq!(
            read_record(&mut r, &mut buf).unwrap(),
            Record::Pages(vec![(0x1000, 1), (0x5000, 2)])
        );
        // The pages' bytes follow the list.
        let mut data = vec![0u8; 3 * 4096];
        r.read_exact(&mut data).unwrap();
        assert!(data[..4096].iter().all(|&b| b == 0xab));
        assert_eq!((data[4096], data[3 * 4096 - 1]), (0, 7));
        assert_eq!(
            read_record(&mut r, &mut buf).unwrap(),
            Record::Zeros(vec![(0x2000, 3), (0x10_0000, 1)])
        );
        assert_eq!(
            read_record(&mut r, &mut buf).unwrap(),
            Record::Verify(vec![1, u64::MAX])
        );
        assert_eq!(
            read_record(&mut r, &mut buf).unwrap(),
            Record::Disk(1, 4096, &[5; 1024])
        );
        assert_eq!(
            read_record(&mut r, &mut buf).unwrap(),
            Record::DiskZeros(0, 1 << 20, 65536)
        );
        assert_eq!(
            read_record(&mut r, &mut buf).unwrap(),
            Record::File(FileKind::Initrd, 7, b"abc")
        );
        assert_eq!(
            read_record(&mut r, &mut buf).unwrap(),
            Record::State(b"{\"state\":true}")
        );
        assert_eq!(read_record(&mut r, &mut buf).unwrap(), Record::End);
        assert!(matches!(
            read_record(&mut r, &mut buf),
            Err(MigrationError::Closed)
        ));
    }

    #[test]
    fn another_version_or_magic_is_refused() {
        // Version 1 (one address per page), 2 (no disk records) and a later one.
        for other in [1u8, 2, 4] {
            let mut h = Vec::new();
            write_hello(&mut h).unwrap();
            h[8] = other;
            let e = read_hello(&mut &h[..]).unwrap_err();
            assert!(
                matches!(e, MigrationError::Version(v) if v == u32::from(other)),
                "{e}"
            );
            assert!(e.to_string().contains(&format!("version {other}")), "{e}");
            assert!(e.to_string().contains(&format!("speaks {VERSION}")), "{e}");
        }
        let e = read_hello(&mut &b"GET / HTTP/1.1\r\n\r\n"[..]).unwrap_err();
        assert!(matches!(e, MigrationError::Magic), "{e}");
        assert!(matches!(
            read_hello(&mut &MAGIC[..]),
            Err(MigrationError::Closed)
        ));
    }

    #[test]
    fn every_truncation_is_an_error_never_a_panic() {
        let bytes = stream();
        for cut in 0..bytes.len() {
            let mut r = &bytes[..cut];
            let mut buf = Vec::new();
            let mut ended = false;
            if read_hello(&mut r).is_ok() {
                loop {
                    match read_record(&mut r, &mut buf) {
                        Ok(Record::End) => ended = true,
                        Ok(Record::Pages(runs)) => {
                            let n: u64 = runs.iter().map(|&(_, p)| u64::from(p)).sum();
                            let mut data = vec![0u8; (n * PAGE) as usize];
                            if r.read_exact(&mut data).is_err() {
                                break;
                            }
                        }
                        Ok(_) => continue,
                        Err(MigrationError::Closed) => break,
                        Err(e) => panic!("cut at {cut}: {e}"),
                    }
                }
            }
            assert!(!ended, "cut at {cut} still reached the end");
        }
    }

    #[test]
    fn bad_records_are_refused() {
        let read = |bytes: &[u8]| {
            let mut buf = Vec::new();
            read_record(&mut &bytes[..], &mut buf)
                .map(|_| ())
                .unwrap_err()
        };
        assert!(matches!(
            read(&[0x99, 0, 0, 0, 0]),
            MigrationError::Malformed(_)
        ));
        // A length beyond the limit is refused before anything is read or allocated.
        let mut huge = vec![Kind::Config as u8];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read(&huge), MigrationError::Malformed(_)));
        // Page runs that do not match the length: more pages than bytes, fewer, an empty run,
        // no run, too many runs, a list longer than the record.
        let pages = |runs: &[(u64, u32)], data: usize| {
            let mut p = (runs.len() as u32).to_le_bytes().to_vec();
            for (a, n) in runs {
                p.extend_from_slice(&a.to_le_bytes());
                p.extend_from_slice(&n.to_le_bytes());
            }
            p.resize(p.len() + data, 0);
            let mut w = Vec::new();
            write_record(&mut w, Kind::Pages, &p).unwrap();
            w
        };
        for (runs, data) in [
            (vec![(0u64, 2u32)], 4096usize),
            (vec![(0, 1)], 8192),
            (vec![(0, 1), (8192, 0)], 4096),
            (vec![], 0),
            (vec![(0, 1); MAX_RUNS + 1], (MAX_RUNS + 1) * 4096),
            (vec![(0, u32::MAX)], 4096),
        ] {
            let e = read(&pages(&runs, data));
            assert!(matches!(e, MigrationError::Malformed(_)), "{runs:?}: {e}");
        }
        let mut w = vec![Kind::Pages as u8];
        w.extend_from_slice(&8u32.to_le_bytes());
        w.extend_from_slice(&1000u32.to_le_bytes());
        w.extend_from_slice(&[0; 4]);
        assert!(matches!(read(&w), MigrationError::Malformed(_)));
        // The sender's side refuses what the reader would.
        assert!(pages_head(&mut Vec::new(), &[(0, 1); MAX_RUNS + 1]).is_err());
        assert!(pages_head(&mut Vec::new(), &[(0, u32::MAX)]).is_err());
        // A state whose checksum is wrong.
        let mut w = Vec::new();
        write_state(&mut w, b"state").unwrap();
        let last = w.len() - 1;
        w[last] ^= 1;
        assert!(matches!(read(&w), MigrationError::Checksum));
        let mut w = Vec::new();
        write_record(&mut w, Kind::End, b"x").unwrap();
        assert!(matches!(read(&w), MigrationError::Malformed(_)));
        // Disk records: not whole sectors, no data, a short head; a file nobody knows.
        for (offset, len) in [(100u64, 512usize), (512, 100), (0, 0)] {
            let mut w = Vec::new();
            write_disk(&mut w, 0, offset, &vec![1; len]).unwrap();
            assert!(
                matches!(read(&w), MigrationError::Malformed(_)),
                "{offset} {len}"
            );
        }
        for (offset, len) in [(100u64, 512u64), (512, 100), (0, 0)] {
            let mut w = Vec::new();
            write_disk_zeros(&mut w, 0, offset, len).unwrap();
            assert!(
                matches!(read(&w), MigrationError::Malformed(_)),
                "{offset} {len}"
            );
        }
        for kind in [Kind::Disk, Kind::DiskZeros, Kind::File] {
            let mut w = Vec::new();
            write_record(&mut w, kind, &[0; 5]).unwrap();
            assert!(matches!(read(&w), MigrationError::Malformed(_)), "{kind:?}");
        }
        let mut w = Vec::new();
        write_record(&mut w, Kind::File, &[9; 12]).unwrap();
        assert!(matches!(read(&w), MigrationError::Malformed(_)));
        let mut w = Vec::new();
        write_record(&mut w, Kind::Refuse, b"out of memory").unwrap();
        let mut buf = Vec::new();
        assert_eq!(
            read_record(&mut &w[..], &mut buf).unwrap(),
            Record::Refuse("out of memory".into())
        );
    }
}
