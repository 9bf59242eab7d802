//! Spawning one child and timing it: first stdout byte, marker strings, exit; peak RSS from
//! wait4; optionally a /proc/PID/smaps sample taken when a marker appears (then the child is
//! killed). Every child has a deadline after which it is killed.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How the child ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Exited(i32),
    Signaled(i32),
    /// Killed by us after the deadline.
    TimedOut,
    /// Killed by us after printing nothing for `Spec::idle_timeout`.
    Stalled,
    /// Killed by us on purpose after the smaps sample.
    Sampled,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Exited(c) => write!(f, "exit status {c}"),
            Status::Signaled(s) => write!(f, "killed by signal {s}"),
            Status::TimedOut => write!(f, "timed out (killed)"),
            Status::Stalled => write!(f, "stalled: no output for too long (killed)"),
            Status::Sampled => write!(f, "killed after the sample"),
        }
    }
}

/// What to run and watch.
pub struct Spec<'a> {
    pub program: &'a Path,
    pub args: &'a [String],
    pub timeout: Duration,
    /// Strings whose first appearance on stdout is timed.
    pub markers: &'a [&'a str],
    /// When this stdout marker appears: read /proc/PID/smaps, then kill the child.
    pub smaps_at: Option<&'a str>,
    /// Copy the child's stdout to our stderr as it arrives (long lab runs).
    pub echo: bool,
    /// Kill the child when it prints nothing on stdout for this long.
    pub idle_timeout: Option<Duration>,
    /// Told the index of each of `markers` as it first appears (a host-side peer that must
    /// act on the guest's console follows the run through it).
    pub marker_tx: Option<&'a Sender<usize>>,
}

/// What one run measured (durations are from just before the spawn).
#[derive(Debug)]
pub struct Outcome {
    pub first_byte: Option<Duration>,
    /// One entry per `Spec::markers`.
    pub markers: Vec<Option<Duration>>,
    pub exited: Duration,
    pub status: Status,
    /// ru_maxrss from wait4, KiB.
    pub maxrss_kib: u64,
    pub stdout: String,
    pub stderr: String,
    pub smaps: Option<String>,
}

impl Outcome {
    /// Everything the child printed, for error messages.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Kills the child and everything in its process group (a script's own children too).
fn kill(pid: i32) {
    // SAFETY: plain syscalls on our own (not yet reaped) child's pid and the process group it
    // leads (spawned with process_group(0)); no memory is passed.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Ends a child that overran: SIGTERM to its group (so scripts can clean up), then SIGKILL
/// after a grace period. Returns the reaped status if it ended within the grace period.
fn stop(pid: i32) -> Option<(Status, u64)> {
    // SAFETY: plain syscalls on our own child's pid and its process group; no memory passed.
    unsafe {
        libc::kill(-pid, libc::SIGTERM);
        libc::kill(pid, libc::SIGTERM);
    }
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if let Some(r) = wait4(pid, false) {
            // The leader is gone; make sure nothing of its group lingers.
            // SAFETY: a plain syscall on the group our child led; no memory is passed.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            return Some(r);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kill(pid);
    None
}

/// wait4 on `pid`; `Some((status, maxrss_kib))` once it has ended.
fn wait4(pid: i32, block: bool) -> Option<(Status, u64)> {
    let mut status = 0i32;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        let flags = if block { 0 } else { libc::WNOHANG };
        // SAFETY: `status` and `ru` are valid, writable, and live across the call.
        let r = unsafe { libc::wait4(pid, &mut status, flags, &mut ru) };
        if r == pid {
            let st = if libc::WIFEXITED(status) {
                Status::Exited(libc::WEXITSTATUS(status))
            } else {
                Status::Signaled(libc::WTERMSIG(status))
            };
            return Some((st, ru.ru_maxrss.max(0) as u64));
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return None;
    }
}

struct Stream {
    file: Option<File>,
    buf: Vec<u8>,
}

/// Runs `spec` to its end (or deadline) and measures it.
pub fn run(spec: &Spec) -> Result<Outcome> {
    let mut cmd = Command::new(spec.program);
    // Its own process group, so a kill reaches the grandchildren of scripts (lab.sh's QEMU).
    cmd.args(spec.args)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", spec.program.display()))?;
    let pid = child.id() as i32;
    let mut out = Stream {
        file: child.stdout.take().map(|s| File::from(OwnedFd::from(s))),
        buf: Vec::new(),
    };
    let mut err = Stream {
        file: child.stderr.take().map(|s| File::from(OwnedFd::from(s))),
        buf: Vec::new(),
    };
    // We reap the child ourselves with wait4 (for its rusage); dropping `Child` does not wait.
    drop(child);
    let pidfd = pidfd_open(pid);

    let deadline = t0 + spec.timeout;
    let mut first_byte = None;
    let mut markers: Vec<Option<Duration>> = vec![None; spec.markers.len()];
    let mut smaps_taken = false;
    let mut smaps = None;
    let mut killed: Option<Status> = None;
    let mut ended: Option<(Duration, Status, u64)> = None;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut last_output = t0;

    loop {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(3);
        let mut roles: Vec<u8> = Vec::with_capacity(3);
        for (role, s) in [(0u8, &out), (1u8, &err)] {
            if let Some(f) = &s.file {
                fds.push(libc::pollfd {
                    fd: f.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                roles.push(role);
            }
        }
        if ended.is_none() {
            if let Some(p) = &pidfd {
                fds.push(libc::pollfd {
                    fd: p.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                roles.push(2);
            }
        }
        if fds.is_empty() {
            break; // pipes closed and the child reaped
        }
        let now = Instant::now();
        // After the exit, drain the pipes for at most 2 s (a grandchild might hold them).
        let until = match &ended {
            Some((at, _, _)) => t0 + *at + Duration::from_secs(2),
            None if pidfd.is_none() && out.file.is_none() && err.file.is_none() => {
                now + Duration::from_millis(1)
            }
            None => match spec.idle_timeout {
                Some(idle) => deadline.min(last_output + idle),
                None => deadline,
            },
        };
        let wait_ms = until.saturating_duration_since(now).as_millis().min(60_000) as i32;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that lives across the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(std::io::Error::last_os_error()).context("poll");
        }
        if r == 0 {
            if ended.is_some() {
                break; // drained long enough
            }
            let now = Instant::now();
            if killed.is_none() {
                if now >= deadline {
                    killed = Some(Status::TimedOut);
                } else if spec
                    .idle_timeout
                    .is_some_and(|idle| now >= last_output + idle)
                {
                    killed = Some(Status::Stalled);
                }
                if killed.is_some() {
                    if let Some((st, rss)) = stop(pid) {
                        ended = Some((t0.elapsed(), st, rss));
                        continue;
                    }
                }
            }
            if pidfd.is_none() || killed.is_some() {
                if let Some((st, rss)) = wait4(pid, killed.is_some()) {
                    ended = Some((t0.elapsed(), st, rss));
                }
            }
            continue;
        }
        for (pfd, role) in fds.iter().zip(&roles) {
            if pfd.revents == 0 {
                continue;
            }
            match role {
                0 | 1 => {
                    let s = if *role == 0 { &mut out } else { &mut err };
                    let Some(f) = s.file.as_mut() else { continue };
                    let n = match f.read(&mut chunk) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => 0,
                    };
                    if n == 0 {
                        s.file = None;
                        continue;
                    }
                    let at = t0.elapsed();
                    if *role == 0 {
                        last_output = Instant::now();
                    }
                    let old_len = s.buf.len();
                    s.buf.extend_from_slice(&chunk[..n]);
                    if *role != 0 {
                        continue;
                    }
                    if spec.echo {
                        let _ = std::io::stderr().write_all(&chunk[..n]);
                    }
                    first_byte.get_or_insert(at);
                    for (i, m) in spec.markers.iter().enumerate() {
                        if markers[i].is_none() && found_since(&s.buf, old_len, m) {
                            markers[i] = Some(at);
                            if let Some(tx) = spec.marker_tx {
                                // A peer that has gone away no longer needs to know.
                                let _ = tx.send(i);
                            }
                        }
                    }
                    if let Some(m) = spec.smaps_at {
                        if !smaps_taken && found_since(&s.buf, old_len, m) {
                            smaps_taken = true;
                            smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok();
                            kill(pid);
                            killed.get_or_insert(Status::Sampled);
                        }
                    }
                }
                _ => {
                    if let Some((st, rss)) = wait4(pid, true) {
                        ended = Some((t0.elapsed(), st, rss));
                    }
                }
            }
        }
        if ended.is_none() && pidfd.is_none() && out.file.is_none() && err.file.is_none() {
            if let Some((st, rss)) = wait4(pid, killed.is_some() || Instant::now() >= deadline) {
                ended = Some((t0.elapsed(), st, rss));
            }
        }
    }
    let (exited, mut status, maxrss_kib) = match ended {
        Some(e) => e,
        None => {
            let (st, rss) = wait4(pid, true).unwrap_or((Status::Signaled(0), 0));
            (t0.elapsed(), st, rss)
        }
    };
    if let Some(k) = killed {
        status = k;
    }
    Ok(Outcome {
        first_byte,
        markers,
        exited,
        status,
        maxrss_kib,
        stdout: String::from_utf8_lossy(&out.buf).into_owned(),
        stderr: String::from_utf8_lossy(&err.buf).into_owned(),
        smaps,
    })
}

/// Whether `needle` occurs in `buf` in a position that ends after `old_len`.
fn found_since(buf: &[u8], old_len: usize, needle: &str) -> bool {
    let n = needle.as_bytes();
    let start = old_len.saturating_sub(n.len().saturating_sub(1));
    buf.get(start..)
        .is_some_and(|tail| tail.windows(n.len().max(1)).any(|w| w == n))
}

/// Runs a command to completion for its output (builds, --host-info), with a deadline.
pub fn output(program: &Path, args: &[String], timeout: Duration) -> Result<Outcome> {
    run(&Spec {
        program,
        args,
        timeout,
        markers: &[],
        smaps_at: None,
        echo: false,
        idle_timeout: None,
        marker_tx: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, timeout_ms: u64, markers: &[&str], smaps_at: Option<&str>) -> Outcome {
        let args = vec!["-c".to_string(), script.to_string()];
        run(&Spec {
            program: Path::new("/bin/sh"),
            args: &args,
            timeout: Duration::from_millis(timeout_ms),
            markers,
            smaps_at,
            echo: false,
            idle_timeout: None,
            marker_tx: None,
        })
        .unwrap()
    }

    #[test]
    fn marker_across_chunks() {
        assert!(found_since(b"abcprobe=start", 5, "probe=start"));
        assert!(!found_since(
            b"probe=startxxxxxxxxxxxxxxxxx",
            20,
            "probe=start"
        ));
        assert!(found_since(b"xxprobe=st", 0, "probe"));
    }

    #[test]
    fn times_output_and_exit() {
        let o = sh(
            "echo one; sleep 0.05; echo two-marker; echo err >&2; exit 3",
            10_000,
            &["two-marker", "never"],
            None,
        );
        assert_eq!(o.status, Status::Exited(3));
        assert!(o.first_byte.is_some());
        let m = o.markers[0].unwrap();
        assert!(m >= Duration::from_millis(40), "{m:?}");
        assert!(o.markers[1].is_none());
        assert!(o.exited >= m);
        assert!(o.maxrss_kib > 0);
        assert_eq!(o.stdout, "one\ntwo-marker\n");
        assert_eq!(o.stderr, "err\n");
    }

    #[test]
    fn kills_at_deadline() {
        let t = Instant::now();
        let o = sh("exec sleep 20", 200, &[], None);
        assert_eq!(o.status, Status::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn kills_when_stalled() {
        let args = vec![
            "-c".to_string(),
            "echo a; sleep 0.1; echo b; exec sleep 20".to_string(),
        ];
        let t = Instant::now();
        let o = run(&Spec {
            program: Path::new("/bin/sh"),
            args: &args,
            timeout: Duration::from_secs(10),
            markers: &[],
            smaps_at: None,
            echo: false,
            idle_timeout: Some(Duration::from_millis(300)),
            marker_tx: None,
        })
        .unwrap();
        assert_eq!(o.status, Status::Stalled);
        assert_eq!(o.stdout, "a\nb\n");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn kill_reaches_grandchildren() {
        // The grandchild keeps stdout open: unless it is killed too, EOF never comes and the
        // drain after the exit would have to give up after 2 s.
        let t = Instant::now();
        let o = sh("sleep 30 & echo started; wait", 300, &[], None);
        assert_eq!(o.status, Status::TimedOut);
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn samples_smaps_then_kills() {
        // The shell stays (it waits for its child): sampling a process in the middle of an
        // exec could read an smaps without its mappings (this failed once in CI).
        let o = sh("sleep 20 & echo ready; wait", 10_000, &[], Some("ready"));
        assert_eq!(o.status, Status::Sampled);
        assert!(o.smaps.unwrap().contains("Rss:"));
    }

    #[test]
    fn missing_program_is_an_error() {
        let r = output(Path::new("/nonexistent/ferro"), &[], Duration::from_secs(1));
        assert!(r.is_err());
    }
}
