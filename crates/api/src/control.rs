//! The VMM control protocol: what `ferro-vmm --control PATH` speaks on its unix socket.
//!
//! One JSON object per line in each direction. A client sends a [`ControlRequest`] and reads one
//! [`ControlResponse`] per request, in order. Besides responses, the VMM may send
//! [`ControlEvent`] lines at any time (they carry an `"event"` key; responses carry `"result"`);
//! the last line a client ever reads from a VMM that ends in an orderly way is
//! [`ControlEvent::Exit`]. A connection that closes without it means the VMM was killed.
//!
//! Additions are append-only: new commands, new optional fields. A VMM answers a command it does
//! not know with [`ControlErrorCode::UnknownCommand`], so a newer daemon can probe an older VMM.

use serde::{Deserialize, Serialize};

/// Version of this protocol, reported in [`VmmStatus::protocol`].
pub const CONTROL_PROTOCOL_VERSION: u32 = 1;

/// A request to the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// The VM's state, vCPUs, memory and uptime.
    Status,
    /// Stop every vCPU (the VM keeps its memory and devices).
    Pause,
    /// Let paused vCPUs run again.
    Resume,
    /// Press the ACPI power button: an ACPI guest shuts down in an orderly way and powers off.
    Shutdown,
    /// Reset the machine now, like the reset button: with `--on-reboot restart` the VMM starts
    /// the guest again in place (same process), otherwise it ends with status 0.
    Reset,
    /// End the VM now, without asking the guest (the VMM exits with status 0).
    Quit,
    /// The console's recent output (the ring buffer of `--serial socket:PATH`), as text.
    ConsoleLog,
    /// Pause the vCPUs, write the whole VM to the snapshot directory `dir` (created if
    /// missing; a snapshot already there is replaced) and, unless `resume` is false, let the VM
    /// run again. `ferro-vmm --restore DIR` runs the VM from it.
    Snapshot {
        /// The snapshot directory.
        dir: std::path::PathBuf,
        /// Resume the VM afterwards (default true); a VM paused before stays paused.
        #[serde(default = "yes")]
        resume: bool,
    },
    /// Live-migrate the running VM to a `ferro-vmm --incoming tcp:HOST:PORT` at `to`
    /// (pre-copy: memory is copied while the guest runs, then the vCPUs stop for the last
    /// dirty pages and the machine state). The answer comes when the migration has ended: on
    /// success `status.migration` holds the figures and the VMM then exits with status 0
    /// ([`ExitReason::Migrated`]); on failure an error, and the VM runs on here as before.
    /// While it runs, `status` says [`VmmRunState::Migrating`] with [`VmmStatus::migration`],
    /// and `pause`, `resume`, `snapshot` and another `migrate` are refused. A paused VM is
    /// migrated as it is and runs on the destination (the machine state carries no pause).
    Migrate {
        /// The destination, `HOST:PORT` (a `tcp:` prefix is accepted).
        to: String,
        /// The longest pause of the guest to aim for, in milliseconds (default 50): copy rounds
        /// go on until the dirty pages left can be sent in this time at the measured bandwidth.
        #[serde(default = "default_downtime_ms")]
        downtime_ms: u64,
        /// Stop iterating after this many copy rounds and pause anyway (default 30).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_rounds: Option<u32>,
        /// Storage migration: copy the disks (with their own write tracking, while the guest
        /// runs), the kernel and the initrd too, for a destination that does not see them
        /// (`ferro-vmm --incoming ... --incoming-storage DIR`). Default false: shared storage.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        copy_storage: bool,
        /// The destination's one-time migration token (`--incoming-token-file`), sent first.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn yes() -> bool {
    true
}

fn default_downtime_ms() -> u64 {
    DEFAULT_DOWNTIME_MS
}

/// The downtime a `migrate` request aims for when it names none.
pub const DEFAULT_DOWNTIME_MS: u64 = 50;
/// The copy rounds a `migrate` request allows when it names no `max_rounds`.
pub const DEFAULT_MAX_ROUNDS: u32 = 30;

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmmRunState {
    /// vCPUs run.
    Running,
    /// vCPUs are parked.
    Paused,
    /// `ferro-vmm --incoming`: waiting for or receiving a migrating VM; nothing runs yet.
    Incoming,
    /// The VM runs while it is being migrated away (`status.migration` says how far).
    Migrating,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Destination: listening, or receiving the stream.
    Receiving,
    /// Source: copying memory while the guest runs.
    Precopy,
    /// Source: the vCPUs are paused; the last pages and the machine state are on their way.
    StopAndCopy,
    /// Done: the destination runs the VM.
    Completed,
    /// Failed; the VM runs on here.
    Failed,
}

/// Progress and figures of a migration, in [`VmmStatus::migration`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// Where it is; `None` only in a default value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationPhase>,
    /// The peer: the destination's address on the source, the source's on the destination.
    #[serde(default)]
    pub peer: String,
    /// Copy rounds finished (round 0 sends all memory; each later one the pages dirtied
    /// meanwhile; the stop-and-copy round is counted too).
    #[serde(default)]
    pub rounds: u32,
    /// Bytes sent (source) or received (destination) so far.
    #[serde(default)]
    pub bytes: u64,
    /// Pages with data sent or received so far (zero pages travel as ranges, not counted).
    #[serde(default)]
    pub pages: u64,
    /// Source: dirty pages left to send, as of the last round.
    #[serde(default)]
    pub remaining_dirty_pages: u64,
    /// Storage migration: bytes of disk contents and of the kernel and initrd files sent or
    /// received so far (part of `bytes`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub disk_bytes: u64,
    /// Storage migration, source: bytes of disk blocks written since they were sent, as of
    /// the last round.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub remaining_dirty_disk_bytes: u64,
    /// Source: bandwidth measured in the last round, bytes per second.
    #[serde(default)]
    pub bandwidth_bps: u64,
    /// Milliseconds since the migration started.
    #[serde(default)]
    pub total_ms: u64,
    /// Source, once paused: milliseconds from pausing the vCPUs to the destination's ACK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Source, once paused: dirty pages sent in the stop-and-copy round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_dirty_pages: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the VMM reports about its VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmStatus {
    /// Running or paused.
    pub state: VmmRunState,
    /// The VMM's process id.
    pub pid: u32,
    /// vCPU count.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Milliseconds since this boot of the guest started.
    pub uptime_ms: u64,
    /// Boots of the guest in this process: 1, plus one per in-place restart.
    pub boots: u32,
    /// [`CONTROL_PROTOCOL_VERSION`] of the VMM.
    pub protocol: u32,
    /// The migration under way or the last one that ended (absent when there was none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
    /// The destination of a storage migration: whether the copied disks, kernel and initrd
    /// are written back to this host's disk yet (absent: this VMM took no storage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_synced: Option<bool>,
}

/// Machine-readable reasons a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlErrorCode {
    /// The line is not JSON or not a request object.
    BadRequest,
    /// A command this VMM does not have.
    UnknownCommand,
    /// The command does not apply now (e.g. resume while running).
    InvalidState,
    /// The VMM tried and failed.
    Failed,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ControlResponse {
    /// Done.
    Ok {
        /// The state after the request.
        status: VmmStatus,
        /// For [`ControlRequest::ConsoleLog`]: the console output (invalid UTF-8 replaced).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        console: Option<String>,
    },
    /// Not done.
    Error {
        /// What kind of failure.
        code: ControlErrorCode,
        /// A sentence for people.
        message: String,
    },
}

/// How a VMM ended, as it tells its clients before it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest reset the machine and the VMM does not restart in place.
    Reboot,
    /// A `quit` request.
    Quit,
    /// A triple fault.
    TripleFault,
    /// The guest kernel panicked.
    Panic,
    /// KVM could not run the guest.
    KvmFailure,
    /// SIGINT, SIGTERM or Ctrl-A x.
    Signal,
    /// A host error.
    Error,
    /// The VM was migrated away: the destination runs it now.
    Migrated,
}

/// Something the VMM announces without being asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ControlEvent {
    /// The VMM is about to exit with `code`.
    Exit {
        /// Why.
        reason: ExitReason,
        /// Its exit status.
        code: i32,
    },
    /// The guest reset the machine and the VMM restarts it in place (the connection closes).
    Restart,
}

/// Any line a VMM sends.
// One value per line read from a socket, never stored in bulk: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ControlLine {
    /// An answer.
    Response(ControlResponse),
    /// An announcement.
    Event(ControlEvent),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_forms() {
        let r: ControlRequest = serde_json::from_str(r#"{"cmd":"pause"}"#).unwrap();
        assert_eq!(r, ControlRequest::Pause);
        assert_eq!(
            serde_json::to_string(&ControlRequest::ConsoleLog).unwrap(),
            r#"{"cmd":"console_log"}"#
        );
        assert!(serde_json::from_str::<ControlRequest>(r#"{"cmd":"fly"}"#).is_err());
        let r: ControlRequest = serde_json::from_str(r#"{"cmd":"snapshot","dir":"/s"}"#).unwrap();
        assert_eq!(
            r,
            ControlRequest::Snapshot {
                dir: "/s".into(),
                resume: true
            }
        );
        assert!(serde_json::from_str::<ControlRequest>(r#"{"cmd":"snapshot"}"#).is_err());
        let e = ControlLine::Event(ControlEvent::Exit {
            reason: ExitReason::PowerOff,
            code: 0,
        });
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(text, r#"{"event":"exit","reason":"power_off","code":0}"#);
        assert_eq!(serde_json::from_str::<ControlLine>(&text).unwrap(), e);
        let r: ControlRequest =
            serde_json::from_str(r#"{"cmd":"migrate","to":"10.0.0.2:4444"}"#).unwrap();
        assert_eq!(
            r,
            ControlRequest::Migrate {
                to: "10.0.0.2:4444".into(),
                downtime_ms: DEFAULT_DOWNTIME_MS,
                max_rounds: None,
                copy_storage: false,
                token: None,
            }
        );
        let m = ControlRequest::Migrate {
            to: "h:1".into(),
            downtime_ms: 20,
            max_rounds: Some(5),
            copy_storage: true,
            token: None,
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(
            text,
            r#"{"cmd":"migrate","to":"h:1","downtime_ms":20,"max_rounds":5,"copy_storage":true}"#
        );
        assert_eq!(serde_json::from_str::<ControlRequest>(&text).unwrap(), m);
        assert!(serde_json::from_str::<ControlRequest>(r#"{"cmd":"migrate"}"#).is_err());
        let e = ControlEvent::Exit {
            reason: ExitReason::Migrated,
            code: 0,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"event":"exit","reason":"migrated","code":0}"#
        );
        let err = ControlLine::Response(ControlResponse::Error {
            code: ControlErrorCode::UnknownCommand,
            message: "x".into(),
        });
        let text = serde_json::to_string(&err).unwrap();
        assert_eq!(serde_json::from_str::<ControlLine>(&text).unwrap(), err);
    }

    #[test]
    fn status_with_and_without_migration() {
        let mut s = VmmStatus {
            state: VmmRunState::Migrating,
            pid: 7,
            vcpus: 1,
            memory_mib: 64,
            uptime_ms: 3,
            boots: 1,
            protocol: CONTROL_PROTOCOL_VERSION,
            migration: None,
            storage_synced: None,
        };
        let text = serde_json::to_string(&s).unwrap();
        assert!(!text.contains("migration"), "{text}");
        assert!(!text.contains("storage_synced"), "{text}");
        assert!(text.contains(r#""state":"migrating""#), "{text}");
        assert_eq!(serde_json::from_str::<VmmStatus>(&text).unwrap(), s);
        s.migration = Some(MigrationStatus {
            phase: Some(MigrationPhase::StopAndCopy),
            peer: "h:1".into(),
            rounds: 3,
            bytes: 1 << 20,
            downtime_ms: Some(12),
            ..Default::default()
        });
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains(r#""phase":"stop_and_copy""#), "{text}");
        assert_eq!(serde_json::from_str::<VmmStatus>(&text).unwrap(), s);
        // An older VMM's status (no migration field) still parses.
        let old = r#"{"state":"running","pid":1,"vcpus":1,"memory_mib":8,"uptime_ms":1,"boots":1,"protocol":1}"#;
        assert_eq!(
            serde_json::from_str::<VmmStatus>(old).unwrap().migration,
            None
        );
    }
}
