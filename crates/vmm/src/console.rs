//! The serial console's host side: where COM1's output goes, and the terminal that feeds its input.
//! With `--serial socket:PATH` output goes to a [`SocketConsole`] (see `console_socket.rs`).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;

use ferro_api::SerialMode;

pub use crate::console_socket::{socket_console, Ring, SocketConsole, RING_BYTES};
use crate::VmmError;

/// Ctrl-A, then `x`, ends the VM from an interactive terminal (as in QEMU).
pub const ESCAPE: u8 = 0x01;

/// Opens the sink for COM1's output.
pub fn output(mode: &SerialMode) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match mode {
        SerialMode::Stdio => Box::new(std::io::stdout()),
        SerialMode::None => Box::new(std::io::sink()),
        SerialMode::Socket(path) => Box::new(SocketConsole::bind(path)?.writer()),
        SerialMode::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmmError::Io {
                    what: "cannot open the serial output file",
                    source: std::io::Error::new(
                        source.kind(),
                        format!("{}: {source}", path.display()),
                    ),
                })?,
        ),
    })
}

/// Puts an interactive terminal on stdin into raw mode for as long as it lives.
pub struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal; does nothing otherwise.
    pub fn enter() -> Self {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the descriptor number.
        if unsafe { libc::isatty(fd) } != 1 {
            return Self { saved: None };
        }
        let mut t = std::mem::MaybeUninit::<libc::termios>::zeroed();
        // SAFETY: `t` points to writable storage for one termios, which tcgetattr fills.
        if unsafe { libc::tcgetattr(fd, t.as_mut_ptr()) } != 0 {
            return Self { saved: None };
        }
        // SAFETY: tcgetattr succeeded, so `t` is initialised.
        let saved = unsafe { t.assume_init() };
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the termios it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so the host terminal renders the guest's "\n" normally.
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: `raw` is a valid termios for this descriptor.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) };
        Self { saved: Some(saved) }
    }

    /// Whether stdin is an interactive terminal.
    pub fn is_interactive(&self) -> bool {
        self.saved.is_some()
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = self.saved {
            // SAFETY: restores the termios read from this same descriptor in `enter`.
            unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &saved) };
        }
    }
}

/// Splits terminal input into bytes for the guest and an escape request.
#[derive(Default)]
pub struct EscapeFilter {
    armed: bool,
}

impl EscapeFilter {
    /// Feeds `input`; appends what goes to the guest to `out`; returns true when the user asked to quit.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &b in input {
            if self.armed {
                self.armed = false;
                match b {
                    b'x' | b'X' => return true,
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.armed = true;
            } else {
                out.push(b);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequence() {
        let mut f = EscapeFilter::default();
        let mut out = Vec::new();
        assert!(!f.feed(b"ls\r\x01\x01a\x01", &mut out));
        assert_eq!(out, b"ls\r\x01a");
        assert!(f.feed(b"x", &mut out));
    }
}
