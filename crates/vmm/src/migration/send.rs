//! The source side: runs on its own thread (the main thread keeps serving the console and the
//! control socket) and reports its progress through a shared [`MigrationStatus`].

use std::io::{BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferro_api::control::{MigrationPhase, MigrationStatus};
use ferro_api::VmConfig;
use ferro_hypervisor::{Vcpu, Vm};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::wire::{self, Kind, PageBatch, Record, PAGE, PAGE_ENTRY};
use super::{page_hash, tcp_address, MigrationError, Setup};
use crate::machine::{ExitLatch, LegacyHandles};
use crate::memory::{self, GuestMemory};
use crate::pci::SharedVirtio;
use crate::snapshot::MachineState;
use crate::vcpu::VcpuControl;

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
}

/// A writer that counts what went through it.
struct Counted<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
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

fn is_zero(page: &[u8]) -> bool {
    page.chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// The stream and what was sent on it.
struct Sender<'a> {
    src: &'a Source,
    out: BufWriter<Counted<TcpStream>>,
    batch: PageBatch,
    zeros: Vec<(u64, u64)>,
    /// Per region and page: the hash of what the destination holds (VMs with devices only).
    hashes: Option<Vec<Vec<u64>>>,
    zero_hash: u64,
    pages: u64,
    progress: &'a Mutex<MigrationStatus>,
    started: Instant,
}

impl Sender<'_> {
    fn bytes(&self) -> u64 {
        self.out.get_ref().bytes + self.out.buffer().len() as u64
    }

    fn status(&self) -> MutexGuard<'_, MigrationStatus> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn report(&self) {
        let (bytes, pages) = (self.bytes(), self.pages);
        let mut s = self.status();
        s.bytes = bytes;
        s.pages = pages;
        s.total_ms = self.started.elapsed().as_millis() as u64;
    }

    /// Sends page `page` of region `region`; in round 0 a zero page needs no record (the
    /// destination's memory starts zero).
    fn page(&mut self, region: usize, page: usize, round0: bool) -> Result<(), MigrationError> {
        let Some(r) = self.src.memory.iter().nth(region) else {
            return Ok(());
        };
        let addr = r.start_addr().0 + page as u64 * PAGE;
        let buf = self.batch.push(addr);
        self.src
            .memory
            .read_slice(buf, GuestAddress(addr))
            .map_err(|e| MigrationError::Vmm(format!("reading guest memory: {e}")))?;
        let zero = is_zero(buf);
        let hash = if self.hashes.is_some() && !zero {
            page_hash(buf)
        } else {
            self.zero_hash
        };
        if let Some(h) = self
            .hashes
            .as_mut()
            .and_then(|h| h.get_mut(region)?.get_mut(page))
        {
            *h = hash;
        }
        if zero {
            self.batch.pop();
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

    /// Adds to `dirty` every page whose content differs from what was sent, by hash: the
    /// writes of host threads, which KVM's log does not see. The VM must be paused and its
    /// devices locked. Runs on every CPU: this is inside the downtime.
    fn host_writes(&self, dirty: &mut Bitmaps) -> u64 {
        let Some(hashes) = &self.hashes else {
            return 0;
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        let mut found = 0;
        for ((r, sent), bits) in self.src.memory.iter().zip(hashes).zip(dirty.iter_mut()) {
            let touched = crate::memfile::populated(r);
            let ctx = Check {
                mem: &self.src.memory,
                base: r.start_addr().0,
                sent,
                touched: touched.as_deref(),
                zero_hash: self.zero_hash,
            };
            // Whole bitmap words per thread, so each owns its part of `bits`.
            let per = bits.len().div_ceil(threads).max(1);
            found += std::thread::scope(|scope| {
                let ctx = &ctx;
                let parts: Vec<_> = bits
                    .chunks_mut(per)
                    .enumerate()
                    .map(|(i, words)| scope.spawn(move || ctx.run(i * per, words)))
                    .collect();
                parts
                    .into_iter()
                    .map(|p| p.join().unwrap_or(0))
                    .sum::<u64>()
            });
        }
        found
    }
}

/// One region's pages to compare with their hashes as sent.
struct Check<'a> {
    mem: &'a GuestMemory,
    base: u64,
    sent: &'a [u64],
    touched: Option<&'a [bool]>,
    zero_hash: u64,
}

impl Check<'_> {
    /// Checks the pages of bitmap words `first_word..` (`words`), setting the bits of pages
    /// that changed; returns how many did.
    fn run(&self, first_word: usize, words: &mut [u64]) -> u64 {
        let mut buf = [0u8; PAGE as usize];
        let mut found = 0;
        for (w, word) in words.iter_mut().enumerate() {
            for bit in 0..64 {
                let p = (first_word + w) * 64 + bit;
                let Some(&want) = self.sent.get(p) else {
                    return found;
                };
                if *word & (1 << bit) != 0 {
                    continue;
                }
                let now = if self.touched.is_some_and(|t| t.get(p) == Some(&false)) {
                    self.zero_hash
                } else {
                    let addr = GuestAddress(self.base + p as u64 * PAGE);
                    match self.mem.read_slice(&mut buf, addr) {
                        Ok(()) => page_hash(&buf),
                        Err(_) => !want,
                    }
                };
                if now != want {
                    *word |= 1 << bit;
                    found += 1;
                }
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
        self.everything()?;
        sending += t.elapsed();
        let mut pending = memory::dirty_log(vm, mem)?;
        loop {
            round += 1;
            let bw = (self.bytes() as f64 / sending.as_secs_f64().max(1e-6)).max(1.0);
            let dirty = count(&pending);
            let est_ms = dirty as f64 * PAGE_ENTRY as f64 / bw * 1000.0;
            {
                let mut st = self.status();
                st.rounds = round;
                st.remaining_dirty_pages = dirty;
                st.bandwidth_bps = bw as u64;
            }
            if est_ms <= req.downtime_ms as f64 || round >= req.max_rounds {
                return Ok((round, pending));
            }
            let t = Instant::now();
            self.round(round)?;
            self.dirty(&pending)?;
            sending += t.elapsed();
            pending = memory::dirty_log(vm, mem)?;
        }
    }

    /// Tells the destination why the migration ends here (best effort: it may be gone), so
    /// it exits with this reason; returns `e`.
    fn abort(&mut self, e: MigrationError) -> MigrationError {
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
    let _ = stream.set_nodelay(true);
    stream
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .and_then(|()| stream.set_read_timeout(Some(ACK_TIMEOUT)))
        .map_err(MigrationError::Io)?;
    let mut reader = stream.try_clone().map_err(MigrationError::Io)?;
    let mut out = BufWriter::with_capacity(
        1 << 20,
        Counted {
            inner: stream,
            bytes: 0,
        },
    );
    wire::write_hello(&mut out)?;
    wire::read_hello(&mut reader)?;
    let setup = Setup {
        config: src.config.clone(),
        regions: src
            .memory
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect(),
    };
    let json = serde_json::to_vec(&setup).map_err(|e| MigrationError::Vmm(e.to_string()))?;
    wire::write_record(&mut out, Kind::Config, &json)?;

    memory::set_dirty_logging(&src.vm, &src.memory, true)?;
    let mut log = LogGuard { src, armed: true };
    let pages_per_region: Vec<usize> = src
        .memory
        .iter()
        .map(|r| (r.len() / PAGE) as usize)
        .collect();
    let mut s = Sender {
        src,
        out,
        batch: PageBatch::default(),
        zeros: Vec::new(),
        hashes: (!src.virtio.is_empty())
            .then(|| pages_per_region.iter().map(|&n| vec![0u64; n]).collect()),
        zero_hash: page_hash(&[0u8; PAGE as usize]),
        pages: 0,
        progress,
        started: t0,
    };
    if let Some(h) = s.hashes.as_mut() {
        let zh = s.zero_hash;
        h.iter_mut().for_each(|r| r.fill(zh));
    }

    let (round, mut pending) = match s.precopy(req) {
        Ok(r) => r,
        Err(e) => return Err(s.abort(e)),
    };

    // Write back what the disks hold now while the guest still runs, so the flush inside the
    // downtime has only the last moments' writes left.
    crate::devices_block::flush_all();

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
        crate::devices_block::flush_all();
        marks.mark("disk flush");
        or_into(&mut pending, &memory::dirty_log(&src.vm, &src.memory)?);
        let host = s.host_writes(&mut pending);
        let final_pages = count(&pending);
        marks.mark("dirty log and device-write check");
        s.round(round)?;
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
        let answer = wire::read_record(&mut reader, &mut buf)?;
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
