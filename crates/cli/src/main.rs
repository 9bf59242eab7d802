//! `ferro`: the command line of Ferrovisor. `ferro daemon` runs the host daemon; every other
//! command is a client of its REST API (the same calls the API exposes, through [`client`]).

#![deny(unsafe_code)]

mod client;
#[allow(unsafe_code)] // termios raw mode
mod console;
mod migrate;
mod output;
mod progress;
mod snapshot;
mod storage;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use ferro_api::rest::{CreateVm, EditVm, RestartPolicy};
use ferro_api::{parse_mib, DiskConfig, NetConfig};
use ferro_daemon::{DaemonConfig, Listen, DEFAULT_DATA_DIR, SOCKET_NAME};

use client::{Client, ClientError, Host};

/// Run virtual machines on this host.
#[derive(Parser, Debug)]
#[command(name = "ferro", version)]
struct Cli {
    /// The daemon: unix:PATH or http://HOST:PORT (default: $FERRO_HOST, else
    /// unix:/var/lib/ferro/ferro.sock).
    #[arg(long, global = true, env = "FERRO_HOST")]
    host: Option<String>,
    /// A file holding the bearer token of a daemon on TCP.
    #[arg(long, global = true, env = "FERRO_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the host daemon.
    Daemon {
        /// Database and VM files.
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// unix:PATH (default DATA_DIR/ferro.sock) or tcp:HOST:PORT (needs --token-file).
        #[arg(long)]
        listen: Option<Listen>,
        /// The ferro-vmm binary (default: next to this program).
        #[arg(long)]
        vmm: Option<PathBuf>,
        /// The host bridge the VMs' NICs go on (created when the first VM with a NIC starts).
        #[arg(long, default_value = ferro_daemon::net::DEFAULT_BRIDGE)]
        bridge: String,
        /// The bridge's address/prefix; the rest of the subnet is the VMs' address pool.
        #[arg(long, default_value = ferro_daemon::net::DEFAULT_BRIDGE_ADDR)]
        bridge_address: String,
        /// A file holding the bearer token sent to other daemons (migrations; default: the
        /// --token-file).
        #[arg(long)]
        peer_token_file: Option<PathBuf>,
    },
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Attach to a VM's serial console (detach with Ctrl-]).
    Console {
        /// The VM.
        name: String,
    },
    /// Disk images: import, list, delete.
    #[command(subcommand)]
    Image(storage::ImageCmd),
    /// Templates: read-only base disks VMs are made from as linked clones.
    #[command(subcommand)]
    Template(storage::TemplateCmd),
    /// Facts about the daemon.
    Info,
    /// Print a shell completion script (bash, zsh, fish, ...).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum VmCmd {
    /// Define a VM.
    Create {
        /// Its name.
        name: String,
        /// Kernel on this host.
        #[arg(long, required_unless_present_any = ["template", "spec"])]
        kernel: Option<PathBuf>,
        /// A spec file: the TOML or JSON `ferro-vmm --config` takes (kernel, initrd, cmdline,
        /// cpus, memory_mib, disks, nets); flags override it.
        #[arg(long)]
        spec: Option<PathBuf>,
        /// Initial ramdisk.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long)]
        cmdline: Option<String>,
        /// A template to create it from (its disks become linked clones of the template's).
        #[arg(long)]
        template: Option<String>,
        /// vCPUs.
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory: MiB (512) or with a suffix (512M, 2G).
        #[arg(long, value_parser = size)]
        memory: Option<u64>,
        /// A disk: path=FILE[,format=raw|qcow2][,readonly=on]. Repeatable.
        #[arg(long = "disk")]
        disks: Vec<DiskConfig>,
        /// A NIC: auto[,mac=MAC] (on the daemon's bridge, with an address from its pool), or
        /// tap=NAME[,mac=MAC] (your own tap). Repeatable.
        #[arg(long = "net")]
        nets: Vec<NetConfig>,
        /// Restart policy: never, on-failure, always.
        #[arg(long, default_value = "never")]
        restart: RestartPolicy,
        /// Start it right away.
        #[arg(long)]
        start: bool,
    },
    /// List VMs.
    List,
    /// Show one VM.
    Show {
        /// The VM.
        name: String,
    },
    /// Start a VM.
    Start {
        /// The VM.
        name: String,
    },
    /// Stop a VM: ACPI power button, then a forced stop after --timeout.
    Stop {
        /// The VM.
        name: String,
        /// Seconds to wait for the guest to power off.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// Stop it at once, without asking the guest.
        #[arg(long)]
        force: bool,
    },
    /// Reset a VM (it boots again).
    Reboot {
        /// The VM.
        name: String,
    },
    /// Pause a VM's vCPUs.
    Pause {
        /// The VM.
        name: String,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM.
        name: String,
    },
    /// Delete a VM.
    Delete {
        /// The VM.
        name: String,
        /// Stop it first if it runs.
        #[arg(long)]
        force: bool,
    },
    /// Change a stopped VM (the restart policy may change at any time).
    Edit {
        /// The VM.
        name: String,
        /// vCPUs.
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory.
        #[arg(long, value_parser = size)]
        memory: Option<u64>,
        /// Kernel command line.
        #[arg(long)]
        cmdline: Option<String>,
        /// Replace the disks (repeatable).
        #[arg(long = "disk")]
        disks: Vec<DiskConfig>,
        /// Remove every disk.
        #[arg(long, conflicts_with = "disks")]
        no_disks: bool,
        /// Replace the NICs (repeatable).
        #[arg(long = "net")]
        nets: Vec<NetConfig>,
        /// Remove every NIC.
        #[arg(long, conflicts_with = "nets")]
        no_nets: bool,
        /// Remove disk N (0 is the first; repeatable; before --add-disk).
        #[arg(long = "remove-disk", value_name = "N")]
        remove_disks: Vec<u32>,
        /// Append a disk: path=FILE[,format=raw|qcow2][,readonly=on] (repeatable).
        #[arg(long = "add-disk", value_name = "DISK")]
        add_disks: Vec<DiskConfig>,
        /// Remove NIC N (0 is the first; repeatable; before --add-net). Its MAC and address
        /// go back to the pool.
        #[arg(long = "remove-net", value_name = "N")]
        remove_nets: Vec<u32>,
        /// Append a NIC: auto[,mac=MAC] or tap=NAME[,mac=MAC] (repeatable).
        #[arg(long = "add-net", value_name = "NIC")]
        add_nets: Vec<NetConfig>,
        /// Restart policy.
        #[arg(long)]
        restart: Option<RestartPolicy>,
    },
    /// A VM's event log.
    Events {
        /// The VM.
        name: String,
    },
    /// A VM's recent console output.
    Log {
        /// The VM.
        name: String,
    },
    /// Snapshots: `snapshot NAME --name SNAP` of a stopped VM's disks, `--memory` of a
    /// running VM's memory, devices and disks; list, revert, delete.
    Snapshot(snapshot::SnapshotArgs),
    /// Run a stopped VM from a memory snapshot: its guest carries on where it was saved.
    Restore(snapshot::RestoreArgs),
    /// Live-migrate a running VM to another daemon (disks on shared storage, or copied along
    /// with --copy-storage).
    Migrate(migrate::MigrateArgs),
    /// Clone a stopped VM: a full copy, or with --linked qcow2 overlays (the source's disks
    /// become read-only bases under overlays of its own).
    Clone {
        /// Source VM.
        src: String,
        /// New VM.
        dst: String,
        /// A linked clone (qcow2 overlay).
        #[arg(long)]
        linked: bool,
    },
}

fn size(s: &str) -> Result<u64, String> {
    parse_mib(s).map_err(|e| e.to_string())
}

fn client(cli: &Cli) -> Result<Client> {
    let host: Host = match &cli.host {
        Some(h) => h.parse()?,
        None => Host::Unix(PathBuf::from(DEFAULT_DATA_DIR).join(SOCKET_NAME)),
    };
    let token = match &cli.token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read token file {}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    Ok(Client::new(host, token))
}

fn daemon(
    data_dir: PathBuf,
    listen: Option<Listen>,
    vmm: Option<PathBuf>,
    (token_file, peer_token_file): (Option<PathBuf>, Option<PathBuf>),
    net: ferro_daemon::net::NetSettings,
) -> Result<()> {
    let vmm = match vmm {
        Some(v) => v,
        None => std::env::current_exe()
            .context("cannot find this program's path")?
            .with_file_name("ferro-vmm"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(ferro_daemon::run(DaemonConfig {
        data_dir,
        listen,
        token_file,
        peer_token_file,
        vmm,
        net,
    }))?;
    Ok(())
}

/// The create request `ferro vm create` sends: the spec file, then the flags over it.
fn create_request(cmd: &VmCmd) -> Result<CreateVm> {
    let VmCmd::Create {
        name,
        kernel,
        spec,
        initrd,
        cmdline,
        template,
        cpus,
        memory,
        disks,
        nets,
        restart,
        start,
    } = cmd
    else {
        bail!("not a create command");
    };
    let mut cfg = match spec {
        Some(path) => ferro_api::VmConfig::from_file(path)?,
        None => ferro_api::VmConfig::new(PathBuf::new()),
    };
    if let Some(k) = kernel {
        cfg.kernel = k.clone();
    }
    if let Some(i) = initrd {
        cfg.initrd = Some(i.clone());
    }
    if let Some(c) = cmdline {
        cfg.cmdline = c.clone();
    }
    cfg.disks.extend(disks.iter().cloned());
    cfg.nets.extend(nets.iter().cloned());
    // The daemon resolves paths on its own host: make relative ones absolute here.
    let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
    for d in &mut cfg.disks {
        d.path = abs(&d.path);
    }
    Ok(CreateVm {
        name: name.clone(),
        kernel: abs(&cfg.kernel),
        initrd: cfg.initrd.as_ref().map(abs),
        cmdline: cfg.cmdline,
        cpus: cpus.or(spec.is_some().then_some(cfg.cpus)),
        memory_mib: memory.or(spec.is_some().then_some(cfg.memory_mib)),
        disks: cfg.disks,
        nets: cfg.nets,
        restart: *restart,
        start: *start,
        template: template.clone(),
    })
}

async fn vm(cli: &Cli, c: &Client, cmd: &VmCmd) -> Result<()> {
    let json = cli.json;
    let one = |vm: ferro_api::rest::Vm| output::vm(&vm, json);
    match cmd {
        VmCmd::Create { .. } => one(c.create_vm(&create_request(cmd)?).await?),
        VmCmd::List => output::vms(&c.list_vms().await?, json),
        VmCmd::Show { name } => one(c.get_vm(name).await?),
        VmCmd::Start { name } => one(c.action(name, "start").await?),
        VmCmd::Stop {
            name,
            timeout,
            force,
        } => one(c
            .action(name, &format!("stop?timeout={timeout}&force={force}"))
            .await?),
        VmCmd::Reboot { name } => one(c.action(name, "reboot").await?),
        VmCmd::Pause { name } => one(c.action(name, "pause").await?),
        VmCmd::Resume { name } => one(c.action(name, "resume").await?),
        VmCmd::Delete { name, force } => {
            c.delete_vm(name, *force).await?;
            if json {
                println!("{{}}");
            } else {
                println!("deleted {name}");
            }
            Ok(())
        }
        VmCmd::Edit {
            name,
            cpus,
            memory,
            cmdline,
            disks,
            no_disks,
            nets,
            no_nets,
            remove_disks,
            add_disks,
            remove_nets,
            add_nets,
            restart,
        } => {
            let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
            let absolute = |list: &[DiskConfig]| -> Vec<DiskConfig> {
                list.iter()
                    .cloned()
                    .map(|mut d| {
                        d.path = abs(&d.path);
                        d
                    })
                    .collect()
            };
            let disks = absolute(disks);
            let req = EditVm {
                cpus: *cpus,
                memory_mib: *memory,
                cmdline: cmdline.clone(),
                disks: if *no_disks {
                    Some(Vec::new())
                } else {
                    (!disks.is_empty()).then(|| disks.clone())
                },
                nets: if *no_nets {
                    Some(Vec::new())
                } else {
                    (!nets.is_empty()).then(|| nets.clone())
                },
                restart: *restart,
                remove_disks: remove_disks.clone(),
                add_disks: absolute(add_disks),
                remove_nets: remove_nets.clone(),
                add_nets: add_nets.clone(),
            };
            if req == EditVm::default() {
                bail!("nothing to change: give at least one of --cpus, --memory, --cmdline, --add-disk, --remove-disk, --add-net, --remove-net, --restart");
            }
            one(c.edit_vm(name, &req).await?)
        }
        VmCmd::Snapshot(a) => snapshot::run(c, a, json).await,
        VmCmd::Restore(a) => snapshot::restore(c, a, json).await,
        VmCmd::Migrate(a) => migrate::run(c, a, json).await,
        VmCmd::Events { name } => output::events(&c.events(name).await?, json),
        VmCmd::Log { name } => {
            print!("{}", c.log(name).await?);
            Ok(())
        }
        VmCmd::Clone { src, dst, linked } => {
            let req = ferro_api::storage::CloneVm {
                name: dst.clone(),
                linked: *linked,
            };
            if *linked {
                return one(c.clone_vm(src, &req).await?);
            }
            let op = c.clone_vm_async(src, &req).await?;
            let label = format!("copying the disks of {src}");
            one(progress::wait(c, op, &label, json).await?)
        }
    }
}

async fn client_main(cli: &Cli) -> Result<()> {
    let c = client(cli)?;
    match &cli.cmd {
        Cmd::Vm(cmd) => vm(cli, &c, cmd).await,
        Cmd::Console { name } => console::attach(&c, name).await,
        Cmd::Info => {
            let h = c.host().await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&h)?);
            } else {
                println!(
                    "version {}, data dir {}, {} VMs, schema {}, bridge {} {}",
                    h.version,
                    h.data_dir.display(),
                    h.vms,
                    h.schema_version,
                    h.bridge,
                    h.bridge_address
                );
            }
            Ok(())
        }
        Cmd::Image(cmd) => storage::run(&c, cmd, cli.json).await,
        Cmd::Template(cmd) => storage::template(&c, cmd, cli.json).await,
        Cmd::Daemon { .. } | Cmd::Completions { .. } => Ok(()),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Daemon {
            data_dir,
            listen,
            vmm,
            bridge,
            bridge_address,
            peer_token_file,
        } => {
            let net = ferro_daemon::net::NetSettings::new(&bridge, &bridge_address)
                .map_err(|e| anyhow::anyhow!("--bridge/--bridge-address: {e}"))?;
            daemon(
                data_dir,
                listen,
                vmm,
                (cli.token_file, peer_token_file),
                net,
            )
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "ferro", &mut std::io::stdout());
            Ok(())
        }
        _ => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(3600), client_main(&cli))
                    .await
                    .context("timed out")?
            })
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<ClientError>() {
                Some(ClientError::Api { code, message, .. }) => {
                    eprintln!("ferro: {message} [{code}]")
                }
                _ => eprintln!("ferro: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}
