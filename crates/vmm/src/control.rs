//! `--control PATH`: the VMM's control socket (protocol in [`ferro_api::control`]).
//!
//! Served from the main thread's event loop without blocking: [`ControlServer::poll_fds`] adds
//! the listener and the clients to the poll set, [`ControlServer::handle`] accepts, reads whole
//! lines, answers each through a [`ControlTarget`], and queues the answers. The VM-facing side
//! (pause, power button, ...) lives behind that trait, so the protocol is testable without KVM.
//!
//! A long request (a migration) is answered later: the target says [`Applied::Later`], the
//! client's further lines wait unread in its buffer (answers stay in order), and
//! [`ControlServer::finish`] delivers the answer when the work has ended.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferro_api::control::{
    ControlErrorCode, ControlEvent, ControlLine, ControlRequest, ControlResponse, VmmStatus,
};

use crate::console_socket::bind_unix;
use crate::VmmError;

/// Longest request line accepted.
const MAX_LINE: usize = 64 * 1024;

/// What a request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Done: the answer is the status.
    Done,
    /// Done: the answer is the status and this console text.
    Console(String),
    /// Started: the answer comes through [`ControlServer::finish`].
    Later,
}

/// What the control socket acts on.
pub trait ControlTarget {
    /// The VM's state now.
    fn status(&self) -> VmmStatus;
    /// Handles a request other than `status`.
    fn apply(&mut self, req: &ControlRequest) -> Result<Applied, (ControlErrorCode, String)>;
}

struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Waits for the answer to a request [`Applied::Later`].
    waiting: bool,
}

/// The listening control socket and its clients.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    clients: Vec<Client>,
}

impl ControlServer {
    /// Listens on `path` (a stale socket file there is replaced).
    pub fn bind(path: &Path) -> Result<Self, VmmError> {
        Ok(Self {
            listener: bind_unix(path, "cannot listen on the control socket")?,
            path: path.to_path_buf(),
            clients: Vec::new(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends the descriptors to poll: the listener, then each client.
    pub fn poll_fds(&self, fds: &mut Vec<libc::pollfd>) {
        fds.push(libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        for c in &self.clients {
            let out = if c.output.is_empty() {
                0
            } else {
                libc::POLLOUT
            };
            fds.push(libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events: libc::POLLIN | out,
                revents: 0,
            });
        }
    }

    /// Handles what `poll` reported for the descriptors [`Self::poll_fds`] added.
    pub fn handle(&mut self, fds: &[libc::pollfd], target: &mut dyn ControlTarget) {
        for pfd in fds.iter().skip(1) {
            if pfd.revents == 0 {
                continue;
            }
            let Some(i) = self
                .clients
                .iter()
                .position(|c| c.stream.as_raw_fd() == pfd.fd)
            else {
                continue;
            };
            let alive = serve(&mut self.clients[i], pfd.revents, target);
            if !alive {
                self.clients.swap_remove(i);
            }
        }
        if fds.first().is_some_and(|l| l.revents & libc::POLLIN != 0) {
            while let Ok((stream, _)) = self.listener.accept() {
                if stream.set_nonblocking(true).is_ok() {
                    self.clients.push(Client {
                        stream,
                        input: Vec::new(),
                        output: Vec::new(),
                        waiting: false,
                    });
                }
            }
        }
    }

    /// Delivers the answer to the request that was [`Applied::Later`], then answers what that
    /// client sent meanwhile. An answer whose client has gone is dropped.
    pub fn finish(&mut self, resp: ControlResponse, target: &mut dyn ControlTarget) {
        let Some(i) = self.clients.iter().position(|c| c.waiting) else {
            return;
        };
        let c = &mut self.clients[i];
        c.waiting = false;
        c.output
            .extend_from_slice(&encode(&ControlLine::Response(resp)));
        if !serve(c, 0, target) {
            self.clients.swap_remove(i);
        }
    }

    /// Sends `event` to every client and waits briefly for it to leave (the process is about to
    /// exit or restart); clients that do not take it in time miss it.
    pub fn announce(&mut self, event: ControlEvent) {
        let line = encode(&ControlLine::Event(event));
        let deadline = Instant::now() + Duration::from_millis(200);
        for c in &mut self.clients {
            c.output.extend_from_slice(&line);
            while !c.output.is_empty() && Instant::now() < deadline {
                match c.stream.write(&c.output) {
                    Ok(n) if n > 0 => {
                        c.output.drain(..n);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    _ => break,
                }
            }
        }
    }
}

fn encode(line: &ControlLine) -> Vec<u8> {
    // Serialising these plain types cannot fail; fall back to an empty object just in case.
    let mut v = serde_json::to_vec(line).unwrap_or_else(|_| b"{}".to_vec());
    v.push(b'\n');
    v
}

/// Answers one line; `None` when the answer comes later ([`Applied::Later`]).
pub fn answer(line: &[u8], target: &mut dyn ControlTarget) -> Option<ControlResponse> {
    Some(match answer_now(line, target) {
        Ok(resp) => resp,
        Err(Later) => return None,
    })
}

/// The answer is deferred.
struct Later;

fn answer_now(line: &[u8], target: &mut dyn ControlTarget) -> Result<ControlResponse, Later> {
    let req = match serde_json::from_slice::<ControlRequest>(line) {
        Ok(r) => r,
        Err(e) => {
            let unknown = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("cmd").and_then(|c| c.as_str().map(str::to_string)));
            return Ok(match unknown {
                Some(cmd) if e.to_string().contains("unknown variant") => ControlResponse::Error {
                    code: ControlErrorCode::UnknownCommand,
                    message: format!("unknown command '{cmd}'"),
                },
                _ => ControlResponse::Error {
                    code: ControlErrorCode::BadRequest,
                    message: format!("expected one JSON request per line: {e}"),
                },
            });
        }
    };
    let console = match req {
        ControlRequest::Status => None,
        ref other => match target.apply(other) {
            Ok(Applied::Done) => None,
            Ok(Applied::Console(text)) => Some(text),
            Ok(Applied::Later) => return Err(Later),
            Err((code, message)) => return Ok(ControlResponse::Error { code, message }),
        },
    };
    Ok(ControlResponse::Ok {
        status: target.status(),
        console,
    })
}

/// Reads, answers and writes for one client; false when it is gone.
fn serve(c: &mut Client, revents: libc::c_short, target: &mut dyn ControlTarget) -> bool {
    if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
        let mut buf = [0u8; 4096];
        loop {
            match c.stream.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => c.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if c.input.len() > MAX_LINE && (c.waiting || !c.input.contains(&b'\n')) {
            return false;
        }
    }
    while !c.waiting {
        let Some(end) = c.input.iter().position(|&b| b == b'\n') else {
            break;
        };
        let line: Vec<u8> = c.input.drain(..=end).collect();
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        match answer(line, target) {
            Some(resp) => c
                .output
                .extend_from_slice(&encode(&ControlLine::Response(resp))),
            None => c.waiting = true,
        }
    }
    while !c.output.is_empty() {
        match c.stream.write(&c.output) {
            Ok(0) => return false,
            Ok(n) => {
                c.output.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferro_api::control::VmmRunState;

    struct Fake {
        paused: bool,
    }

    impl ControlTarget for Fake {
        fn status(&self) -> VmmStatus {
            VmmStatus {
                state: if self.paused {
                    VmmRunState::Paused
                } else {
                    VmmRunState::Running
                },
                pid: 1,
                vcpus: 2,
                memory_mib: 64,
                uptime_ms: 5,
                boots: 1,
                protocol: ferro_api::control::CONTROL_PROTOCOL_VERSION,
                migration: None,
                storage_synced: None,
            }
        }
        fn apply(&mut self, req: &ControlRequest) -> Result<Applied, (ControlErrorCode, String)> {
            match req {
                ControlRequest::Pause => self.paused = true,
                ControlRequest::Resume if !self.paused => {
                    return Err((ControlErrorCode::InvalidState, "not paused".into()))
                }
                ControlRequest::Resume => self.paused = false,
                ControlRequest::ConsoleLog => return Ok(Applied::Console("hi".into())),
                ControlRequest::Migrate { .. } => return Ok(Applied::Later),
                _ => {}
            }
            Ok(Applied::Done)
        }
    }

    #[test]
    fn answers() {
        let mut f = Fake { paused: false };
        assert!(matches!(
            answer_now(br#"{"cmd":"pause"}"#, &mut f),
            Ok(ControlResponse::Ok { status, .. }) if status.state == VmmRunState::Paused
        ));
        assert!(matches!(
            answer_now(br#"{"cmd":"resume"}"#, &mut f),
            Ok(ControlResponse::Ok { .. })
        ));
        assert!(matches!(
            answer_now(br#"{"cmd":"resume"}"#, &mut f),
            Ok(ControlResponse::Error {
                code: ControlErrorCode::InvalidState,
                ..
            })
        ));
        assert!(matches!(
            answer_now(br#"{"cmd":"teleport"}"#, &mut f),
            Ok(ControlResponse::Error {
                code: ControlErrorCode::UnknownCommand,
                ..
            })
        ));
        assert!(matches!(
            answer_now(b"not json", &mut f),
            Ok(ControlResponse::Error {
                code: ControlErrorCode::BadRequest,
                ..
            })
        ));
        assert!(matches!(
            answer_now(br#"{"cmd":"console_log"}"#, &mut f),
            Ok(ControlResponse::Ok { console: Some(t), .. }) if t == "hi"
        ));
    }

    /// A deferred answer keeps the client's order: what it sends meanwhile is answered after.
    #[test]
    fn a_later_answer_comes_first_then_the_rest() {
        let dir = std::env::temp_dir().join(format!("ferro-ctl-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("c.sock");
        let mut server = ControlServer::bind(&path).unwrap();
        let mut f = Fake { paused: false };
        let mut client = UnixStream::connect(&path).unwrap();
        client
            .write_all(b"{\"cmd\":\"migrate\",\"to\":\"h:1\"}\n{\"cmd\":\"pause\"}\n")
            .unwrap();
        let pump = |server: &mut ControlServer, f: &mut Fake| {
            for _ in 0..20 {
                let mut fds = Vec::new();
                server.poll_fds(&mut fds);
                // SAFETY: `fds` is a live array of `fds.len()` pollfd structures.
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
                server.handle(&fds, f);
            }
        };
        pump(&mut server, &mut f);
        assert!(!f.paused, "the pause was answered before the migration");
        server.finish(
            ControlResponse::Error {
                code: ControlErrorCode::Failed,
                message: "no".into(),
            },
            &mut f,
        );
        assert!(f.paused);
        pump(&mut server, &mut f);
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut text = String::new();
        let mut r = std::io::BufReader::new(&client);
        std::io::BufRead::read_line(&mut r, &mut text).unwrap();
        std::io::BufRead::read_line(&mut r, &mut text).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("\"error\""), "{text}");
        assert!(lines[1].contains("\"paused\""), "{text}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
