//! One virtio-blk request (virtio 1.2 section 5.2.6): parsing a walked chain into a
//! [`Request`], and executing it against a [`BlockBackend`].
//!
//! The chain is read as two byte streams, as the specification asks (a device must not assume
//! how the driver split a request into descriptors): the device-readable bytes are the 16-byte
//! header followed by the data the device reads (writes, discard and write-zeroes ranges); the
//! device-writable bytes are the data the device writes (reads, GET_ID) followed by the status
//! byte, which is the last writable byte. [`walk_chain`](crate::walk_chain) has already
//! checked that every readable byte comes before every writable one and that every buffer is
//! guest memory.
//!
//! What is refused, with the status byte: a header shorter than 16 bytes, data in the wrong
//! direction, more segments than `seg_max` announces, a length that is not whole sectors or is
//! over [`MAX_REQUEST_BYTES`], sectors past the capacity, writes to a read-only disk, discard
//! or write-zeroes ranges that break the announced limits (all `VIRTIO_BLK_S_IOERR`); unknown
//! request types and unnegotiated commands (`VIRTIO_BLK_S_UNSUPP`). A chain without a
//! writable last byte has nowhere to put a status: it is completed with a used length of 0.

use ferro_disk::{BlockBackend, IoVec};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::chain::Segment;
use crate::GuestMemory;

/// Bytes per sector (the unit of `sector` and `capacity`, whatever `blk_size` says).
pub const SECTOR: u64 = 512;
/// Bytes of the request header (type, reserved, sector).
pub const HEADER: u32 = 16;
/// Bytes of a GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Data segments a request may carry (announced as `seg_max`).
pub const SEG_MAX: u32 = 126;
/// Largest data segment the driver should build (announced as `size_max`).
pub const SIZE_MAX: u32 = 256 * 1024;
/// Largest data transfer of one request: `seg_max` segments of `size_max`.
pub const MAX_REQUEST_BYTES: u32 = SEG_MAX * SIZE_MAX;
/// Largest discard or write-zeroes range in sectors (1 GiB).
pub const MAX_RANGE_SECTORS: u32 = 1 << 21;
/// Most ranges in one discard or write-zeroes request.
pub const MAX_RANGES: u32 = 32;
/// Bytes of one discard / write-zeroes range (sector, num_sectors, flags).
const RANGE_BYTES: u32 = 16;
/// The `unmap` flag of a range.
const RANGE_UNMAP: u32 = 1;

/// Request types.
pub mod kind {
    /// Read sectors.
    pub const IN: u32 = 0;
    /// Write sectors.
    pub const OUT: u32 = 1;
    /// Make completed writes durable.
    pub const FLUSH: u32 = 4;
    /// The device id string.
    pub const GET_ID: u32 = 8;
    /// Discard ranges.
    pub const DISCARD: u32 = 11;
    /// Zero ranges.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// The request failed or is malformed.
    pub const IOERR: u8 = 1;
    /// The request type is not supported.
    pub const UNSUPP: u8 = 2;
}

/// What the device is and what was negotiated: the facts parsing checks against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in sectors.
    pub capacity: u64,
    /// Writes, discards and write-zeroes are refused.
    pub readonly: bool,
    /// VIRTIO_BLK_F_DISCARD negotiated.
    pub discard: bool,
    /// VIRTIO_BLK_F_WRITE_ZEROES negotiated.
    pub write_zeroes: bool,
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at sector `sector` into the writable data.
    Read,
    /// Write the readable data at `sector`.
    Write,
    /// Flush.
    Flush,
    /// Write the id into the writable data.
    GetId,
    /// Discard the ranges in the readable data.
    Discard,
    /// Zero the ranges in the readable data.
    WriteZeroes,
}

/// A request that passed every check parsing can make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// First sector (read / write).
    pub sector: u64,
    /// Bytes of data: writable bytes before the status for Read / GetId, readable bytes
    /// after the header for Write / Discard / WriteZeroes.
    pub len: u32,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// A request refused while parsing: the status to report (if there is a status byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    /// Where the status byte goes; `None` when the chain has no writable last byte.
    pub at: Option<GuestAddress>,
    /// The status.
    pub status: u8,
}

/// Copies `buf.len()` bytes of the stream formed by `segs`, from stream offset `skip`, into
/// `buf`. False when the stream is shorter or memory refuses.
pub(crate) fn gather<'a>(
    mem: &GuestMemory,
    segs: impl Iterator<Item = &'a Segment>,
    mut skip: u64,
    buf: &mut [u8],
) -> bool {
    let mut done = 0usize;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(buf.len() - done);
        if mem
            .read_slice(&mut buf[done..done + n], GuestAddress(s.addr.0 + skip))
            .is_err()
        {
            return false;
        }
        done += n;
        skip = 0;
    }
    done == buf.len()
}

/// Copies `buf` into the stream formed by `segs` at stream offset `skip`. False when the
/// stream is shorter or memory refuses.
pub(crate) fn scatter<'a>(
    mem: &GuestMemory,
    segs: impl Iterator<Item = &'a Segment>,
    mut skip: u64,
    buf: &[u8],
) -> bool {
    let mut done = 0usize;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(buf.len() - done);
        if mem
            .write_slice(&buf[done..done + n], GuestAddress(s.addr.0 + skip))
            .is_err()
        {
            return false;
        }
        done += n;
        skip = 0;
    }
    done == buf.len()
}

fn readable(segs: &[Segment]) -> impl Iterator<Item = &Segment> {
    segs.iter().filter(|s| !s.write)
}

fn writable(segs: &[Segment]) -> impl Iterator<Item = &Segment> {
    segs.iter().filter(|s| s.write)
}

/// Whether `len` bytes from `sector` lie inside a disk of `capacity` sectors.
fn inside(sector: u64, len: u64, capacity: u64) -> bool {
    let sectors = len.div_ceil(SECTOR);
    sector
        .checked_add(sectors)
        .is_some_and(|end| end <= capacity)
}

/// Parses the request carried by `segs` (a chain [`crate::walk_chain`] accepted).
pub fn parse(mem: &GuestMemory, segs: &[Segment], lim: &Limits) -> Result<Request, Rejected> {
    // The status byte is the last byte of the last buffer, which must be writable.
    let at = match segs.last() {
        Some(s) if s.write && s.len > 0 => GuestAddress(s.addr.0 + u64::from(s.len) - 1),
        _ => {
            return Err(Rejected {
                at: None,
                status: status::IOERR,
            })
        }
    };
    let fail = |status| {
        Err(Rejected {
            at: Some(at),
            status,
        })
    };
    // walk_chain keeps the total under 4 GiB, so these sums fit.
    let r: u64 = readable(segs).map(|s| u64::from(s.len)).sum();
    let w: u64 = writable(segs).map(|s| u64::from(s.len)).sum();
    if r < u64::from(HEADER) {
        return fail(status::IOERR);
    }
    if segs.len() > SEG_MAX as usize + 2 {
        return fail(status::IOERR);
    }
    let mut hdr = [0u8; HEADER as usize];
    if !gather(mem, readable(segs), 0, &mut hdr) {
        return fail(status::IOERR);
    }
    let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let mut s8 = [0u8; 8];
    s8.copy_from_slice(&hdr[8..16]);
    let sector = u64::from_le_bytes(s8);
    let data_out = r - u64::from(HEADER);
    let data_in = w - 1;
    let (op, len) = match ty {
        kind::IN | kind::OUT => {
            let (op, len, wrong) = if ty == kind::IN {
                (Op::Read, data_in, data_out)
            } else {
                (Op::Write, data_out, data_in)
            };
            if wrong != 0
                || !len.is_multiple_of(SECTOR)
                || len > u64::from(MAX_REQUEST_BYTES)
                || !inside(sector, len, lim.capacity)
                || (op == Op::Write && lim.readonly)
            {
                return fail(status::IOERR);
            }
            (op, len)
        }
        kind::FLUSH => {
            if data_in != 0 || data_out != 0 {
                return fail(status::IOERR);
            }
            (Op::Flush, 0)
        }
        kind::GET_ID => {
            if data_out != 0 || data_in == 0 {
                return fail(status::IOERR);
            }
            (Op::GetId, data_in.min(ID_BYTES as u64))
        }
        kind::DISCARD | kind::WRITE_ZEROES => {
            let (op, negotiated) = if ty == kind::DISCARD {
                (Op::Discard, lim.discard)
            } else {
                (Op::WriteZeroes, lim.write_zeroes)
            };
            if !negotiated {
                return fail(status::UNSUPP);
            }
            if lim.readonly
                || data_in != 0
                || data_out == 0
                || !data_out.is_multiple_of(u64::from(RANGE_BYTES))
                || data_out / u64::from(RANGE_BYTES) > u64::from(MAX_RANGES)
            {
                return fail(status::IOERR);
            }
            (op, data_out)
        }
        _ => return fail(status::UNSUPP),
    };
    Ok(Request {
        op,
        sector,
        len: len as u32,
        status: at,
    })
}

/// Most bytes one run of merged requests may move with one disk call.
pub const CHUNK: usize = 512 * 1024;

/// Appends to `out` the host memory of `len` bytes of the stream formed by `segs`, from stream
/// offset `skip`: the iovecs a disk call reads into or writes from, without a copy. False when
/// the stream is shorter or memory refuses ([`crate::walk_chain`] already checked every
/// segment is guest memory, so this means an I/O error).
#[allow(unsafe_code)]
pub(crate) fn host_iovecs<'a>(
    mem: &GuestMemory,
    segs: impl Iterator<Item = &'a Segment>,
    mut skip: u64,
    len: u64,
    out: &mut Vec<IoVec>,
) -> bool {
    let mut left = len;
    for s in segs {
        if left == 0 {
            break;
        }
        let l = u64::from(s.len);
        if skip >= l {
            skip -= l;
            continue;
        }
        let n = (l - skip).min(left);
        // A buffer may span two regions of guest memory: one iovec per piece.
        for piece in GuestMemoryBackend::get_slices(mem, GuestAddress(s.addr.0 + skip), n as usize)
        {
            let Ok(v) = piece else {
                return false;
            };
            // SAFETY: `v` lies inside one region of `mem`, an mmap that stays mapped (read and
            // write) for as long as `mem` exists: guest RAM is never unmapped while the VM
            // runs, and the caller holds `mem` for the whole disk call that uses these iovecs.
            // The guest may read or write the same memory meanwhile; that only makes the bytes
            // racy (its own doing), since the disk passes iovecs to the kernel or copies with
            // raw pointers, and nothing here holds a reference to guest memory during the call.
            out.push(unsafe { IoVec::new(v.ptr_guard_mut().as_ptr(), v.len()) });
        }
        left -= n;
        skip = 0;
    }
    left == 0
}

/// Marks `len` bytes of the stream formed by `segs` as written in guest memory's dirty
/// bitmap, once a disk call has filled them: it wrote through raw pointers (or the kernel did),
/// which vm-memory's own tracking does not see, and a live migration resends what is marked.
fn mark_written<'a>(mem: &GuestMemory, segs: impl Iterator<Item = &'a Segment>, len: u64) {
    let mut left = len;
    for s in segs {
        if left == 0 {
            break;
        }
        let n = u64::from(s.len).min(left);
        for v in GuestMemoryBackend::get_slices(mem, s.addr, n as usize).flatten() {
            vm_memory::bitmap::Bitmap::mark_dirty(v.bitmap(), 0, v.len());
        }
        left -= n;
    }
}

/// What executing a request produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The status byte.
    pub status: u8,
    /// Bytes written into the chain's writable buffers (the used length).
    pub written: u32,
}

/// Runs `req` (parsed from `segs`) against `disk`; `id` answers GET_ID; `writethrough` flushes
/// after every write (the driver did not negotiate FLUSH). Writes the status byte.
pub fn execute(
    mem: &GuestMemory,
    segs: &[Segment],
    req: &Request,
    disk: &dyn BlockBackend,
    id: &[u8; ID_BYTES],
    writethrough: bool,
    iov: &mut Vec<IoVec>,
) -> Outcome {
    let status = run(mem, segs, req, disk, id, writethrough, iov);
    if req.op == Op::Read {
        // Even a failed read may have written part of the buffers.
        mark_written(mem, writable(segs), u64::from(req.len));
    }
    let data = match req.op {
        Op::Read | Op::GetId if status == status::OK => req.len,
        _ => 0,
    };
    // The status address was checked by walk_chain; a failure here is not reportable.
    let _ = mem.write_obj(status, req.status);
    Outcome {
        status,
        written: data + 1,
    }
}

/// Whether `parts` can run as one disk call: all reads or all writes, each starting at the
/// sector where the one before ends, together at most [`CHUNK`] bytes.
pub fn runs_together(parts: &[(&[Segment], &Request)]) -> bool {
    let Some((_, first)) = parts.first() else {
        return false;
    };
    if !matches!(first.op, Op::Read | Op::Write) {
        return false;
    }
    let mut next = first.sector;
    let mut total = 0u64;
    for (_, r) in parts {
        if r.op != first.op || r.sector != next {
            return false;
        }
        total += u64::from(r.len);
        next = r.sector.saturating_add(u64::from(r.len) / SECTOR);
    }
    total <= CHUNK as u64
}

/// Fills `iov` with the guest memory of a run of requests (see [`runs_together`]), in
/// order: the data of every part as one stream. `Some((op, disk offset, bytes))`, or `None`
/// when the parts cannot run as one vectored call (not together, or memory refuses).
pub fn run_iovecs(
    mem: &GuestMemory,
    parts: &[(&[Segment], &Request)],
    iov: &mut Vec<IoVec>,
) -> Option<(Op, u64, u64)> {
    if !runs_together(parts) {
        return None;
    }
    let (op, base) = (parts[0].1.op, parts[0].1.sector.saturating_mul(SECTOR));
    iov.clear();
    let mut total = 0u64;
    for (segs, req) in parts {
        let len = u64::from(req.len);
        let mapped = if op == Op::Read {
            host_iovecs(mem, writable(segs), 0, len, iov)
        } else {
            host_iovecs(mem, readable(segs), u64::from(HEADER), len, iov)
        };
        if !mapped {
            return None;
        }
        total += len;
    }
    Some((op, base, total))
}

/// Writes the status byte of every part of a run of `op` that succeeded or not (`ok`) and
/// pushes each part's outcome, in order, to `out`.
pub fn finish_run(
    mem: &GuestMemory,
    parts: &[(&[Segment], &Request)],
    op: Op,
    ok: bool,
    out: &mut Vec<Outcome>,
) {
    for (segs, req) in parts {
        if op == Op::Read {
            mark_written(mem, writable(segs), u64::from(req.len));
        }
        let status = if ok { status::OK } else { status::IOERR };
        // The status address was checked by walk_chain; a failure here is not reportable.
        let _ = mem.write_obj(status, req.status);
        out.push(Outcome {
            status,
            written: if ok && op == Op::Read { req.len + 1 } else { 1 },
        });
    }
}

/// Runs contiguous requests of one kind (see [`runs_together`]) with one vectored disk call
/// straight into (or from) guest memory and writes every status byte; pushes each request's
/// outcome, in order, to `out`. Parts that cannot run together, or whose buffers cannot all
/// be mapped, run one by one through [`execute`].
pub fn execute_run(
    mem: &GuestMemory,
    parts: &[(&[Segment], &Request)],
    disk: &dyn BlockBackend,
    id: &[u8; ID_BYTES],
    writethrough: bool,
    iov: &mut Vec<IoVec>,
    out: &mut Vec<Outcome>,
) {
    let Some((op, base, _)) = run_iovecs(mem, parts, iov) else {
        for (segs, req) in parts {
            out.push(execute(mem, segs, req, disk, id, writethrough, iov));
        }
        return;
    };
    let ok = if op == Op::Read {
        disk.read_vectored(iov, base).is_ok()
    } else {
        disk.write_vectored(iov, base).is_ok() && (!writethrough || disk.flush().is_ok())
    };
    finish_run(mem, parts, op, ok, out);
}

/// Answers GET_ID (no disk I/O: the event loop does it at once).
pub fn answer_id(
    mem: &GuestMemory,
    segs: &[Segment],
    req: &Request,
    id: &[u8; ID_BYTES],
) -> Outcome {
    let ok = scatter(
        mem,
        writable(segs),
        0,
        &id[..(req.len as usize).min(ID_BYTES)],
    );
    let status = if ok { status::OK } else { status::IOERR };
    let _ = mem.write_obj(status, req.status);
    Outcome {
        status,
        written: if ok { req.len + 1 } else { 1 },
    }
}

fn run(
    mem: &GuestMemory,
    segs: &[Segment],
    req: &Request,
    disk: &dyn BlockBackend,
    id: &[u8; ID_BYTES],
    writethrough: bool,
    iov: &mut Vec<IoVec>,
) -> u8 {
    let base = req.sector.saturating_mul(SECTOR);
    let len = u64::from(req.len);
    match req.op {
        Op::Read => {
            iov.clear();
            if !host_iovecs(mem, writable(segs), 0, len, iov)
                || disk.read_vectored(iov, base).is_err()
            {
                return status::IOERR;
            }
            status::OK
        }
        Op::Write => {
            iov.clear();
            if !host_iovecs(mem, readable(segs), u64::from(HEADER), len, iov)
                || disk.write_vectored(iov, base).is_err()
            {
                return status::IOERR;
            }
            if writethrough && disk.flush().is_err() {
                return status::IOERR;
            }
            status::OK
        }
        Op::Flush => match disk.flush() {
            Ok(()) => status::OK,
            Err(_) => status::IOERR,
        },
        Op::GetId => {
            if scatter(
                mem,
                writable(segs),
                0,
                &id[..(req.len as usize).min(ID_BYTES)],
            ) {
                status::OK
            } else {
                status::IOERR
            }
        }
        Op::Discard | Op::WriteZeroes => ranges(mem, segs, req, disk),
    }
}

/// Checks every range of a discard / write-zeroes request, then applies them.
fn ranges(mem: &GuestMemory, segs: &[Segment], req: &Request, disk: &dyn BlockBackend) -> u8 {
    let n = (req.len / RANGE_BYTES) as usize;
    let mut all = [(0u64, 0u32, 0u32); MAX_RANGES as usize];
    for (i, slot) in all.iter_mut().enumerate().take(n) {
        let mut b = [0u8; RANGE_BYTES as usize];
        let at = u64::from(HEADER) + (i as u64) * u64::from(RANGE_BYTES);
        if !gather(mem, readable(segs), at, &mut b) {
            return status::IOERR;
        }
        let mut s8 = [0u8; 8];
        s8.copy_from_slice(&b[0..8]);
        let sector = u64::from_le_bytes(s8);
        let num = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        let flags = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        let allowed = if req.op == Op::WriteZeroes {
            RANGE_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return status::UNSUPP;
        }
        if num > MAX_RANGE_SECTORS || !inside(sector, u64::from(num) * SECTOR, disk_sectors(disk)) {
            return status::IOERR;
        }
        *slot = (sector, num, flags);
    }
    for &(sector, num, flags) in &all[..n] {
        let (off, len) = (sector * SECTOR, u64::from(num) * SECTOR);
        let res = if req.op == Op::Discard {
            disk.discard(off, len)
        } else {
            disk.write_zeroes(off, len, flags & RANGE_UNMAP != 0)
        };
        if res.is_err() {
            return status::IOERR;
        }
    }
    status::OK
}

fn disk_sectors(disk: &dyn BlockBackend) -> u64 {
    disk.size() / SECTOR
}
