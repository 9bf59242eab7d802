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
}

fn yes() -> bool {
    true
}

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmmRunState {
    /// vCPUs run.
    Running,
    /// vCPUs are parked.
    Paused,
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
        let err = ControlLine::Response(ControlResponse::Error {
            code: ControlErrorCode::UnknownCommand,
            message: "x".into(),
        });
        let text = serde_json::to_string(&err).unwrap();
        assert_eq!(serde_json::from_str::<ControlLine>(&text).unwrap(), err);
    }
}
