//! `ferro console NAME`: the terminal attached to a VM's console socket; Ctrl-] detaches.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, Result};

/// Ctrl-]: detach.
const DETACH: u8 = 0x1d;

/// Restores the terminal when dropped.
struct Raw(Option<libc::termios>);

impl Raw {
    fn enter() -> Self {
        let fd = std::io::stdin().as_raw_fd();
        let mut t = std::mem::MaybeUninit::<libc::termios>::zeroed();
        // SAFETY: isatty inspects the descriptor only; tcgetattr fills `t`, which points to
        // writable storage for one termios.
        if unsafe { libc::isatty(fd) } != 1 || unsafe { libc::tcgetattr(fd, t.as_mut_ptr()) } != 0 {
            return Self(None);
        }
        // SAFETY: tcgetattr succeeded, so `t` is initialised.
        let saved = unsafe { t.assume_init() };
        let mut raw = saved;
        // SAFETY: cfmakeraw modifies only the termios it is given; tcsetattr reads a valid one.
        unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(fd, libc::TCSANOW, &raw);
        }
        Self(Some(saved))
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        if let Some(saved) = self.0 {
            // SAFETY: restores the termios read from this same descriptor in `enter`.
            unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &saved) };
        }
    }
}

/// Attaches the terminal to the console socket until Ctrl-] or the VM ends.
pub fn attach(name: &str, socket: &Path) -> Result<()> {
    let stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot attach to {}: the console is reachable only on the daemon's host",
            socket.display()
        )
    })?;
    eprintln!("[attached to {name}'s console; detach with Ctrl-]]\r");
    let raw = Raw::enter();
    let mut out = stream.try_clone().context("console socket")?;
    let mut input = stream;
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let mut stdout = std::io::stdout();
        while let Ok(n) = input.read(&mut buf) {
            if n == 0
                || stdout
                    .write_all(&buf[..n])
                    .and_then(|_| stdout.flush())
                    .is_err()
            {
                break;
            }
        }
        drop(Raw(None));
        eprintln!("\r\n[console closed]\r");
        std::process::exit(0);
    });
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        let n = stdin.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        let data = &buf[..n];
        if let Some(i) = data.iter().position(|&b| b == DETACH) {
            let _ = out.write_all(&data[..i]);
            break;
        }
        if out.write_all(data).is_err() {
            break;
        }
    }
    drop(raw);
    eprintln!("\r\n[detached]");
    Ok(())
}
