//! `ferro console NAME`: the terminal attached to a VM's console through the daemon (an HTTP
//! upgrade, so it works on a remote daemon too); Ctrl-] detaches.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::Client;

/// Ctrl-]: detach.
pub const DETACH: u8 = 0x1d;

/// Puts an interactive terminal on stdin into raw mode; restores it when dropped.
struct Raw(Option<libc::termios>);

impl Raw {
    fn enter() -> Self {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the descriptor number.
        if unsafe { libc::isatty(fd) } != 1 {
            return Self(None);
        }
        let mut t = std::mem::MaybeUninit::<libc::termios>::zeroed();
        // SAFETY: `t` points to writable storage for one termios, which tcgetattr fills.
        if unsafe { libc::tcgetattr(fd, t.as_mut_ptr()) } != 0 {
            return Self(None);
        }
        // SAFETY: tcgetattr succeeded, so `t` is initialised.
        let saved = unsafe { t.assume_init() };
        let mut raw = saved;
        // SAFETY: cfmakeraw modifies only the termios it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios for this descriptor.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) };
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

/// Splits input at the detach key: the bytes before it, and whether it came.
pub fn split_detach(data: &[u8]) -> (&[u8], bool) {
    match data.iter().position(|&b| b == DETACH) {
        Some(i) => (&data[..i], true),
        None => (data, false),
    }
}

/// Attaches the terminal to VM `name`'s console until Ctrl-], end of input, or the VM ends.
pub async fn attach(client: &Client, name: &str) -> Result<()> {
    let conn = client.console(name).await?;
    let (mut rx, mut tx) = tokio::io::split(conn);
    eprintln!("[attached to {name}'s console; detach with Ctrl-]]\r");
    let raw = Raw::enter();
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    // Blocking stdin reads on their own thread; it ends with the process.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || in_tx.blocking_send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut stdout = std::io::stdout();
    let mut buf = vec![0u8; 4096];
    let why = loop {
        tokio::select! {
            got = rx.read(&mut buf) => match got {
                Ok(0) | Err(_) => break "console closed",
                Ok(n) => {
                    if stdout.write_all(&buf[..n]).and_then(|_| stdout.flush()).is_err() {
                        break "output closed";
                    }
                }
            },
            input = in_rx.recv() => match input {
                None => break "end of input",
                Some(data) => {
                    let (send, detach) = split_detach(&data);
                    if tx.write_all(send).await.is_err() {
                        break "console closed";
                    }
                    if detach {
                        break "detached";
                    }
                }
            },
        }
    };
    let _ = tx.flush().await;
    drop(raw);
    eprintln!("\r\n[{why}]");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_key() {
        assert_eq!(split_detach(b"ls\r"), (&b"ls\r"[..], false));
        assert_eq!(split_detach(b"ab\x1dcd"), (&b"ab"[..], true));
    }
}
