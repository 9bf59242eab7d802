//! Running a built VM: one thread per vCPU, and the event loop on the main thread that feeds
//! console input to COM1, serves the control socket and waits for the end (guest request, vCPU
//! failure, SIGTERM/SIGINT, a `quit` or `reset` request).

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferro_api::control::{
    ControlErrorCode, ControlRequest, ControlResponse, ExitReason, MigrationPhase, MigrationStatus,
    VmmRunState, VmmStatus, CONTROL_PROTOCOL_VERSION, DEFAULT_MAX_ROUNDS,
};
use ferro_api::VmConfig;
use ferro_arch::layout::ports;
use ferro_devices::AcpiPmDevice;
use ferro_hypervisor::{Hypervisor, Vcpu, Vm};

use crate::builder::BuiltVm;
use crate::console::{socket_console, EscapeFilter, RawTerminal};
use crate::control::{Applied, ControlServer, ControlTarget};
use crate::machine::{ExitLatch, Machine};
use crate::memory::GuestMemory;
use crate::migration::{send, MigrationError};
use crate::snapshot::{self, Capture};
use crate::vcpu::{install_kick_handler, run_vcpu, VcpuControl};
use crate::{ExitStatus, VmmError};

/// Stack size of a vCPU thread: the loop needs little, and 32 of them should stay small.
const VCPU_STACK: usize = 256 * 1024;
/// How long a `pause` request may take to park every vCPU.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the event loop serves besides the VM.
pub struct RunOptions {
    /// Read console input from stdin (`--serial stdio`).
    pub console_input: bool,
    /// The control socket, if `--control` was given.
    pub control: Option<ControlServer>,
    /// Guest memory in MiB, for status reports.
    pub memory_mib: u64,
    /// Which boot of the guest this is in this process (1 + in-place restarts).
    pub boots: u32,
    /// The VM's configuration, for snapshots.
    pub config: VmConfig,
}

/// How a run ended.
pub struct RunEnd {
    /// The process exit status it maps to.
    pub status: ExitStatus,
    /// Why, as the control protocol says it.
    pub reason: ExitReason,
    /// The control socket, to announce the end on.
    pub control: Option<ControlServer>,
}

/// Blocks SIGTERM and SIGINT in this thread (and the threads it spawns) and returns a signalfd
/// that reports them instead.
fn signal_fd() -> Result<std::fs::File, VmmError> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise and modify it in place.
    let set = unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    };
    // SAFETY: `set` is an initialised sigset; the old mask is not wanted (null).
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(VmmError::Io {
            what: "cannot block signals",
            source: std::io::Error::from_raw_os_error(rc),
        });
    }
    // SAFETY: -1 asks for a new descriptor; `set` is initialised.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(VmmError::io("signalfd")(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor this function owns.
    Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// What a snapshot is taken from.
struct SnapshotParts<'a> {
    config: &'a VmConfig,
    vm: &'a Vm,
    hypervisor: &'a Hypervisor,
    /// A second handle on each vCPU, for reading its state while its thread is parked.
    vcpus: &'a [Vcpu],
    machine: &'a Machine,
    memory: &'a GuestMemory,
}

/// A migration started by a `migrate` request: its progress, and where its end is announced.
struct Migrations {
    /// Shared VM parts the migration thread takes its own handles on.
    vm: Arc<Vm>,
    vcpus: Arc<VcpuControl>,
    latch: Arc<ExitLatch>,
    /// The migration under way or the last one.
    progress: Option<Arc<Mutex<MigrationStatus>>>,
    started: Instant,
    active: bool,
    /// The thread's result, and the eventfd that wakes the main loop for it.
    done_tx: Sender<Result<(), MigrationError>>,
    done_rx: Receiver<Result<(), MigrationError>>,
    wake: vmm_sys_util::eventfd::EventFd,
}

/// The VM as the control socket sees it.
struct VmHandle<'a> {
    vcpus: &'a VcpuControl,
    snapshot: SnapshotParts<'a>,
    migrations: Migrations,
    acpi_pm: &'a Mutex<AcpiPmDevice>,
    latch: &'a ExitLatch,
    vcpu_count: u32,
    memory_mib: u64,
    boots: u32,
    started: Instant,
    /// Set by `quit` and `reset`, which end the run with status 0 for their own reason.
    requested: Option<ExitReason>,
}

impl ControlTarget for VmHandle<'_> {
    fn status(&self) -> VmmStatus {
        let m = &self.migrations;
        VmmStatus {
            state: if m.active {
                VmmRunState::Migrating
            } else if self.vcpus.is_paused() {
                VmmRunState::Paused
            } else {
                VmmRunState::Running
            },
            pid: std::process::id(),
            vcpus: self.vcpu_count,
            memory_mib: self.memory_mib,
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            boots: self.boots,
            protocol: CONTROL_PROTOCOL_VERSION,
            migration: m.progress.as_ref().map(|p| {
                let mut s = p.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if m.active {
                    s.total_ms = m.started.elapsed().as_millis() as u64;
                }
                s
            }),
            storage_synced: crate::migration::storage::writeback(),
        }
    }

    fn apply(&mut self, req: &ControlRequest) -> Result<Applied, (ControlErrorCode, String)> {
        let paused = self.vcpus.is_paused();
        if self.migrations.active
            && matches!(
                req,
                ControlRequest::Pause
                    | ControlRequest::Resume
                    | ControlRequest::Snapshot { .. }
                    | ControlRequest::Migrate { .. }
            )
        {
            return Err((
                ControlErrorCode::InvalidState,
                "a migration is under way".into(),
            ));
        }
        match req {
            ControlRequest::Status => {}
            ControlRequest::Migrate {
                to,
                downtime_ms,
                max_rounds,
                copy_storage,
                token,
            } => {
                self.start_migration(send::Request {
                    to: to.clone(),
                    downtime_ms: *downtime_ms,
                    max_rounds: max_rounds.unwrap_or(DEFAULT_MAX_ROUNDS).max(1),
                    copy_storage: *copy_storage,
                    token: token.clone(),
                })
                .map_err(|e| (ControlErrorCode::Failed, e.to_string()))?;
                return Ok(Applied::Later);
            }
            ControlRequest::Pause if paused => {
                return Err((
                    ControlErrorCode::InvalidState,
                    "the VM is paused already".into(),
                ))
            }
            ControlRequest::Pause => self
                .vcpus
                .pause(PAUSE_TIMEOUT)
                .map_err(|e| (ControlErrorCode::Failed, e.to_string()))?,
            ControlRequest::Resume if !paused => {
                return Err((
                    ControlErrorCode::InvalidState,
                    "the VM is not paused".into(),
                ))
            }
            ControlRequest::Resume => self.vcpus.resume(),
            ControlRequest::Shutdown => self
                .acpi_pm
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .press_power_button(),
            ControlRequest::Reset | ControlRequest::Quit => {
                self.requested
                    .get_or_insert(if *req == ControlRequest::Reset {
                        ExitReason::Reboot
                    } else {
                        ExitReason::Quit
                    });
                self.latch.request(ExitStatus::Ok);
            }
            ControlRequest::Snapshot { dir, resume } => {
                if !paused {
                    self.vcpus
                        .pause(PAUSE_TIMEOUT)
                        .map_err(|e| (ControlErrorCode::Failed, e.to_string()))?;
                }
                let saved = self.save_snapshot(dir);
                if !paused && *resume {
                    self.vcpus.resume();
                }
                let s = saved.map_err(|e| (ControlErrorCode::Failed, e.to_string()))?;
                eprintln!(
                    "ferro-vmm: snapshot {}: {} MiB of RAM, {} KiB written, in {:.1} ms",
                    dir.display(),
                    s.memory_bytes >> 20,
                    s.data_bytes >> 10,
                    s.ms
                );
            }
            ControlRequest::ConsoleLog => {
                let text = socket_console()
                    .map(|c| String::from_utf8_lossy(&c.recent()).into_owned())
                    .ok_or((
                        ControlErrorCode::InvalidState,
                        "the console is not on a socket (--serial socket:PATH)".to_string(),
                    ))?;
                return Ok(Applied::Console(text));
            }
        }
        Ok(Applied::Done)
    }
}

impl VmHandle<'_> {
    /// Starts the migration thread; its end arrives through `migrations.done_rx`.
    fn start_migration(&mut self, req: send::Request) -> Result<(), VmmError> {
        let p = &self.snapshot;
        let m = &mut self.migrations;
        crate::migration::tcp_address(&req.to).map_err(|e| VmmError::Migration(e.to_string()))?;
        let source = send::Source {
            config: p.config.clone(),
            vm: m.vm.clone(),
            memory: p.memory.clone(),
            vcpus: p
                .vcpus
                .iter()
                .map(|v| m.vm.vcpu_handle(v))
                .collect::<Result<_, _>>()?,
            msrs: p.hypervisor.msr_index_list()?,
            legacy: p.machine.legacy_handles(),
            virtio: p.machine.pci.virtio.clone(),
            control: m.vcpus.clone(),
            latch: m.latch.clone(),
            disks: crate::devices_block::opened(),
        };
        let progress = Arc::new(Mutex::new(MigrationStatus {
            phase: Some(MigrationPhase::Precopy),
            peer: req.to.clone(),
            ..Default::default()
        }));
        let (tx, wake) = (
            m.done_tx.clone(),
            m.wake.try_clone().map_err(VmmError::io("eventfd"))?,
        );
        let shared = progress.clone();
        eprintln!("ferro-vmm: migrating to {}", req.to);
        std::thread::Builder::new()
            .name("migrate-out".into())
            .spawn(move || {
                let r = send::migrate(&source, &req, &shared);
                let _ = tx.send(r);
                let _ = wake.write(1);
            })
            .map_err(VmmError::io("cannot start the migration thread"))?;
        m.progress = Some(progress);
        m.started = Instant::now();
        m.active = true;
        Ok(())
    }

    /// The migration thread's result, once it has ended: the answer to the `migrate` request;
    /// on success the VM is to end ([`ExitReason::Migrated`]).
    fn migration_ended(&mut self) -> Option<ControlResponse> {
        let _ = self.migrations.wake.read();
        let result = self.migrations.done_rx.try_recv().ok()?;
        self.migrations.active = false;
        let progress = self.migrations.progress.clone()?;
        let mut s = progress.lock().unwrap_or_else(|e| e.into_inner());
        s.total_ms = self.migrations.started.elapsed().as_millis() as u64;
        let resp = match result {
            Ok(()) => {
                eprintln!(
                    "ferro-vmm: migrated to {} in {} ms: {} rounds, {} KiB, downtime {} ms, {} pages in the last round",
                    s.peer,
                    s.total_ms,
                    s.rounds,
                    s.bytes >> 10,
                    s.downtime_ms.unwrap_or(0),
                    s.final_dirty_pages.unwrap_or(0)
                );
                self.requested = Some(ExitReason::Migrated);
                self.latch.request(ExitStatus::Ok);
                None
            }
            Err(e) => {
                let message = format!("migration to {} failed: {e}", s.peer);
                eprintln!("ferro-vmm: {message}; the VM runs on here");
                s.phase = Some(MigrationPhase::Failed);
                s.error = Some(e.to_string());
                Some(ControlResponse::Error {
                    code: ControlErrorCode::Failed,
                    message,
                })
            }
        };
        drop(s);
        Some(resp.unwrap_or_else(|| ControlResponse::Ok {
            status: self.status(),
            console: None,
        }))
    }

    /// Saves the paused VM into `dir`.
    fn save_snapshot(&self, dir: &std::path::Path) -> Result<snapshot::Saved, VmmError> {
        let p = &self.snapshot;
        let msrs = p.hypervisor.msr_index_list()?;
        Ok(snapshot::save(
            dir,
            &Capture {
                config: p.config,
                vm: p.vm,
                vcpus: p.vcpus,
                msrs: &msrs,
                machine: p.machine,
                memory: p.memory,
            },
        )?)
    }
}

/// Why the VM ended, from its exit status and, for status 0, what asked for it: a control
/// request, or else the guest (an S5 sleep type left in PM1a_CNT means power-off, anything
/// else a reset).
fn reason(
    status: ExitStatus,
    requested: Option<ExitReason>,
    acpi_pm: &Mutex<AcpiPmDevice>,
) -> ExitReason {
    match status {
        ExitStatus::Ok => requested.unwrap_or_else(|| {
            let control = acpi_pm
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save()
                .control;
            if (control >> 10) & 0b111 == u16::from(ports::S5_SLP_TYP) {
                ExitReason::PowerOff
            } else {
                ExitReason::Reboot
            }
        }),
        ExitStatus::Error => ExitReason::Error,
        ExitStatus::TripleFault => ExitReason::TripleFault,
        ExitStatus::GuestPanic => ExitReason::Panic,
        ExitStatus::KvmFailure => ExitReason::KvmFailure,
        ExitStatus::Interrupted | ExitStatus::Terminated => ExitReason::Signal,
    }
}

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Runs the VM until it ends and returns how.
pub fn run(vm: BuiltVm, opts: RunOptions) -> Result<RunEnd, VmmError> {
    let RunOptions {
        console_input,
        mut control,
        memory_mib,
        boots,
        config,
    } = opts;
    let mut sigfd = signal_fd()?;
    install_kick_handler()?;
    let vcpu_control = Arc::new(VcpuControl::new(vm.vcpus.len()));
    let vcpu_count = u32::try_from(vm.vcpus.len()).unwrap_or(u32::MAX);
    let BuiltVm {
        vcpus,
        machine,
        latch,
        vm,
        memory,
        hypervisor,
    } = vm;
    // Never dropped: tearing the VM down is left to the process exit (see teardown.rs).
    let keep = std::mem::ManuallyDrop::new((vm, memory, hypervisor));
    let handles = vcpus
        .iter()
        .map(|v| keep.0.vcpu_handle(v))
        .collect::<Result<Vec<_>, _>>()?;
    for vcpu in vcpus {
        let bus = machine.bus.clone();
        let latch = latch.clone();
        let control = vcpu_control.clone();
        std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.id()))
            .stack_size(VCPU_STACK)
            .spawn(move || run_vcpu(vcpu, bus, latch, control))
            .map_err(VmmError::io("cannot start a vCPU thread"))?;
    }
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let migrations = Migrations {
        vm: keep.0.clone(),
        vcpus: vcpu_control.clone(),
        latch: latch.clone(),
        progress: None,
        started: Instant::now(),
        active: false,
        done_tx,
        done_rx,
        wake: vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
            .map_err(VmmError::io("eventfd"))?,
    };
    let mut handle = VmHandle {
        vcpus: &vcpu_control,
        migrations,
        snapshot: SnapshotParts {
            config: &config,
            vm: &keep.0,
            hypervisor: &keep.2,
            vcpus: &handles,
            machine: &machine,
            memory: &keep.1,
        },
        acpi_pm: &machine.acpi_pm,
        latch: &latch,
        vcpu_count,
        memory_mib,
        boots,
        started: Instant::now(),
        requested: None,
    };
    let console = socket_console();

    let terminal = if console_input {
        Some(RawTerminal::enter())
    } else {
        None
    };
    let interactive = terminal.as_ref().is_some_and(RawTerminal::is_interactive);
    let mut stdin_open = console_input;
    let mut filter = EscapeFilter::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 1024];
    let mut fds = Vec::new();
    loop {
        if let Some(status) = latch.status() {
            let reason = reason(status, handle.requested, &machine.acpi_pm);
            return Ok(RunEnd {
                status,
                reason,
                control,
            });
        }
        fds.clear();
        fds.push(pollfd(latch.event().as_raw_fd()));
        fds.push(pollfd(sigfd.as_raw_fd()));
        fds.push(pollfd(handle.migrations.wake.as_raw_fd()));
        // Only read more input when the guest has taken what we hold.
        let stdin_at = fds.len();
        if stdin_open && pending.is_empty() {
            fds.push(pollfd(0));
        }
        let control_at = fds.len();
        if let Some(c) = &control {
            c.poll_fds(&mut fds);
        }
        let console_at = fds.len();
        if let Some(c) = &console {
            c.poll_fds(&mut fds, pending.is_empty());
        }
        let timeout = if pending.is_empty() { -1 } else { 5 };
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structures.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(VmmError::io("poll")(e));
        }
        if fds[1].revents & libc::POLLIN != 0 {
            let mut info = [0u8; 128];
            if sigfd.read(&mut info).is_ok() {
                let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                latch.request(if signo == libc::SIGINT as u32 {
                    ExitStatus::Interrupted
                } else {
                    ExitStatus::Terminated
                });
                continue;
            }
        }
        if stdin_at < control_at && fds[stdin_at].revents & (libc::POLLIN | libc::POLLHUP) != 0 {
            // SAFETY: reads into `buf`, which is valid for `buf.len()` bytes.
            let got = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
            if got <= 0 {
                stdin_open = false;
            } else if interactive {
                if filter.feed(&buf[..got as usize], &mut pending) {
                    latch.request(ExitStatus::Interrupted);
                    continue;
                }
            } else {
                pending.extend_from_slice(&buf[..got as usize]);
            }
        }
        if let Some(c) = &mut control {
            c.handle(&fds[control_at..console_at], &mut handle);
        }
        if fds[2].revents & libc::POLLIN != 0 {
            if let Some(resp) = handle.migration_ended() {
                if let Some(c) = &mut control {
                    c.finish(resp, &mut handle);
                }
            }
        }
        if let Some(c) = &console {
            let room = pending.is_empty();
            c.handle(&fds[console_at..], &mut pending, room);
        }
        if !pending.is_empty() {
            let mut serial = machine
                .serial
                .lock()
                .map_err(|_| VmmError::Devices("serial device poisoned".into()))?;
            let taken = serial.enqueue_input(&pending);
            pending.drain(..taken);
        }
    }
}
