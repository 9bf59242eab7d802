//! The migration stream's framing: the hello both peers send first, and the records after it
//! (layout in the [`super`] module docs). Pure byte handling over `Read`/`Write`, no KVM, so
//! every rule a hostile or broken peer could break is unit-tested here.

use std::io::{ErrorKind, Read, Write};

use super::MigrationError;

/// First bytes of every hello.
pub const MAGIC: [u8; 8] = *b"FERROMIG";
/// Version of the stream this code writes and reads.
pub const VERSION: u32 = 1;
/// Guest page size; every page record carries whole pages of it.
pub const PAGE: u64 = 4096;
/// Bytes of one page entry in a [`Kind::Pages`] record: its address and its data.
pub const PAGE_ENTRY: usize = 8 + PAGE as usize;
/// Largest record payload accepted (the machine state of 32 vCPUs is well under this).
pub const MAX_RECORD: u32 = 64 << 20;
/// Pages a sender puts in one record.
pub const BATCH_PAGES: usize = 64;

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source: the VM's configuration and RAM layout (JSON).
    Config = 1,
    /// Source: `u32` count, then per page its guest address (`u64`) and 4096 bytes.
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
    /// [`Kind::Pages`], length already checked.
    Pages(Pages<'a>),
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
    /// [`Kind::Ack`].
    Ack,
    /// [`Kind::Refuse`].
    Refuse(String),
}

/// The entries of a [`Kind::Pages`] record.
#[derive(Debug, PartialEq, Eq)]
pub struct Pages<'a>(&'a [u8]);

impl<'a> Pages<'a> {
    /// Each page's guest address and its 4096 bytes.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &'a [u8])> + 'a {
        self.0.chunks_exact(PAGE_ENTRY).map(|e| {
            let (addr, data) = e.split_at(8);
            (u64_at(addr), data)
        })
    }

    /// How many pages.
    pub fn len(&self) -> usize {
        self.0.len() / PAGE_ENTRY
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

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
pub fn write_record(w: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), MigrationError> {
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

/// Writes a [`Kind::Verify`] record.
pub fn write_verify(w: &mut impl Write, hashes: &[u64]) -> Result<(), MigrationError> {
    let mut payload = Vec::with_capacity(4 + hashes.len() * 8);
    payload.extend_from_slice(&(hashes.len() as u32).to_le_bytes());
    for h in hashes {
        payload.extend_from_slice(&h.to_le_bytes());
    }
    write_record(w, Kind::Verify, &payload)
}

/// Collects pages into one [`Kind::Pages`] record.
pub struct PageBatch {
    buf: Vec<u8>,
}

impl Default for PageBatch {
    fn default() -> Self {
        let mut buf = Vec::with_capacity(4 + BATCH_PAGES * PAGE_ENTRY);
        buf.extend_from_slice(&0u32.to_le_bytes());
        Self { buf }
    }
}

impl PageBatch {
    /// Room for `page`'s 4096 bytes at `addr`, to be filled by the caller.
    pub fn push(&mut self, addr: u64) -> &mut [u8] {
        self.buf.extend_from_slice(&addr.to_le_bytes());
        let at = self.buf.len();
        self.buf.resize(at + PAGE as usize, 0);
        &mut self.buf[at..]
    }

    /// Drops the page pushed last (it turned out to be zero).
    pub fn pop(&mut self) {
        let len = self.buf.len().saturating_sub(PAGE_ENTRY).max(4);
        self.buf.truncate(len);
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        (self.buf.len() - 4) / PAGE_ENTRY
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it is full.
    pub fn is_full(&self) -> bool {
        self.len() >= BATCH_PAGES
    }

    /// Writes the record (if it holds any page) and empties the batch; returns the pages sent.
    pub fn flush(&mut self, w: &mut impl Write) -> Result<usize, MigrationError> {
        let n = self.len();
        if n == 0 {
            return Ok(0);
        }
        self.buf[..4].copy_from_slice(&(n as u32).to_le_bytes());
        write_record(w, Kind::Pages, &self.buf)?;
        self.buf.truncate(4);
        Ok(n)
    }
}

/// Reads one record into `buf` (reused between calls) and checks its framing: known kind,
/// length within [`MAX_RECORD`], payload that fits its kind, state checksum.
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
        Kind::Pages => Record::Pages(Pages(counted(PAGE_ENTRY)?)),
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
        Kind::End => empty(Record::End)?,
        Kind::Ack => empty(Record::Ack)?,
        Kind::Abort => Record::Abort(text()),
        Kind::Refuse => Record::Refuse(text()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> Vec<u8> {
        let mut w = Vec::new();
        write_hello(&mut w).unwrap();
        write_record(&mut w, Kind::Config, br#"{"a":1}"#).unwrap();
        write_record(&mut w, Kind::Round, &3u32.to_le_bytes()).unwrap();
        let mut b = PageBatch::default();
        b.push(0x1000).fill(0xab);
        b.push(0x5000)[4095] = 7;
        b.push(0x9000);
        b.pop();
        assert_eq!(b.len(), 2);
        assert_eq!(b.flush(&mut w).unwrap(), 2);
        assert_eq!(b.flush(&mut w).unwrap(), 0, "an empty batch writes nothing");
        write_zeros(&mut w, &[(0x2000, 3), (0x10_0000, 1)]).unwrap();
        write_verify(&mut w, &[1, u64::MAX]).unwrap();
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
        match read_record(&mut r, &mut buf).unwrap() {
            Record::Pages(p) => {
                let v: Vec<_> = p.iter().collect();
                assert_eq!(v.len(), 2);
                assert_eq!(v[0].0, 0x1000);
                assert!(v[0].1.iter().all(|&b| b == 0xab));
                assert_eq!((v[1].0, v[1].1[4095], v[1].1[0]), (0x5000, 7, 0));
            }
            other => panic!("{other:?}"),
        }
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
        let mut h = Vec::new();
        write_hello(&mut h).unwrap();
        h[8] = 2;
        let e = read_hello(&mut &h[..]).unwrap_err();
        assert!(matches!(e, MigrationError::Version(2)), "{e}");
        assert!(e.to_string().contains("version 2"), "{e}");
        assert!(e.to_string().contains(&format!("speaks {VERSION}")), "{e}");
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
        // A page count that does not match the length.
        let mut w = Vec::new();
        let mut p = 5u32.to_le_bytes().to_vec();
        p.extend_from_slice(&[0; PAGE_ENTRY]);
        write_record(&mut w, Kind::Pages, &p).unwrap();
        assert!(matches!(read(&w), MigrationError::Malformed(_)));
        // A state whose checksum is wrong.
        let mut w = Vec::new();
        write_state(&mut w, b"state").unwrap();
        let last = w.len() - 1;
        w[last] ^= 1;
        assert!(matches!(read(&w), MigrationError::Checksum));
        let mut w = Vec::new();
        write_record(&mut w, Kind::End, b"x").unwrap();
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
