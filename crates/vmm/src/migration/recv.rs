//! The destination side: `ferro-vmm --incoming tcp:HOST:PORT` listens, takes one connection,
//! receives the configuration, memory and machine state on a helper thread while the main
//! thread answers `status` on the control socket, and hands the result to the builder.

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferro_api::control::{
    ControlErrorCode, ControlRequest, MigrationPhase, MigrationStatus, VmmRunState, VmmStatus,
    CONTROL_PROTOCOL_VERSION,
};
use ferro_api::VmConfig;
use ferro_arch::memory_map::RamLayout;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::storage::StorageSink;
use super::wire::{self, Kind, Record, PAGE};
use super::{chunk_hashes, tcp_address, MigrationError, Setup, VERIFY_CHUNK};
use crate::control::{Applied, ControlServer, ControlTarget};
use crate::memory::GuestMemory;
use crate::snapshot::MachineState;
use crate::VmmError;

/// Bytes of a page run read between two updates of the progress `status` shows.
const PROGRESS_STEP: u64 = 256 << 10;
/// How long the source may stay silent once connected.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A VM received whole, not built yet.
pub struct Received {
    /// Its configuration, as the source ran it.
    pub config: VmConfig,
    /// Its machine state.
    pub state: MachineState,
    /// Its memory, filled.
    pub memory: GuestMemory,
    /// The connection, for the answer ([`answer`]).
    pub stream: TcpStream,
    /// The source's address.
    pub peer: String,
    /// Storage migration: the files the VM's configuration now names; they are removed when
    /// this is dropped, unless [`StorageSink::keep`] says the VM runs from them.
    pub storage: Option<StorageSink>,
}

/// Binds `spec` (`tcp:HOST:PORT`, PORT may be 0) and prints the line that names the real
/// address, always the first thing on stderr.
pub fn listen(spec: &str) -> Result<TcpListener, VmmError> {
    let addr = tcp_address(spec).map_err(|e| VmmError::Migration(e.to_string()))?;
    let l = TcpListener::bind(addr)
        .map_err(|e| VmmError::Migration(format!("cannot listen on {addr}: {e}")))?;
    let real = l
        .local_addr()
        .map_err(|e| VmmError::Migration(format!("cannot listen on {addr}: {e}")))?;
    eprintln!("ferro-vmm: incoming listening on {real}");
    Ok(l)
}

/// What the control socket says while the VM is incoming.
struct Waiting {
    progress: Arc<Mutex<MigrationStatus>>,
    shape: Arc<Mutex<(u32, u64)>>,
    started: Instant,
}

impl ControlTarget for Waiting {
    fn status(&self) -> VmmStatus {
        let (vcpus, memory_mib) = *self.shape.lock().unwrap_or_else(|e| e.into_inner());
        let mut m = self
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        m.total_ms = self.started.elapsed().as_millis() as u64;
        VmmStatus {
            state: VmmRunState::Incoming,
            pid: std::process::id(),
            vcpus,
            memory_mib,
            uptime_ms: 0,
            boots: 1,
            protocol: CONTROL_PROTOCOL_VERSION,
            migration: Some(m),
            storage_synced: None,
        }
    }

    fn apply(&mut self, _: &ControlRequest) -> Result<Applied, (ControlErrorCode, String)> {
        Err((
            ControlErrorCode::InvalidState,
            "the VM is still being migrated here: only status is answered".into(),
        ))
    }
}

/// Accepts one connection on `listener` and receives a VM from it, answering `status` on
/// `control` meanwhile. A broken or bad stream is an error (the caller exits with status 1).
pub fn incoming(
    listener: TcpListener,
    control: Option<&mut ControlServer>,
    opts: IncomingOptions,
) -> Result<Received, VmmError> {
    let progress = Arc::new(Mutex::new(MigrationStatus {
        phase: Some(MigrationPhase::Receiving),
        ..Default::default()
    }));
    let shape = Arc::new(Mutex::new((0u32, 0u64)));
    let done = EventFd::new(EFD_NONBLOCK).map_err(VmmError::io("eventfd"))?;
    let wake = done.try_clone().map_err(VmmError::io("eventfd"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let (p, sh) = (progress.clone(), shape.clone());
    std::thread::Builder::new()
        .name("migrate-in".into())
        .spawn(move || {
            let r = accept_and_receive(&listener, &p, &sh, &opts);
            let _ = tx.send(r);
            let _ = wake.write(1);
        })
        .map_err(VmmError::io("cannot start the migration thread"))?;
    let mut target = Waiting {
        progress,
        shape,
        started: Instant::now(),
    };
    let mut control = control;
    let mut fds = Vec::new();
    loop {
        if let Ok(r) = rx.try_recv() {
            return r.map_err(|e| VmmError::Migration(format!("incoming migration: {e}")));
        }
        fds.clear();
        fds.push(libc::pollfd {
            fd: done.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        if let Some(c) = &control {
            c.poll_fds(&mut fds);
        }
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structures.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(VmmError::io("poll")(e));
            }
            continue;
        }
        if fds[0].revents != 0 {
            let _ = done.read();
        }
        if let Some(c) = control.as_deref_mut() {
            c.handle(&fds[1..], &mut target);
        }
    }
}

/// How a destination takes its VM (`--incoming-storage`, `--incoming-token-file`).
#[derive(Debug, Clone, Default)]
pub struct IncomingOptions {
    /// Storage migration: where the copied files go.
    pub storage: Option<std::path::PathBuf>,
    /// The one-time token a source must send first; connections without it are refused
    /// and the destination waits on for the right one.
    pub token: Option<Vec<u8>>,
}

/// Whether `a` and `b` are equal, in a time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Checks that the first record is the [`Kind::Auth`] with `token`.
fn authenticate(r: &mut impl std::io::Read, token: &[u8]) -> Result<(), MigrationError> {
    let mut buf = Vec::new();
    match wire::read_record(r, &mut buf)? {
        Record::Auth(t) if same(t, token) => Ok(()),
        Record::Auth(_) => Err(MigrationError::Vmm("wrong migration token".into())),
        _ => Err(MigrationError::Vmm(
            "this destination takes a VM only with its migration token".into(),
        )),
    }
}

/// Tells the source why it is refused, then reads on until it hangs up (bounded): closing
/// with the source's data unread would reset the connection, and a reset can cost the source
/// the reason before it reads it (it checks for an answer at every flush).
fn refuse(stream: &TcpStream, e: &MigrationError) {
    let _ = wire::write_record(&mut &*stream, Kind::Refuse, e.to_string().as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut sink = vec![0u8; 64 << 10];
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until
        && std::io::Read::read(&mut &*stream, &mut sink).is_ok_and(|n| n > 0)
    {}
}

fn accept_and_receive(
    listener: &TcpListener,
    progress: &Mutex<MigrationStatus>,
    shape: &Mutex<(u32, u64)>,
    opts: &IncomingOptions,
) -> Result<Received, MigrationError> {
    loop {
        let (stream, peer) = listener.accept().map_err(MigrationError::Io)?;
        let peer = peer.to_string();
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(READ_TIMEOUT)))
            .map_err(MigrationError::Io)?;
        let mut writer = stream.try_clone().map_err(MigrationError::Io)?;
        // Small: page data bypasses it (reads as large as its capacity go straight to the
        // caller's buffer, which is guest RAM), so it only saves calls on record heads.
        let mut reader = std::io::BufReader::with_capacity(16 << 10, &stream);
        let mut hello = wire::write_hello(&mut writer).and_then(|()| wire::read_hello(&mut reader));
        if let Some(token) = &opts.token {
            // Until a source proves it has the token, a connection is someone else's: it is
            // turned away and the destination waits on.
            hello = hello.and_then(|()| authenticate(&mut reader, token));
            if let Err(e) = &hello {
                eprintln!("ferro-vmm: incoming: turned away {peer}: {e}");
                if !matches!(e, MigrationError::Closed) {
                    refuse(&stream, e);
                }
                continue;
            }
        }
        progress.lock().unwrap_or_else(|e| e.into_inner()).peer = peer.clone();
        super::socket_buffers(&stream);
        let got =
            hello.and_then(|()| receive(&mut reader, progress, shape, opts.storage.as_deref()));
        return match got {
            Ok((config, state, memory, storage)) => {
                drop(reader);
                Ok(Received {
                    config,
                    state,
                    memory,
                    stream,
                    peer,
                    storage,
                })
            }
            Err(e) => {
                // Tell the source why, when it is still there to read it.
                if !matches!(e, MigrationError::Aborted(_) | MigrationError::Closed) {
                    refuse(&stream, &e);
                }
                Err(e)
            }
        };
    }
}

/// Tells the source the VM runs here (`Ok`) or why it cannot (`Err`).
pub fn answer(stream: &mut TcpStream, result: Result<(), String>) {
    let _ = match result {
        Ok(()) => wire::write_record(stream, Kind::Ack, &[]),
        Err(why) => wire::write_record(stream, Kind::Refuse, why.as_bytes()),
    };
}

fn bad(what: String) -> MigrationError {
    MigrationError::Malformed(what)
}

/// The region of `mem` that holds all of `[addr, addr + len)`, with `addr` page-aligned.
fn check_range(mem: &GuestMemory, addr: u64, len: u64) -> Result<(), MigrationError> {
    let end = addr.checked_add(len);
    let inside = addr.is_multiple_of(PAGE)
        && len > 0
        && mem.iter().any(|r| {
            let start = r.start_addr().0;
            addr >= start && end.is_some_and(|e| e <= start + r.len())
        });
    if inside {
        Ok(())
    } else {
        Err(bad(format!(
            "{len} bytes at {addr:#x} are not whole pages of guest RAM"
        )))
    }
}

/// Reads `len` bytes of the stream straight into guest RAM at `addr`, once checked to be whole
/// pages inside one region.
fn read_into(
    r: &mut impl std::io::Read,
    mem: &GuestMemory,
    addr: u64,
    len: u64,
) -> Result<(), MigrationError> {
    check_range(mem, addr, len)?;
    let size = usize::try_from(len).map_err(|_| bad(format!("{len} bytes at {addr:#x}")))?;
    let slice = mem
        .get_slice(GuestAddress(addr), size)
        .map_err(|e| bad(format!("pages at {addr:#x}: {e}")))?;
    let guard = slice.ptr_guard_mut();
    // SAFETY: `slice` is `size` bytes of one region of `mem`'s mapping (checked above), which
    // lives as long as `mem`. Nothing else reads or writes it meanwhile: this memory is not
    // mapped into a VM yet and no device has it, so this thread is its only user for the
    // duration of the read (the populate-ahead helper only asks the kernel to fault pages in,
    // which never changes their contents or touches them from user space).
    let dst = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), slice.len()) };
    r.read_exact(dst).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            MigrationError::Closed
        } else {
            MigrationError::Io(e)
        }
    })
}

/// Faults in guest RAM `[addr, addr + len)` (checked to be inside one region) with one call
/// before a page run lands there: the kernel then takes no page fault per 4 KiB page in the
/// middle of the socket copy. Best effort (MADV_POPULATE_WRITE needs Linux 5.14).
fn populate(mem: &GuestMemory, addr: u64, len: u64) {
    let Ok(slice) = mem.get_slice(GuestAddress(addr), len as usize) else {
        return;
    };
    let guard = slice.ptr_guard_mut();
    // SAFETY: advice on `len` bytes of one region of `mem`'s own anonymous mapping, page
    // aligned (checked by the caller); populating only allocates the pages, their contents
    // stay what they are (zero).
    unsafe {
        libc::madvise(
            guard.as_ptr().cast(),
            slice.len(),
            libc::MADV_POPULATE_WRITE,
        )
    };
}

/// Receives the records after the hellos, up to the end marker.
type Got = (VmConfig, MachineState, GuestMemory, Option<StorageSink>);

fn receive(
    r: &mut impl std::io::Read,
    progress: &Mutex<MigrationStatus>,
    shape: &Mutex<(u32, u64)>,
    storage_dir: Option<&std::path::Path>,
) -> Result<Got, MigrationError> {
    let mut buf = Vec::new();
    let mut first = wire::read_record(r, &mut buf)?;
    if matches!(first, Record::Auth(_)) {
        // A token this destination was not given: it takes the VM anyway.
        first = wire::read_record(r, &mut buf)?;
    }
    let setup: Setup = match first {
        Record::Config(json) => {
            serde_json::from_slice(json).map_err(|e| bad(format!("the configuration: {e}")))?
        }
        Record::Abort(why) => return Err(MigrationError::Aborted(why)),
        other => return Err(bad(format!("expected the configuration, got {other:?}"))),
    };
    let mut config = setup.config;
    config
        .validate()
        .map_err(|e| bad(format!("the configuration: {e}")))?;
    // Files before memory: a refusal here costs no allocation.
    let sink = match (&setup.storage, storage_dir) {
        (Some(copy), Some(dir)) => {
            let sink = StorageSink::create(dir, &config, copy)?;
            config = config.relocated(dir);
            Some(sink)
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(MigrationError::Vmm(
                "the source copies its disks (storage migration): start this ferro-vmm with --incoming-storage DIR".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(MigrationError::Vmm(
                "the source does not copy its disks (shared storage), but this ferro-vmm was given --incoming-storage".into(),
            ))
        }
    };
    let layout = RamLayout::new(config.memory_mib << 20);
    if layout.ranges().into_iter().collect::<Vec<_>>() != setup.regions {
        return Err(bad(format!(
            "the memory regions do not match {} MiB of RAM",
            config.memory_mib
        )));
    }
    *shape.lock().unwrap_or_else(|e| e.into_inner()) = (config.cpus, config.memory_mib);
    let ranges: Vec<(GuestAddress, usize)> = setup
        .regions
        .iter()
        .map(|&(a, s)| usize::try_from(s).map(|s| (GuestAddress(a), s)))
        .collect::<Result<_, _>>()
        .map_err(|_| bad("a region larger than this host's address space".into()))?;
    let memory = GuestMemory::from_ranges(&ranges).map_err(|e| {
        MigrationError::Vmm(format!(
            "cannot allocate {} MiB of guest memory: {e}",
            config.memory_mib
        ))
    })?;
    // A helper faults in the 2 MiB after each long run while this thread copies the run, so
    // that the pages the stream fills next are mostly there when their bytes arrive.
    let state = std::thread::scope(|scope| {
        let (ahead, todo) = std::sync::mpsc::channel::<(u64, u64)>();
        let mem = &memory;
        let helper = std::thread::Builder::new()
            .name("migrate-in-pop".into())
            .spawn_scoped(scope, move || {
                for (addr, len) in todo {
                    populate(mem, addr, len);
                }
            });
        let ahead = helper.is_ok().then_some(ahead);
        fill(
            r,
            &mut buf,
            &memory,
            &config,
            progress,
            ahead.as_ref(),
            sink.as_ref(),
        )
    })?;
    Ok((config, state, memory, sink))
}

/// Runs at least this long (bytes) make the receiver populate the [`AHEAD`] bytes after them
/// in advance: at most that much memory is populated for nothing where the data ends.
const LONG_RUN: u64 = 1 << 20;
const AHEAD: u64 = 2 << 20;

/// Receives the page, zero and state records into `memory`, up to the end marker.
fn fill(
    r: &mut impl std::io::Read,
    buf: &mut Vec<u8>,
    memory: &GuestMemory,
    config: &VmConfig,
    progress: &Mutex<MigrationStatus>,
    ahead: Option<&std::sync::mpsc::Sender<(u64, u64)>>,
    sink: Option<&StorageSink>,
) -> Result<MachineState, MigrationError> {
    let storage =
        || sink.ok_or_else(|| bad("storage records in a migration without storage".into()));
    let mut disk_bytes = 0u64;
    let zeros = [0u8; 64 * 1024];
    let mut state = None;
    let mut verify = None;
    let (mut bytes, mut pages) = (0u64, 0u64);
    loop {
        let rec = wire::read_record(r, buf)?;
        match rec {
            Record::Pages(runs) => {
                for (addr, n) in runs {
                    let len = u64::from(n) * PAGE;
                    check_range(memory, addr, len)?;
                    if let Some(tx) = ahead.filter(|_| len >= LONG_RUN) {
                        // Only inside the region the run is in (`check_range`).
                        let next = addr + len;
                        let room = memory.iter().find_map(|reg| {
                            let (start, end) = (reg.start_addr().0, reg.start_addr().0 + reg.len());
                            (next >= start && next < end).then_some(end - next)
                        });
                        if let Some(room) = room {
                            let _ = tx.send((next, room.min(AHEAD)));
                        }
                    }
                    populate(memory, addr, len);
                    // In steps, so that `status` shows a record of megabytes arriving.
                    let mut at = 0;
                    while at < len {
                        let step = (len - at).min(PROGRESS_STEP);
                        read_into(r, memory, addr + at, step)?;
                        at += step;
                        pages += step / PAGE;
                        bytes += step;
                        let mut s = progress.lock().unwrap_or_else(|e| e.into_inner());
                        s.bytes = bytes;
                        s.pages = pages;
                    }
                }
            }
            Record::Zeros(runs) => {
                for (addr, n) in runs {
                    let len = n
                        .checked_mul(PAGE)
                        .ok_or_else(|| bad(format!("{n} zero pages")))?;
                    check_range(memory, addr, len)?;
                    let mut at = 0;
                    while at < len {
                        let step = (len - at).min(zeros.len() as u64);
                        memory
                            .write_slice(&zeros[..step as usize], GuestAddress(addr + at))
                            .map_err(|e| bad(format!("zero pages at {addr:#x}: {e}")))?;
                        at += step;
                    }
                }
            }
            Record::Round(n) => progress.lock().unwrap_or_else(|e| e.into_inner()).rounds = n,
            Record::Disk(disk, offset, data) => {
                storage()?.write_disk(disk, offset, data)?;
                disk_bytes += data.len() as u64;
            }
            Record::DiskZeros(disk, offset, len) => storage()?.zero_disk(disk, offset, len)?,
            Record::File(kind, offset, data) => {
                storage()?.write_file(kind, offset, data)?;
                disk_bytes += data.len() as u64;
            }
            Record::State(json) => {
                if state.is_some() {
                    return Err(bad("a second machine state".into()));
                }
                let s: MachineState = serde_json::from_slice(json)
                    .map_err(|e| bad(format!("the machine state: {e}")))?;
                if s.vcpus.len() != config.cpus as usize {
                    return Err(bad(format!(
                        "{} vCPU states for {} vCPUs",
                        s.vcpus.len(),
                        config.cpus
                    )));
                }
                state = Some(s);
            }
            Record::Verify(hashes) => verify = Some(hashes),
            Record::End => {
                let state = state.ok_or_else(|| bad("the end came before the state".into()))?;
                if let Some(want) = verify {
                    check_copy(memory, &want)?;
                }
                return Ok(state);
            }
            Record::Abort(why) => return Err(MigrationError::Aborted(why)),
            other @ (Record::Config(_) | Record::Ack | Record::Refuse(_) | Record::Auth(_)) => {
                return Err(bad(format!("unexpected {other:?}")))
            }
        }
        bytes += buf.len() as u64 + 5;
        let mut s = progress.lock().unwrap_or_else(|e| e.into_inner());
        s.bytes = bytes;
        s.pages = pages;
        s.disk_bytes = disk_bytes;
    }
}

/// Compares this side's memory with the source's [`chunk_hashes`].
fn check_copy(memory: &GuestMemory, want: &[u64]) -> Result<(), MigrationError> {
    let have = chunk_hashes(memory);
    if have.len() != want.len() {
        return Err(bad(format!(
            "{} memory hashes for {} chunks",
            want.len(),
            have.len()
        )));
    }
    match have.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(MigrationError::Vmm(format!(
            "the copy differs from the source's memory in chunk {i} ({} MiB into RAM)",
            (i as u64 * VERIFY_CHUNK) >> 20
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::wire::{write_pages, write_record, write_zeros};

    fn setup(mib: u64) -> Vec<u8> {
        let config = VmConfig {
            memory_mib: mib,
            ..VmConfig::new("/k")
        };
        let regions = RamLayout::new(mib << 20).ranges().into_iter().collect();
        let mut w = Vec::new();
        let json = serde_json::to_vec(&Setup {
            config,
            regions,
            storage: None,
        })
        .unwrap();
        write_record(&mut w, Kind::Config, &json).unwrap();
        w
    }

    fn run(bytes: &[u8]) -> Result<Got, MigrationError> {
        let progress = Mutex::new(MigrationStatus::default());
        let shape = Mutex::new((0, 0));
        receive(&mut &bytes[..], &progress, &shape, None)
    }

    #[test]
    fn pages_outside_guest_ram_are_refused() {
        for addr in [16u64 << 20, (16 << 20) - 4096 + 8, u64::MAX - 4095, 0x123] {
            let mut w = setup(16);
            write_pages(&mut w, &[(addr, 1)], &[1; 4096]).unwrap();
            let e = run(&w).err().unwrap();
            assert!(matches!(e, MigrationError::Malformed(_)), "{addr:#x}: {e}");
        }
        // A run that starts inside RAM and leaves it, or crosses from one region to the next.
        let mut w = setup(16);
        write_pages(&mut w, &[(0, 1), ((16 << 20) - 4096, 2)], &[1; 3 * 4096]).unwrap();
        assert!(matches!(run(&w), Err(MigrationError::Malformed(_))));
        for (addr, n) in [(0u64, 4097u64), (15 << 20, 257), (0, u64::MAX), (0, 0)] {
            let mut w = setup(16);
            write_zeros(&mut w, &[(addr, n)]).unwrap();
            let e = run(&w).err().unwrap();
            assert!(
                matches!(e, MigrationError::Malformed(_)),
                "{addr:#x}+{n}: {e}"
            );
        }
    }

    #[test]
    fn bad_setups_and_orders_are_refused() {
        // Regions that are not the layout of the configuration's memory.
        let config = VmConfig {
            memory_mib: 16,
            ..VmConfig::new("/k")
        };
        let mut w = Vec::new();
        let json = serde_json::to_vec(&Setup {
            config: config.clone(),
            regions: vec![(0, 1 << 40)],
            storage: None,
        })
        .unwrap();
        write_record(&mut w, Kind::Config, &json).unwrap();
        assert!(matches!(run(&w), Err(MigrationError::Malformed(_))));
        // Pages before the configuration.
        let mut w = Vec::new();
        write_pages(&mut w, &[(0, 1)], &[1; 4096]).unwrap();
        write_record(&mut w, Kind::End, &[]).unwrap();
        assert!(matches!(run(&w), Err(MigrationError::Malformed(_))));
        // The end before any state; a stream that stops.
        let mut w = setup(16);
        write_record(&mut w, Kind::End, &[]).unwrap();
        assert!(matches!(run(&w), Err(MigrationError::Malformed(_))));
        assert!(matches!(run(&setup(16)), Err(MigrationError::Closed)));
        // The source's own reason comes through.
        let mut w = setup(16);
        write_record(&mut w, Kind::Abort, b"vCPUs would not pause").unwrap();
        let e = run(&w).err().unwrap();
        assert!(e.to_string().contains("vCPUs would not pause"), "{e}");
        // A storage migration to a VMM without --incoming-storage; disk records without one.
        let regions = RamLayout::new(16 << 20).ranges().into_iter().collect();
        let json = serde_json::to_vec(&Setup {
            config,
            regions,
            storage: Some(crate::migration::storage::StorageCopy {
                disks: vec![],
                kernel: 1,
                initrd: None,
            }),
        })
        .unwrap();
        let mut w = Vec::new();
        write_record(&mut w, Kind::Config, &json).unwrap();
        let e = run(&w).err().unwrap();
        assert!(e.to_string().contains("--incoming-storage"), "{e}");
        let mut w = setup(16);
        crate::migration::wire::write_disk(&mut w, 0, 0, &[1; 512]).unwrap();
        let e = run(&w).err().unwrap();
        assert!(e.to_string().contains("without storage"), "{e}");
    }

    #[test]
    fn a_copy_that_differs_is_found() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        mem.write_slice(&[5; 4096], GuestAddress(0x1000)).unwrap();
        let want = chunk_hashes(&mem);
        assert_eq!(want.len(), 4);
        check_copy(&mem, &want).unwrap();
        mem.write_slice(&[1], GuestAddress((4 << 20) + 17)).unwrap();
        let e = check_copy(&mem, &want).unwrap_err().to_string();
        assert!(e.contains("chunk 2 (4 MiB into RAM)"), "{e}");
        assert!(check_copy(&mem, &want[..3]).is_err());
    }
}
