//! `--serial socket:PATH`: COM1 on a unix socket that survives its clients.
//!
//! The VMM keeps the last [`RING_BYTES`] of output in a ring buffer. Each client that connects
//! first receives the ring's contents, then the output as it comes; bytes a client sends go to
//! COM1's input. Any number of clients may be attached (a supervisor that follows the log and an
//! operator's terminal). A client that falls more than [`PEER_BACKLOG`] bytes behind is dropped.
//!
//! Output is written by vCPU threads (through [`SocketConsole::writer`]); the main thread's event
//! loop accepts clients and reads their input ([`SocketConsole::poll_fds`], [`SocketConsole::handle`]).
//! When the VMM restarts in place on a guest reboot, the ring is handed to the next process
//! through `PATH.replay`.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::VmmError;

/// Bytes of recent output kept for clients that connect later.
pub const RING_BYTES: usize = 64 * 1024;
/// Bytes a client may lag behind before it is dropped.
pub const PEER_BACKLOG: usize = 1 << 20;

/// A byte ring that keeps the newest `cap` bytes.
#[derive(Debug)]
pub struct Ring {
    buf: VecDeque<u8>,
    cap: usize,
}

impl Ring {
    /// An empty ring of `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            buf: VecDeque::with_capacity(cap),
            cap,
        }
    }

    /// Appends `data`, dropping the oldest bytes beyond the capacity.
    pub fn push(&mut self, data: &[u8]) {
        let data = &data[data.len().saturating_sub(self.cap)..];
        let excess = (self.buf.len() + data.len()).saturating_sub(self.cap);
        self.buf.drain(..excess);
        self.buf.extend(data);
    }

    /// The bytes held, oldest first.
    pub fn contents(&self) -> Vec<u8> {
        self.buf.iter().copied().collect()
    }
}

struct Peer {
    stream: UnixStream,
    backlog: Vec<u8>,
}

impl Peer {
    /// Sends `data` after what is queued; false when the peer is gone or too slow.
    fn send(&mut self, data: &[u8]) -> bool {
        self.backlog.extend_from_slice(data);
        self.flush()
    }

    fn flush(&mut self) -> bool {
        while !self.backlog.is_empty() {
            match self.stream.write(&self.backlog) {
                Ok(0) => return false,
                Ok(n) => {
                    self.backlog.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        self.backlog.len() <= PEER_BACKLOG
    }
}

struct Shared {
    ring: Ring,
    peers: Vec<Peer>,
}

/// The listening console socket, its ring buffer and its clients.
pub struct SocketConsole {
    listener: UnixListener,
    path: PathBuf,
    shared: Mutex<Shared>,
}

static CONSOLE: OnceLock<Arc<SocketConsole>> = OnceLock::new();

/// The socket console of this process, if `--serial socket:PATH` made one.
pub fn socket_console() -> Option<Arc<SocketConsole>> {
    CONSOLE.get().cloned()
}

fn replay_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".replay");
    PathBuf::from(p)
}

/// Binds a unix socket at `path`, replacing a stale socket file left by an earlier VMM.
pub fn bind_unix(path: &Path, what: &'static str) -> Result<UnixListener, VmmError> {
    let io = |source: std::io::Error| VmmError::Io {
        what,
        source: std::io::Error::new(source.kind(), format!("{}: {source}", path.display())),
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path).map_err(io)?
        }
        Ok(_) => return Err(io(std::io::Error::from(ErrorKind::AlreadyExists))),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    listener.set_nonblocking(true).map_err(io)?;
    Ok(listener)
}

impl SocketConsole {
    /// Binds the console socket (once per process) and picks up the ring a previous boot of
    /// this VM handed over.
    pub fn bind(path: &Path) -> Result<Arc<Self>, VmmError> {
        if let Some(c) = CONSOLE.get() {
            return Ok(c.clone());
        }
        let listener = bind_unix(path, "cannot listen on the console socket")?;
        let mut ring = Ring::new(RING_BYTES);
        let replay = replay_path(path);
        if let Ok(old) = std::fs::read(&replay) {
            ring.push(&old);
            let _ = std::fs::remove_file(&replay);
        }
        let console = Arc::new(Self {
            listener,
            path: path.to_path_buf(),
            shared: Mutex::new(Shared {
                ring,
                peers: Vec::new(),
            }),
        });
        Ok(CONSOLE.get_or_init(|| console).clone())
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sink COM1 writes to.
    pub fn writer(self: &Arc<Self>) -> ConsoleWriter {
        ConsoleWriter(self.clone())
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ring's contents.
    pub fn recent(&self) -> Vec<u8> {
        self.lock().ring.contents()
    }

    /// Saves the ring for the next process of this VM (an in-place restart).
    pub fn hand_over(&self) {
        let _ = std::fs::write(replay_path(&self.path), self.recent());
    }

    /// Appends the descriptors to poll: the listener, then each client (for input only when
    /// `want_input`: the guest has taken what was read before).
    pub fn poll_fds(&self, fds: &mut Vec<libc::pollfd>, want_input: bool) {
        fds.push(libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        for p in &self.lock().peers {
            let out = if p.backlog.is_empty() {
                0
            } else {
                libc::POLLOUT
            };
            let inp = if want_input { libc::POLLIN } else { 0 };
            fds.push(libc::pollfd {
                fd: p.stream.as_raw_fd(),
                events: inp | out,
                revents: 0,
            });
        }
    }

    /// Handles what `poll` reported for the descriptors [`Self::poll_fds`] added: accepts
    /// clients, replays the ring to them, and appends their input to `input`. When `room` is
    /// false (the guest has not taken earlier input yet) client input is left unread.
    pub fn handle(&self, fds: &[libc::pollfd], input: &mut Vec<u8>, room: bool) {
        let mut shared = self.lock();
        for pfd in fds.iter().skip(1) {
            if pfd.revents == 0 {
                continue;
            }
            let Some(i) = shared
                .peers
                .iter()
                .position(|p| p.stream.as_raw_fd() == pfd.fd)
            else {
                continue;
            };
            let mut alive = true;
            if pfd.revents & libc::POLLOUT != 0 {
                alive &= shared.peers[i].flush();
            }
            if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && room {
                let mut buf = [0u8; 4096];
                match shared.peers[i].stream.read(&mut buf) {
                    Ok(0) => alive = false,
                    Ok(n) => input.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => alive = false,
                }
            } else if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                alive = false;
            }
            if !alive {
                shared.peers.swap_remove(i);
            }
        }
        if fds.first().is_some_and(|l| l.revents & libc::POLLIN != 0) {
            while let Ok((stream, _)) = self.listener.accept() {
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                let mut peer = Peer {
                    stream,
                    backlog: Vec::new(),
                };
                let recent = shared.ring.contents();
                if peer.send(&recent) {
                    shared.peers.push(peer);
                }
            }
        }
    }

    fn output(&self, data: &[u8]) {
        let mut shared = self.lock();
        shared.ring.push(data);
        shared.peers.retain_mut(|p| p.send(data));
    }
}

/// COM1's output side of a [`SocketConsole`].
pub struct ConsoleWriter(Arc<SocketConsole>);

impl Write for ConsoleWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.output(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_bytes() {
        let mut r = Ring::new(4);
        r.push(b"ab");
        r.push(b"cde");
        assert_eq!(r.contents(), b"bcde");
        r.push(b"0123456789");
        assert_eq!(r.contents(), b"6789");
        r.push(b"");
        assert_eq!(r.contents(), b"6789");
    }
}
