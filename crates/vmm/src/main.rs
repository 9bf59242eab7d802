//! `ferro-vmm`: runs one VM from flags or a config file, with no daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use ferro_api::control::{ControlEvent, ExitReason};
use ferro_api::{
    parse_mib, BalloonConfig, DiskConfig, HugePages, NetConfig, SerialMode, VmConfig, VsockConfig,
};
use ferro_vmm::builder::{self, BuildOptions};
use ferro_vmm::console::socket_console;
use ferro_vmm::control::ControlServer;
use ferro_vmm::kernel::BootProtocol;
use ferro_vmm::runner::{self, RunOptions};
use ferro_vmm::{ExitStatus, VmmError};

/// Set by a VMM that restarts itself in place: which boot of the guest the new process runs.
const BOOT_ENV: &str = "FERRO_VMM_BOOT";

/// What a guest reboot does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnReboot {
    /// End the VMM with status 0, as a power-off does.
    Exit,
    /// Start the guest again in the same process (same pid and sockets; the console ring is kept).
    Restart,
}

/// Run one virtual machine on KVM.
///
/// Exit status: 0 when the guest powers off or reboots, 1 on an error (bad input, no KVM),
/// 2 on a triple fault, 3 on a guest panic (pvpanic), 4 when KVM cannot run the guest,
/// 130 on SIGINT or Ctrl-A x, 143 on SIGTERM.
#[derive(Parser, Debug)]
#[command(name = "ferro-vmm", version)]
struct Args {
    /// Kernel: a PVH ELF, a Linux vmlinux or a Linux bzImage.
    #[arg(long, required_unless_present_any = ["config", "host_info", "restore", "incoming"])]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// Number of vCPUs (1..=32).
    #[arg(long)]
    cpus: Option<u32>,
    /// Guest memory: MiB as a number (512) or with a suffix (512M, 2G).
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Transparent huge pages for guest RAM: auto (on when a disk has cache=none), on, off.
    #[arg(long, value_name = "auto|on|off")]
    huge_pages: Option<HugePages>,
    /// Serial console: stdio, file:PATH, socket:PATH (a unix socket that replays recent
    /// output to each client and takes input from it) or none.
    #[arg(long)]
    serial: Option<SerialMode>,
    /// A virtio-blk disk: path=FILE[,format=raw|qcow2][,readonly=on][,serial=S][,cache=writeback|none].
    /// Repeatable.
    #[arg(long = "disk")]
    disks: Vec<DiskConfig>,
    /// A virtio-net NIC on a tap: tap=NAME[,mac=MAC][,bridge=BR], or `auto`. Repeatable.
    #[arg(long = "net")]
    nets: Vec<NetConfig>,
    /// A virtio-rng entropy device.
    #[arg(long)]
    rng: bool,
    /// A virtio-vsock device: cid=N,uds=PATH.
    #[arg(long)]
    vsock: Option<VsockConfig>,
    /// A virtio-balloon device; `target=SIZE` starts it inflated to SIZE (MiB or 512M, 1G).
    #[arg(long, num_args = 0..=1, default_missing_value = "on")]
    balloon: Option<BalloonConfig>,
    /// Read the VM's settings from a TOML or JSON file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Enter ELF kernels through the Linux 64-bit boot protocol even if they have a PVH note.
    #[arg(long)]
    linux_boot: bool,
    /// Print which KVM this host has and the capabilities that matter, then exit.
    #[arg(long)]
    host_info: bool,
    /// Listen on this unix socket for control requests (line-delimited JSON: status, pause,
    /// resume, shutdown, reset, quit, console_log, snapshot, migrate).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Run the VM saved in this snapshot directory (a `snapshot` control request writes one)
    /// from where it was saved, with no daemon. Only --serial, --control and --on-reboot
    /// apply; the rest comes from the snapshot.
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "kernel", "initrd", "cmdline", "cpus", "memory", "huge_pages", "disks", "nets", "rng",
        "vsock", "balloon", "config", "linux_boot",
    ])]
    restore: Option<PathBuf>,
    /// Receive a live-migrating VM: listen on tcp:HOST:PORT (PORT 0 picks one; the first line
    /// on stderr is `ferro-vmm: incoming listening on HOST:PORT`), accept one connection from
    /// a VMM sent `{"cmd":"migrate","to":"HOST:PORT"}`, then run the VM as --restore does.
    /// Only --serial, --control and --on-reboot apply; disks must be at the same paths here.
    #[arg(long, value_name = "tcp:HOST:PORT", conflicts_with_all = [
        "kernel", "initrd", "cmdline", "cpus", "memory", "huge_pages", "disks", "nets", "rng",
        "vsock", "balloon", "config", "linux_boot", "restore",
    ])]
    incoming: Option<String>,
    /// With --incoming, for a source that copies its storage (`"copy_storage": true`): write
    /// the VM's disks (raw, sparse), kernel and initrd into DIR (made if missing) as
    /// `disk{i}.raw`, `kernel`, `initrd`, and run the VM from them. Files there of those names
    /// are refused, never overwritten; if the VM does not come they are removed.
    #[arg(long, value_name = "DIR", requires = "incoming")]
    incoming_storage: Option<PathBuf>,
    /// With --incoming: take the VM only from a source that sends the token in FILE first
    /// (`"token"` in its migrate request); other connections are turned away and the wait
    /// goes on. Without it, the first connection is the source.
    #[arg(long, value_name = "FILE", requires = "incoming")]
    incoming_token_file: Option<PathBuf>,
    /// What a guest reboot does: exit (status 0, like a power-off) or restart in place.
    #[arg(long, value_enum, default_value_t = OnReboot::Exit)]
    on_reboot: OnReboot,
}

fn parse_size(s: &str) -> Result<u64, String> {
    parse_mib(s).map_err(|e| e.to_string())
}

fn config(args: &Args) -> Result<VmConfig, VmmError> {
    let mut cfg = match &args.config {
        Some(path) => VmConfig::from_file(path)?,
        None => VmConfig::new(args.kernel.clone().unwrap_or_default()),
    };
    if let Some(k) = &args.kernel {
        cfg.kernel = k.clone();
    }
    if let Some(i) = &args.initrd {
        cfg.initrd = Some(i.clone());
    }
    if let Some(c) = &args.cmdline {
        cfg.cmdline = c.clone();
    }
    if let Some(n) = args.cpus {
        cfg.cpus = n;
    }
    if let Some(m) = args.memory {
        cfg.memory_mib = m;
    }
    if let Some(h) = args.huge_pages {
        cfg.huge_pages = h;
    }
    if let Some(s) = &args.serial {
        cfg.serial = s.clone();
    }
    // Device flags add to what the file lists.
    cfg.disks.extend(args.disks.iter().cloned());
    cfg.nets.extend(args.nets.iter().cloned());
    cfg.rng |= args.rng;
    if let Some(b) = &args.balloon {
        cfg.balloon = true;
        cfg.balloon_target_mib = b.target_mib.or(cfg.balloon_target_mib);
    }
    if let Some(v) = &args.vsock {
        cfg.vsock = Some(v.clone());
    }
    Ok(cfg)
}

fn run(args: &Args) -> Result<ExitStatus, VmmError> {
    if args.host_info {
        let hv = ferro_hypervisor::Hypervisor::new()?;
        print!("{}", hv.host_info().report());
        for f in ferro_arch::cpuid::hidden_features(match hv.kind() {
            ferro_hypervisor::HostKind::Hardware => ferro_arch::cpuid::Backend::Hardware,
            ferro_hypervisor::HostKind::Nested => ferro_arch::cpuid::Backend::Nested,
            ferro_hypervisor::HostKind::Pvm => ferro_arch::cpuid::Backend::Pvm,
        }) {
            println!("hidden: {} ({})", f.name, f.reason);
        }
        return Ok(ExitStatus::Ok);
    }
    let mut control = None;
    let (cfg, vm) = match (&args.restore, &args.incoming) {
        (_, Some(spec)) => {
            let token = match &args.incoming_token_file {
                None => None,
                Some(f) => {
                    let t = std::fs::read_to_string(f).map_err(|e| {
                        VmmError::Migration(format!("cannot read {}: {e}", f.display()))
                    })?;
                    let t = t.trim();
                    if t.is_empty() {
                        return Err(VmmError::Migration(format!(
                            "{} holds no migration token",
                            f.display()
                        )));
                    }
                    Some(t.as_bytes().to_vec())
                }
            };
            let listener = ferro_vmm::migration::recv::listen(spec)?;
            control = args
                .control
                .as_deref()
                .map(ControlServer::bind)
                .transpose()?;
            // Nothing is left behind when the VM does not come: no control socket file.
            let gone = |control: &Option<ControlServer>| {
                if let Some(c) = control {
                    let _ = std::fs::remove_file(c.path());
                }
            };
            let opts = ferro_vmm::migration::recv::IncomingOptions {
                storage: args.incoming_storage.clone(),
                token,
            };
            let got = match ferro_vmm::migration::recv::incoming(listener, control.as_mut(), opts) {
                Ok(g) => g,
                Err(e) => {
                    gone(&control);
                    return Err(e);
                }
            };
            let started = std::time::Instant::now();
            let mut cfg = got.config.clone();
            if let Some(s) = &args.serial {
                cfg.serial = s.clone();
            }
            let mut stream = got.stream;
            let storage = got.storage;
            match builder::restore_from(&cfg, &got.state, got.memory) {
                Ok(vm) => {
                    if let Some(s) = storage {
                        s.keep();
                    }
                    ferro_vmm::migration::recv::answer(&mut stream, Ok(()));
                    eprintln!(
                        "ferro-vmm: incoming migration from {} runs (built in {:.1} ms)",
                        got.peer,
                        started.elapsed().as_secs_f64() * 1000.0
                    );
                    (cfg, vm)
                }
                Err(e) => {
                    ferro_vmm::migration::recv::answer(&mut stream, Err(e.to_string()));
                    gone(&control);
                    return Err(e);
                }
            }
        }
        (Some(dir), None) => {
            let started = std::time::Instant::now();
            let snap = ferro_vmm::snapshot::load(dir)?;
            let mut cfg = snap.manifest.config.clone();
            if let Some(s) = &args.serial {
                cfg.serial = s.clone();
            }
            let vm = builder::restore(&cfg, &snap)?;
            eprintln!(
                "ferro-vmm: restored {} in {:.1} ms",
                dir.display(),
                started.elapsed().as_secs_f64() * 1000.0
            );
            (cfg, vm)
        }
        (None, None) => {
            let cfg = config(args)?;
            let opts = BuildOptions {
                protocol: if args.linux_boot {
                    BootProtocol::Linux
                } else {
                    BootProtocol::Auto
                },
            };
            let vm = builder::build(&cfg, opts)?;
            (cfg, vm)
        }
    };
    let boots = std::env::var(BOOT_ENV)
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(1);
    let control = match control {
        Some(c) => Some(c),
        None => args
            .control
            .as_deref()
            .map(ControlServer::bind)
            .transpose()?,
    };
    let end = runner::run(
        vm,
        RunOptions {
            console_input: cfg.serial == SerialMode::Stdio,
            control,
            memory_mib: cfg.memory_mib,
            boots,
            config: cfg.clone(),
        },
    )?;
    // Disks keep their contents across the guest's power-off or reboot.
    ferro_vmm::devices_block::flush_all();
    let mut control = end.control;
    if end.reason == ExitReason::Reboot && args.on_reboot == OnReboot::Restart {
        if let Some(c) = &mut control {
            c.announce(ControlEvent::Restart);
        }
        if let Some(c) = socket_console() {
            c.hand_over();
        }
        // A VM that came in by migration boots again from its configuration, not by waiting
        // for another migration.
        let migrated = args.incoming.is_some().then_some(&cfg);
        return Err(restart_in_place(boots + 1, migrated));
    }
    if let Some(c) = &mut control {
        c.announce(ControlEvent::Exit {
            reason: end.reason,
            code: end.status as i32,
        });
        let _ = std::fs::remove_file(c.path());
    }
    if let Some(c) = socket_console() {
        let _ = std::fs::remove_file(c.path());
    }
    Ok(end.status)
}

/// Executes this program again with the same arguments; returns only on failure. With
/// `config` (a VM that came in by migration), `--incoming` gives way to `--config
/// /proc/self/fd/N`, a JSON copy of `config` in a memory file (memfd) the new program inherits:
/// nothing is left on disk, and it lasts exactly as long as this process (and is still there
/// for the reboot after).
fn restart_in_place(boot: u32, config: Option<&VmConfig>) -> VmmError {
    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::os::unix::process::CommandExt;
    let mut argv = std::env::args_os();
    let arg0 = argv.next().unwrap_or_else(|| "ferro-vmm".into());
    let mut args: Vec<std::ffi::OsString> = argv.collect();
    if let Some(cfg) = config {
        let json = match serde_json::to_vec_pretty(cfg) {
            Ok(j) => j,
            Err(e) => return VmmError::Migration(format!("cannot save the configuration: {e}")),
        };
        // No MFD_CLOEXEC: the file is to survive the exec.
        // SAFETY: a NUL-terminated name and no flags; the result is checked below.
        let fd = unsafe { libc::memfd_create(c"ferro-vmm-config".as_ptr(), 0) };
        if fd < 0 {
            return VmmError::io("cannot save the configuration for the restart")(
                std::io::Error::last_os_error(),
            );
        }
        // SAFETY: `fd` was just created above and nothing else owns it.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        if let Err(e) = std::io::Write::write_all(&mut file, &json) {
            return VmmError::io("cannot save the configuration for the restart")(e);
        }
        // Left open for the new program (leaked on purpose: the exec takes it over).
        let path = format!("/proc/self/fd/{}", file.into_raw_fd());
        let mut kept = Vec::with_capacity(args.len());
        let mut skip = false;
        for a in args {
            if std::mem::take(&mut skip) {
                continue;
            }
            let text = a.to_string_lossy();
            if a == "--incoming" || a == "--incoming-storage" || a == "--incoming-token-file" {
                skip = true;
            } else if !text.starts_with("--incoming=")
                && !text.starts_with("--incoming-storage=")
                && !text.starts_with("--incoming-token-file=")
            {
                kept.push(a);
            }
        }
        kept.push("--config".into());
        kept.push(path.into());
        args = kept;
    }
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env(BOOT_ENV, boot.to_string())
        .exec();
    VmmError::io("cannot restart the VMM in place")(err)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let status = match run(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferro-vmm: {e}");
            ExitStatus::Error
        }
    };
    // vCPU threads may still be inside KVM_RUN; exiting the process ends them with the VM.
    ferro_vmm::teardown::exit(status as i32)
}
