//! The daemon's REST API (`/v1/...`): request and response bodies, shared by the server, the
//! typed client and the `ferro` CLI. The OpenAPI document is generated from these types.
//!
//! Additions are append-only: new optional request fields, new response fields, new routes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::devices::{DiskConfig, NetConfig};

/// Where a VM is in its life. Transitions are checked against [`VmState::can_become`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Defined, no VMM process.
    Stopped,
    /// A VMM process runs the guest.
    Running,
    /// A VMM process holds the guest with its vCPUs parked.
    Paused,
    /// The VMM died unexpectedly and the restart policy did not (or no longer) restart it.
    Crashed,
    /// On a migration's destination: a `ferro-vmm --incoming` waits for or receives the VM;
    /// the source's daemon makes it running when the migration completed (or removes it).
    Incoming,
}

impl VmState {
    /// The lifecycle table: whether a VM in `self` may move to `next`.
    ///
    /// | from \ to | stopped | running | paused | crashed |
    /// | --- | --- | --- | --- | --- |
    /// | stopped | | start | | |
    /// | running | stop, power-off | reboot (in place) | pause | VMM died |
    /// | paused | stop | resume | | VMM died |
    /// | crashed | stop (acknowledge) | start, restart policy | | |
    /// | incoming | | migration completed | migration completed | |
    ///
    /// An incoming VM whose migration fails is removed, not moved to another state.
    pub fn can_become(self, next: VmState) -> bool {
        use VmState::*;
        matches!(
            (self, next),
            (Stopped, Running)
                | (Running, Stopped | Running | Paused | Crashed)
                | (Paused, Stopped | Running | Crashed)
                | (Crashed, Stopped | Running)
                | (Incoming, Running | Paused)
        )
    }

    /// Whether a VMM process exists in this state.
    pub fn has_vmm(self) -> bool {
        matches!(self, VmState::Running | VmState::Paused | VmState::Incoming)
    }

    /// The lowercase name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Crashed => "crashed",
            VmState::Incoming => "incoming",
        }
    }

    /// Parses [`Self::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Stopped,
            Self::Running,
            Self::Paused,
            Self::Crashed,
            Self::Incoming,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// What the daemon does when a VM's VMM ends without being asked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Leave it: a failure leaves the VM `crashed`, a power-off `stopped`.
    #[default]
    Never,
    /// Restart after a failure (non-zero exit, killed), not after the guest powers off.
    OnFailure,
    /// Restart after a failure and after the guest powers off (not after `stop`).
    Always,
}

impl RestartPolicy {
    /// The name used on the wire and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Never => "never",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
        }
    }
}

impl std::str::FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" => Ok(Self::Never),
            "on-failure" => Ok(Self::OnFailure),
            "always" => Ok(Self::Always),
            _ => Err(format!("'{s}' is not one of never, on-failure, always")),
        }
    }
}

/// `POST /v1/vms`: define a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// Unique name: 1 to 63 of `a-z A-Z 0-9 - _ .`, not starting with `.` or `-`.
    pub name: String,
    /// Kernel file on the host (PVH ELF, vmlinux or bzImage); may be left out with a
    /// `template` that has one.
    #[serde(default)]
    #[schema(value_type = String)]
    pub kernel: PathBuf,
    /// Initial ramdisk on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// vCPUs (1..=32, default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory in MiB (16 MiB .. 1 TiB, default 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// virtio-blk disks, as `ferro-vmm --disk` takes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs, as `ferro-vmm --net` takes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    pub nets: Vec<NetConfig>,
    /// Restart policy (default never).
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Start it right after creating it.
    #[serde(default)]
    pub start: bool,
    /// A template to make it from: its disks become qcow2 overlays on the template's bases
    /// (first), and its kernel, initrd, command line, CPUs and memory fill what is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

/// `PATCH /v1/vms/{name}`: change a stopped VM (the restart policy may change at any time).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditVm {
    /// New vCPU count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// New memory size in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// New kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Replaces the disk list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub disks: Option<Vec<DiskConfig>>,
    /// Replaces the NIC list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub nets: Option<Vec<NetConfig>>,
    /// New restart policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
    /// Disks to remove, by index in the current list (0 is the first); applied before
    /// `add_disks`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_disks: Vec<u32>,
    /// Disks to append.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    pub add_disks: Vec<DiskConfig>,
    /// NICs to remove, by index in the current list; applied before `add_nets`. Their MAC
    /// and address go back to the pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_nets: Vec<u32>,
    /// NICs to append (`{}` is a NIC on the daemon's bridge).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    pub add_nets: Vec<NetConfig>,
}

/// One NIC of a VM as the daemon placed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Nic {
    /// Its index among the VM's NICs (the guest's eth0 is 0).
    pub index: u32,
    /// The guest's MAC, unique among the daemon's VMs.
    pub mac: String,
    /// The host tap: the one the daemon names for a NIC on its bridge, or the one configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// The bridge the tap is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// The IPv4 address with prefix length (`10.77.0.2/24`) a NIC on the daemon's bridge got
    /// from the bridge's pool; given to the guest on its command line (NIC 0 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// A VM as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    /// Its name.
    pub name: String,
    /// Lifecycle state.
    pub state: VmState,
    /// Process id of its VMM while one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Automatic restarts so far.
    pub restarts: u32,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Kernel file.
    #[schema(value_type = String)]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Disks.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub disks: Vec<DiskConfig>,
    /// NICs.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub nets: Vec<NetConfig>,
    /// The NICs as placed on the host: MAC, tap, bridge and IPv4 address.
    #[serde(default)]
    pub nics: Vec<Nic>,
    /// The VMM's console socket (local clients may attach to it directly).
    #[schema(value_type = String)]
    pub console_socket: PathBuf,
    /// Creation time, Unix milliseconds.
    pub created_ms: u64,
}

/// One entry of a VM's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmEvent {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// Machine-readable kind: created, started, stopped, powered_off, crashed, restarted, ...
    pub kind: String,
    /// A sentence for people.
    pub message: String,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiErrorBody {
    /// Machine-readable: bad_request, not_found, conflict, invalid_state, unauthorized,
    /// not_implemented, vmm_failed, internal, ...
    pub code: String,
    /// What went wrong and, where there is one, what to do.
    pub message: String,
}

/// `GET /v1/host`: what the daemon is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostInfo {
    /// Daemon version.
    pub version: String,
    /// The data directory.
    #[schema(value_type = String)]
    pub data_dir: PathBuf,
    /// VMs defined.
    pub vms: u32,
    /// Database schema version.
    pub schema_version: u32,
    /// The host bridge NICs go on (created when the first VM with such a NIC starts).
    #[serde(default)]
    pub bridge: String,
    /// The bridge's address and prefix (its pool is the rest of that subnet).
    #[serde(default)]
    pub bridge_address: String,
}

/// Whether a long operation still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    /// Still working.
    Running,
    /// Done: `result` holds what the synchronous call would have returned.
    Succeeded,
    /// Failed: `error` says why; nothing was left behind.
    Failed,
}

/// A long operation (an image import, a full clone) started with `?async=true`: a 202 with
/// this body and `Location: /v1/operations/{id}`, to poll until it is no longer running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Operation {
    /// Its id.
    pub id: u64,
    /// `image_import` or `vm_clone`.
    pub kind: String,
    /// What it works on (the image's or the new VM's name).
    pub target: String,
    /// Running, succeeded or failed.
    pub state: OperationState,
    /// Percent done, 0 to 100.
    pub progress: f64,
    /// What it is doing now, for people.
    pub message: String,
    /// On success, the body the synchronous call returns (an `Image`, a `Vm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    /// On failure, the error the synchronous call returns, with its HTTP status in `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiErrorBody>,
    /// On failure, the HTTP status the synchronous call would have returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Start time, Unix ms.
    pub started_ms: u64,
}

/// `POST /v1/vms/{name}/migrate`: live-migrate a running VM to another daemon (its disks must
/// be at the same paths there: shared storage). Answers 202 with an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateVm {
    /// The destination daemon's API, `http://HOST:PORT` (it listens on TCP; this daemon sends
    /// its peer token). The VM's memory goes to HOST too.
    pub to: String,
    /// The longest pause of the guest to aim for, ms (default: the VMM's, 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Copy rounds before the guest is paused anyway (default: the VMM's, 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rounds: Option<u32>,
    /// Storage migration (no shared storage): the disks, kernel and initrd go with the VM,
    /// the disks copied while the guest runs with their own write tracking; they land in the
    /// destination daemon's folder for the VM, and the disk files this daemon kept in its
    /// own folder for the VM are deleted once the destination has taken the VM over.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub copy_storage: bool,
}

/// `POST /v1/migrations/incoming` (daemon to daemon): define VM `name` in state `incoming`
/// and start a `ferro-vmm --incoming` for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncomingVm {
    /// The VM's name (must be free here).
    pub name: String,
    /// Its definition on the source (`ferro-vmm --config`'s fields); kernel, initrd and disks
    /// must be at the same paths here, unless `copy_storage`.
    #[schema(value_type = Object)]
    pub config: crate::VmConfig,
    /// The source copies the disks, kernel and initrd: they are written into this daemon's
    /// folder for the VM (`VmConfig::relocated`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub copy_storage: bool,
    /// Its restart policy.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// The address the incoming VMM listens on (the host the source reached this daemon at;
    /// default 0.0.0.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The source daemon, for the event log.
    #[serde(default)]
    pub from: String,
    /// The NICs as the source placed them (MAC, tap, address): the running guest keeps
    /// them, so the destination records the same where they are free here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Nic>,
}

/// The answer to [`IncomingVm`]: where the source's VMM sends the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IncomingMigration {
    /// The VM.
    pub vm: String,
    /// `HOST:PORT` the incoming VMM listens on.
    pub address: String,
    /// The one-time token the source's VMM must send first (`"token"` of its `migrate`
    /// request); the incoming VMM turns away connections without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// What a migration did: the result of a `vm_migrate` operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MigrationResult {
    /// The VM (now the destination's).
    pub vm: String,
    /// The destination daemon.
    pub to: String,
    /// Copy rounds, the stop-and-copy round included.
    pub rounds: u32,
    /// Bytes the VMM sent.
    pub bytes: u64,
    /// The VMM's migration time, ms.
    pub total_ms: u64,
    /// How long the guest was paused (pause to the destination's ACK), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// The whole operation on the source daemon (the destination's set-up included), ms.
    pub daemon_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_table() {
        use VmState::*;
        assert!(Stopped.can_become(Running));
        assert!(!Stopped.can_become(Paused));
        assert!(!Stopped.can_become(Crashed));
        assert!(Running.can_become(Paused));
        assert!(!Paused.can_become(Paused));
        assert!(Crashed.can_become(Running));
        assert!(!Crashed.can_become(Paused));
        assert!(Incoming.can_become(Running) && !Incoming.can_become(Stopped));
        assert!(Incoming.has_vmm());
        for s in [Stopped, Running, Paused, Crashed, Incoming] {
            assert_eq!(VmState::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn create_rejects_unknown_fields() {
        assert!(serde_json::from_str::<CreateVm>(r#"{"name":"a","kernel":"/k","cpu":2}"#).is_err());
        let c: CreateVm = serde_json::from_str(r#"{"name":"a","kernel":"/k"}"#).unwrap();
        assert_eq!(c.restart, RestartPolicy::Never);
        assert_eq!(
            serde_json::to_string(&RestartPolicy::OnFailure).unwrap(),
            "\"on-failure\""
        );
    }
}
