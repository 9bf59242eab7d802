//! The source side: runs on its own thread (the main thread keeps serving the console and the
//! control socket) and reports its progress through a shared [`MigrationStatus`].

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferro_api::control::{MigrationPhase, MigrationStatus};
use ferro_api::VmConfig;
use ferro_hypervisor::{Vcpu, Vm};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use super::storage::{self, DiskCopier};
use super::wire::{self, Kind, Record, MAX_RUNS, PAGE, RUN_ENTRY};
use super::{tcp_address, MigrationError, Setup};
use crate::machine::{ExitLatch, LegacyHandles};
use crate::memory::{self, GuestMemory};
use crate::pci::SharedVirtio;
use crate::snapshot::MachineState;
use crate::vcpu::VcpuControl;
use ferro_disk::tracked::Tracked;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one write may block (a destination that stopped reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the destination may take to build the VM and answer.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long pausing the vCPUs may take.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything the migration thread needs of the running VM.
pub struct Source {
    /// The VM's configuration (sent as is).
    pub config: VmConfig,
    /// The KVM VM.
    pub vm: Arc<Vm>,
    /// Guest RAM.
    pub memory: GuestMemory,
    /// A handle on each vCPU, in id order, for reading its state once paused.
    pub vcpus: Vec<Vcpu>,
    /// KVM_GET_MSR_INDEX_LIST.
    pub msrs: Vec<u32>,
    /// The legacy devices.
    pub legacy: LegacyHandles,
    /// The virtio devices, in slot order.
    pub virtio: Vec<SharedVirtio>,
    /// Pauses and resumes the vCPUs.
    pub control: Arc<VcpuControl>,
    /// Set when the VM ends; the migration then gives up.
    pub latch: Arc<ExitLatch>,
    /// The opened disks, in configuration order (copied by a storage migration).
    pub disks: Vec<Arc<Tracked>>,
}

/// What the control request asked.
#[derive(Debug, Clone)]
pub struct Request {
    /// `HOST:PORT` of the destination.
    pub to: String,
    /// The pause to aim for.
    pub downtime_ms: u64,
    /// Rounds after which to stop iterating.
    pub max_rounds: u32,
    /// Copy the disks, kernel and initrd too ([`super::storage`]).
    pub copy_storage: bool,
    /// The destination's migration token, sent first.
    pub token: Option<String>,
}

/// The stream to the destination. Small records collect in `small` and go out at a flush or
/// in front of the next page record, in the same `writev`; page data never passes through it.
struct Out {
    stream: TcpStream,
    small: Vec<u8>,
    /// Bytes handed to the socket.
    bytes: u64,
    /// Whether the destination's hello has been read: from then on it speaks only to answer.
    watch: bool,
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.small.extend_from_slice(buf);
        if self.small.len() >= 1 << 20 {
            self.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // The destination only speaks when asked, or to refuse the VM: anything waiting to be
        // read now is a refusal, which ends the stream here (see `Sender::abort`).
        let mut p = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd for a socket this process owns, no waiting.
        if self.watch && unsafe { libc::poll(&mut p, 1, 0) } > 0 && p.revents != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the destination stopped the stream",
            ));
        }
        let small = std::mem::take(&mut self.small);
        let r = self.writev(&mut [iovec(small.as_ptr(), small.len())]);
        self.small = small;
        self.small.clear();
        r
    }
}

fn iovec(base: *const u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: base as *mut libc::c_void,
        iov_len: len,
    }
}

impl Out {
    /// Writes all of `parts` (at most `IOV_MAX`), however many calls that takes.
    fn writev(&mut self, parts: &mut [libc::iovec]) -> std::io::Result<()> {
        let mut rest = parts;
        loop {
            while rest.first().is_some_and(|v| v.iov_len == 0) {
                rest = &mut rest[1..];
            }
            if rest.is_empty() {
                return Ok(());
            }
            // SAFETY: every iovec in `rest` describes memory that stays valid for this call:
            // `small`, a record head owned by the caller, or pages of guest
            // RAM inside its mapping, which lives as long as the VM (the process). The kernel
            // only reads it; a vCPU writing a page meanwhile changes the bytes sent, never
            // their bounds (the dirty log sends such a page again).
            let n = unsafe {
                libc::writev(
                    self.stream.as_raw_fd(),
                    rest.as_ptr(),
                    rest.len() as libc::c_int,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    // SO_SNDTIMEO ran out: the destination stopped reading.
                    std::io::ErrorKind::WouldBlock => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the destination stopped reading",
                        ))
                    }
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            let mut n = n as usize;
            self.bytes += n as u64;
            while n > 0 {
                let first = &mut rest[0];
                if n >= first.iov_len {
                    n -= first.iov_len;
                    rest = &mut rest[1..];
                } else {
                    first.iov_base = first.iov_base.cast::<u8>().wrapping_add(n).cast();
                    first.iov_len -= n;
                    n = 0;
                }
            }
        }
    }
}

/// Non-zero pages gathered for one [`Kind::Pages`] record: runs of contiguous pages, each
/// sent straight from guest RAM.
#[derive(Default)]
struct Batch {
    runs: Vec<(u64, u32)>,
    /// Per run: its first byte in guest RAM.
    from: Vec<usize>,
    pages: usize,
    head: Vec<u8>,
    iov: Vec<libc::iovec>,
}

/// Pages per record (1 MiB: few calls, and `status` still counts the bytes sent every
/// megabyte).
const BATCH_PAGES: usize = 256;

impl Batch {
    /// Adds the page at guest `addr`, whose bytes are at `host`.
    fn push(&mut self, addr: u64, host: usize) {
        self.pages += 1;
        match (self.runs.last_mut(), self.from.last()) {
            (Some((a, n)), Some(&f))
                if *a + u64::from(*n) * PAGE == addr && f + *n as usize * PAGE as usize == host =>
            {
                *n += 1
            }
            _ => {
                self.runs.push((addr, 1));
                self.from.push(host);
            }
        }
    }

    fn is_full(&self) -> bool {
        self.pages >= BATCH_PAGES || self.runs.len() >= MAX_RUNS
    }

    /// Sends the record (with the small records `out` holds in front of it) and empties the
    /// batch; returns the pages sent.
    fn flush(&mut self, out: &mut Out) -> Result<usize, MigrationError> {
        if self.runs.is_empty() {
            return Ok(0);
        }
        self.head.clear();
        self.head.append(&mut out.small);
        wire::pages_head(&mut self.head, &self.runs)?;
        self.iov.clear();
        self.iov.push(iovec(self.head.as_ptr(), self.head.len()));
        for (&(_, n), &from) in self.runs.iter().zip(&self.from) {
            self.iov
                .push(iovec(from as *const u8, n as usize * PAGE as usize));
        }
        out.writev(&mut self.iov).map_err(MigrationError::Io)?;
        let n = self.pages;
        self.runs.clear();
        self.from.clear();
        self.pages = 0;
        Ok(n)
    }
}

/// The bitmap of pages host threads wrote in region `r` (vm-memory's, one bit per 4 KiB).
fn host_bitmap(r: &crate::memory::GuestRegion) -> &AtomicBitmap {
    let mapping: &MmapRegion<AtomicBitmap> = r;
    mapping.bitmap()
}

/// Dirty pages: one bitmap per RAM region, bit = page (KVM's layout).
type Bitmaps = Vec<Vec<u64>>;

fn count(b: &Bitmaps) -> u64 {
    b.iter().flatten().map(|w| u64::from(w.count_ones())).sum()
}

fn or_into(into: &mut Bitmaps, from: &Bitmaps) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= y;
        }
    }
}

/// Whether the page at `page` (in guest RAM, which a vCPU may be writing) reads as all zero;
/// stops at the first non-zero 64 bytes, so a page with data costs a cache line or two.
///
/// # Safety
/// `page` must point at 4096 readable bytes, aligned to 8.
unsafe fn page_is_zero(page: *const u64) -> bool {
    for block in 0..PAGE as usize / 64 {
        let mut acc = 0u64;
        for w in 0..8 {
            // SAFETY: within the page the caller vouches for; volatile, since the guest may
            // write it meanwhile (a torn answer only decides whether it is sent now or later:
            // the dirty log names it again).
            acc |= unsafe { page.add(block * 8 + w).read_volatile() };
        }
        if acc != 0 {
            return false;
        }
    }
    true
}

/// The stream and what was sent on it.
struct Sender<'a> {
    src: &'a Source,
    out: Out,
    batch: Batch,
    /// Per region: guest address, first byte in this process, length.
    regions: Vec<(u64, usize, u64)>,
    zeros: Vec<(u64, u64)>,
    pages: u64,
    progress: &'a Mutex<MigrationStatus>,
    started: Instant,
    /// Storage migration: the disks' copier.
    disks: Option<DiskCopier>,
    disk_bytes: u64,
    /// The destination's answers.
    reader: TcpStream,
}

impl Sender<'_> {
    fn bytes(&self) -> u64 {
        self.out.bytes + self.out.small.len() as u64
    }

    fn status(&self) -> MutexGuard<'_, MigrationStatus> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn report(&self) {
        let (bytes, pages) = (self.bytes(), self.pages);
        let disk_bytes = self.disk_bytes;
        let mut s = self.status();
        s.bytes = bytes;
        s.pages = pages;
        s.disk_bytes = disk_bytes;
        s.total_ms = self.started.elapsed().as_millis() as u64;
    }

    /// Storage migration: the disk blocks written since they were last sent.
    fn disk_dirty(&mut self) -> Result<(), MigrationError> {
        if let Some(c) = self.disks.as_mut() {
            self.disk_bytes += c.dirty(&mut self.out)?;
            self.report();
        }
        Ok(())
    }

    /// Sends page `page` of region `region`; in round 0 a zero page needs no record (the
    /// destination's memory starts zero).
    fn page(&mut self, region: usize, page: usize, round0: bool) -> Result<(), MigrationError> {
        let Some(&(start, host, len)) = self.regions.get(region) else {
            return Ok(());
        };
        let at = page as u64 * PAGE;
        if at >= len {
            return Ok(());
        }
        let addr = start + at;
        let host = host + at as usize;
        // SAFETY: `host` is page `page` of region `region`'s mapping (checked against its
        // length above), page-aligned; the mapping lives as long as the VM.
        let zero = unsafe { page_is_zero(host as *const u64) };
        if !zero {
            self.batch.push(addr, host);
        }
        if zero {
            if !round0 {
                match self.zeros.last_mut() {
                    Some((start, n)) if *start + *n * PAGE == addr => *n += 1,
                    _ => self.zeros.push((addr, 1)),
                }
                if self.zeros.len() >= 4096 {
                    self.flush_zeros()?;
                }
            }
        } else if self.batch.is_full() {
            self.pages += self.batch.flush(&mut self.out)? as u64;
            self.report();
        }
        Ok(())
    }

    fn flush_zeros(&mut self) -> Result<(), MigrationError> {
        if !self.zeros.is_empty() {
            wire::write_zeros(&mut self.out, &self.zeros)?;
            self.zeros.clear();
        }
        Ok(())
    }

    /// Sends what is batched and pushes it onto the wire.
    fn flush(&mut self) -> Result<(), MigrationError> {
        self.pages += self.batch.flush(&mut self.out)? as u64;
        self.flush_zeros()?;
        self.out.flush().map_err(MigrationError::Io)?;
        self.report();
        Ok(())
    }

    fn round(&mut self, n: u32) -> Result<(), MigrationError> {
        wire::write_record(&mut self.out, Kind::Round, &n.to_le_bytes())
    }

    /// Round 0: every page that may hold data (anonymous pages the host never populated are
    /// zero; a VM restored from a snapshot has file-backed memory, all of which is read).
    fn everything(&mut self) -> Result<(), MigrationError> {
        let regions: Vec<(Option<Vec<bool>>, u64)> = self
            .src
            .memory
            .iter()
            .map(|r| (crate::memfile::populated(r), r.len() / PAGE))
            .collect();
        for (i, (touched, pages)) in regions.into_iter().enumerate() {
            for p in 0..pages as usize {
                if touched.as_ref().is_some_and(|t| t.get(p) == Some(&false)) {
                    continue;
                }
                if p % 4096 == 0 && self.src.latch.is_set() {
                    return Err(MigrationError::Ended);
                }
                self.page(i, p, true)?;
            }
        }
        self.flush()
    }

    /// Sends every page set in `dirty`.
    fn dirty(&mut self, dirty: &Bitmaps) -> Result<(), MigrationError> {
        for (region, words) in dirty.iter().enumerate() {
            for (w, &word) in words.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let page = w * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    self.page(region, page, false)?;
                }
            }
            if self.src.latch.is_set() {
                return Err(MigrationError::Ended);
            }
        }
        self.flush()
    }

    /// Adds to `dirty` the pages host threads wrote since the last call, which KVM's log does
    /// not see: the virtio devices' writes through vm-memory (its bitmap marks every one) and
    /// a disk's reads straight into guest RAM and a balloon's discards (marked by the block
    /// and balloon devices once done). Returns how many were not in `dirty` already.
    fn device_writes(&self, dirty: &mut Bitmaps) -> u64 {
        let mut found = 0;
        for (r, bits) in self.src.memory.iter().zip(dirty.iter_mut()) {
            for (x, y) in bits.iter_mut().zip(host_bitmap(r).get_and_reset()) {
                found += u64::from((y & !*x).count_ones());
                *x |= y;
            }
        }
        found
    }
}

impl Sender<'_> {
    /// Pre-copy: round 0 sends everything, each later round what the guest dirtied during the
    /// one before, until what is left fits the downtime at the bandwidth measured so far (or
    /// the rounds run out). Returns the rounds sent and the pages dirty since the last one.
    fn precopy(&mut self, req: &Request) -> Result<(u32, Bitmaps), MigrationError> {
        let (vm, mem) = (&self.src.vm, &self.src.memory);
        let mut sending = Duration::ZERO;
        let mut round = 0u32;
        let t = Instant::now();
        self.round(0)?;
        if let Some(c) = self.disks.as_mut() {
            // Each disk whole, while its write log collects what the guest changes meanwhile.
            self.disk_bytes += c.everything(&mut self.out)?;
            self.report();
        }
        self.everything()?;
        sending += t.elapsed();
        let mut pending = memory::dirty_log(vm, mem)?;
        self.device_writes(&mut pending);
        loop {
            round += 1;
            let bw = (self.bytes() as f64 / sending.as_secs_f64().max(1e-6)).max(1.0);
            let dirty = count(&pending);
            let disk = self.disks.as_ref().map_or(0, DiskCopier::dirty_bytes);
            let est_ms =
                (dirty as f64 * (PAGE as usize + RUN_ENTRY) as f64 + disk as f64) / bw * 1000.0;
            {
                let mut st = self.status();
                st.rounds = round;
                st.remaining_dirty_pages = dirty;
                st.remaining_dirty_disk_bytes = disk;
                st.bandwidth_bps = bw as u64;
            }
            if est_ms <= req.downtime_ms as f64 || round >= req.max_rounds {
                return Ok((round, pending));
            }
            let t = Instant::now();
            self.round(round)?;
            self.disk_dirty()?;
            self.dirty(&pending)?;
            sending += t.elapsed();
            pending = memory::dirty_log(vm, mem)?;
            self.device_writes(&mut pending);
        }
    }

    /// Tells the destination why the migration ends here (best effort: it may be gone), so
    /// it exits with this reason; returns `e`.
    fn abort(&mut self, e: MigrationError) -> MigrationError {
        // A destination that refused the VM said why before it hung up: that reason, rather
        // than the broken pipe it left, is the error.
        if matches!(e, MigrationError::Io(_) | MigrationError::Closed) {
            if let Some(why) = refusal(&mut self.reader) {
                return MigrationError::Refused(why);
            }
        }
        let _ = wire::write_record(&mut self.out, Kind::Abort, e.to_string().as_bytes());
        let _ = self.out.flush();
        e
    }
}

/// Where the downtime goes, for the log line.
struct Marks {
    last: Instant,
    text: String,
}

impl Marks {
    fn new(start: Instant) -> Self {
        Self {
            last: start,
            text: String::new(),
        }
    }

    fn mark(&mut self, what: &str) {
        let now = Instant::now();
        let sep = if self.text.is_empty() { "" } else { ", " };
        let ms = (now - self.last).as_secs_f64() * 1000.0;
        self.text.push_str(&format!("{sep}{what} {ms:.1} ms"));
        self.last = now;
    }
}

/// Turns the dirty log off again unless disarmed.
struct LogGuard<'a> {
    src: &'a Source,
    armed: bool,
}

impl Drop for LogGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = memory::set_dirty_logging(&self.src.vm, &self.src.memory, false) {
                eprintln!("ferro-vmm: migration: turning the dirty log off: {e}");
            }
        }
    }
}

/// The reason of a [`Kind::Refuse`] record the destination sent, if one is waiting.
fn refusal(reader: &mut TcpStream) -> Option<String> {
    let _ = reader.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = Vec::new();
    match wire::read_record(reader, &mut buf) {
        Ok(Record::Refuse(why)) => Some(why),
        _ => None,
    }
}

fn connect(to: &str) -> Result<TcpStream, MigrationError> {
    let addr = tcp_address(to)?;
    let err = |source| MigrationError::Connect {
        to: addr.to_string(),
        source,
    };
    let mut last = None;
    for a in addr.to_socket_addrs().map_err(err)? {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
    })))
}

/// Migrates the VM to `req.to`. Returns once the destination runs it: the vCPUs stay paused and
/// the virtio devices locked for good (the process is to exit). On an error the VM runs on as
/// before. `progress` is kept up to date throughout.
pub fn migrate(
    src: &Source,
    req: &Request,
    progress: &Mutex<MigrationStatus>,
) -> Result<(), MigrationError> {
    let t0 = Instant::now();
    let set = |f: &dyn Fn(&mut MigrationStatus)| {
        let mut s = progress.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
        s.total_ms = t0.elapsed().as_millis() as u64;
    };
    let stream = connect(&req.to)?;
    // Every write is a large writev or a deliberate flush: Nagle's algorithm could only hold
    // back the last small records before the wait for the Ack, inside the downtime.
    let _ = stream.set_nodelay(true);
    super::socket_buffers(&stream);
    stream
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .and_then(|()| stream.set_read_timeout(Some(ACK_TIMEOUT)))
        .map_err(MigrationError::Io)?;
    let mut reader = stream.try_clone().map_err(MigrationError::Io)?;
    let mut out = Out {
        stream,
        small: Vec::with_capacity(64 << 10),
        bytes: 0,
        watch: false,
    };
    let storage = req
        .copy_storage
        .then(|| storage::describe(&src.config, &src.disks))
        .transpose()?;
    wire::write_hello(&mut out)?;
    wire::read_hello(&mut reader)?;
    out.watch = true;
    if let Some(t) = &req.token {
        wire::write_record(&mut out, Kind::Auth, t.as_bytes())?;
    }
    let setup = Setup {
        config: src.config.clone(),
        regions: src
            .memory
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect(),
        storage: storage.clone(),
    };
    let json = serde_json::to_vec(&setup).map_err(|e| MigrationError::Vmm(e.to_string()))?;
    wire::write_record(&mut out, Kind::Config, &json)?;

    memory::set_dirty_logging(&src.vm, &src.memory, true)?;
    // The host threads' writes count from here, as the guest's do.
    for r in src.memory.iter() {
        host_bitmap(r).reset();
    }
    let mut log = LogGuard { src, armed: true };
    let mut s = Sender {
        src,
        out,
        batch: Batch::default(),
        regions: src
            .memory
            .iter()
            .map(|r| (r.start_addr().0, r.as_ptr() as usize, r.len()))
            .collect(),
        zeros: Vec::new(),
        pages: 0,
        progress,
        started: t0,
        // The log is on before the first block is read: no write goes unseen.
        disks: storage
            .as_ref()
            .map(|c| DiskCopier::start(src.disks.clone(), c.disks.clone())),
        disk_bytes: 0,
        reader,
    };
    if let Some(copy) = &storage {
        match storage::send_files(&mut s.out, &src.config, copy) {
            Ok(n) => s.disk_bytes = n,
            Err(e) => return Err(s.abort(e)),
        }
    }

    let (round, mut pending) = match s.precopy(req) {
        Ok(r) => r,
        Err(e) => return Err(s.abort(e)),
    };

    // Shared storage: write back what the disks hold now while the guest still runs, so the
    // flush inside the downtime has only the last moments' writes left. (A storage migration
    // sends the disks' contents in the stream: the destination never opens these files.)
    if !req.copy_storage {
        crate::devices_block::flush_all();
    }

    // Stop and copy.
    set(&|st| st.phase = Some(MigrationPhase::StopAndCopy));
    let was_paused = src.control.is_paused();
    let paused_at = Instant::now();
    if !was_paused {
        if let Err(e) = src.control.pause(PAUSE_TIMEOUT) {
            src.control.resume();
            return Err(s.abort(e.into()));
        }
    }
    let mut marks = Marks::new(paused_at);
    marks.mark("pause");
    let guards: Vec<_> = src
        .virtio
        .iter()
        .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()))
        .collect();
    let last = (|| {
        let virtio = guards.iter().map(|d| d.save()).collect();
        let vcpus = src
            .vcpus
            .iter()
            .map(|v| v.save_state(&src.msrs))
            .collect::<Result<Vec<_>, _>>()?;
        let state = MachineState {
            vm: src.vm.save_state()?,
            vcpus,
            legacy: src.legacy.save(),
            virtio,
        };
        marks.mark("device and vCPU state");
        // What the destination opens must be on disk before it runs.
        if !req.copy_storage {
            crate::devices_block::flush_all();
        }
        marks.mark("disk flush");
        or_into(&mut pending, &memory::dirty_log(&src.vm, &src.memory)?);
        let host = s.device_writes(&mut pending);
        let final_pages = count(&pending);
        marks.mark("dirty log and device-write check");
        s.round(round)?;
        // The block devices are drained and locked: these are the disks' last writes.
        s.disk_dirty()?;
        s.dirty(&pending)?;
        if std::env::var_os(super::VERIFY_ENV).is_some_and(|v| v == "1") {
            wire::write_verify(&mut s.out, &super::chunk_hashes(&src.memory))?;
        }
        let json = serde_json::to_vec(&state).map_err(|e| MigrationError::Vmm(e.to_string()))?;
        wire::write_state(&mut s.out, &json)?;
        wire::write_record(&mut s.out, Kind::End, &[])?;
        s.out.flush().map_err(MigrationError::Io)?;
        marks.mark("last pages and state sent");
        let mut buf = Vec::new();
        let answer = wire::read_record(&mut s.reader, &mut buf)?;
        marks.mark("destination built and answered");
        match answer {
            Record::Ack => Ok((final_pages, host)),
            Record::Refuse(why) => Err(MigrationError::Refused(why)),
            other => Err(MigrationError::Malformed(format!(
                "the destination answered {other:?}"
            ))),
        }
    })();
    match last {
        Ok((final_pages, host)) => {
            // The destination runs the VM: nothing here may touch guest memory or the disks
            // again, so the devices stay locked and the vCPUs parked until the process exits.
            std::mem::forget(guards);
            log.armed = false;
            let downtime = paused_at.elapsed().as_millis() as u64;
            s.report();
            set(&|st| {
                st.phase = Some(MigrationPhase::Completed);
                st.rounds = round + 1;
                st.remaining_dirty_pages = 0;
                st.final_dirty_pages = Some(final_pages);
                st.downtime_ms = Some(downtime);
            });
            eprintln!(
                "ferro-vmm: migration: stop-and-copy of {final_pages} pages ({host} written by devices): {}",
                marks.text
            );
            Ok(())
        }
        Err(e) => {
            drop(guards);
            if !was_paused {
                src.control.resume();
            }
            Err(s.abort(e))
        }
    }
}
