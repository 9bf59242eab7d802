//! The tap backend of virtio-net: `/dev/net/tun` opened with `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`, a 12-byte virtio-net header in front of every frame (the VERSION_1 layout),
//! non-blocking. One `read` returns one frame, one `write` sends one.
//!
//! `TUNSETIFF` with a name attaches to that tap when it exists and creates it otherwise (it
//! then lives as long as the VMM keeps it open); a name with `%d` lets the kernel pick a free
//! one. `TUNSETOFFLOAD` says which offloads the tap may hand us (partial checksums, TSO, UFO):
//! exactly the ones the guest accepted as GUEST_* features.

#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{Backend, VNET_HDR_LEN};

/// Offload flags of `TUNSETOFFLOAD`.
pub mod offload {
    /// The tap may hand us frames with a partial checksum.
    pub const CSUM: u32 = libc::TUN_F_CSUM;
    /// TCP segmentation offload, IPv4.
    pub const TSO4: u32 = libc::TUN_F_TSO4;
    /// TCP segmentation offload, IPv6.
    pub const TSO6: u32 = libc::TUN_F_TSO6;
    /// UDP fragmentation offload.
    pub const UFO: u32 = libc::TUN_F_UFO;
}

/// Why a tap could not be opened or set up.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name does not fit (1 to 15 bytes, no NUL).
    #[error("tap name '{0}' is not 1 to 15 bytes")]
    Name(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    Open(std::io::Error),
    /// An ioctl failed.
    #[error("{what} on tap {name}: {source}")]
    Ioctl {
        /// The request.
        what: &'static str,
        /// The interface.
        name: String,
        /// The kernel's answer.
        source: std::io::Error,
    },
}

/// Adds an interface (by index) to a bridge (linux/sockios.h; not in libc for every target).
const SIOCBRADDIF: libc::Ioctl = 0x89a2;

/// `struct ifreq`: the name and a 24-byte union of which we use the short flags / int index.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Result<Self, TapError> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() >= libc::IFNAMSIZ || b.contains(&0) {
            return Err(TapError::Name(name.to_string()));
        }
        let mut r = Self::default();
        r.name[..b.len()].copy_from_slice(b);
        Ok(r)
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }

    fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_short(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    fn set_int(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }
}

/// `ioctl(fd, req, ifr)` for requests that take a `struct ifreq`.
fn ioctl_ifreq(fd: RawFd, req: libc::Ioctl, ifr: &mut IfReq) -> std::io::Result<()> {
    // SAFETY: every request passed here (TUNSETIFF, SIOCGIFINDEX, SIOCGIFFLAGS, SIOCSIFFLAGS,
    // SIOCBRADDIF) reads and writes at most a `struct ifreq`; `ifr` is a live, exclusively
    // borrowed 40-byte repr(C) struct with that layout for the whole call.
    let r = unsafe { libc::ioctl(fd, req as _, ifr as *mut IfReq) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `ioctl(fd, req, value)` for tun requests that take an int by pointer or by value.
fn ioctl_int_ptr(fd: RawFd, req: libc::Ioctl, v: &mut i32) -> std::io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer; `v` is a live, exclusively
    // borrowed i32 for the whole call.
    let r = unsafe { libc::ioctl(fd, req as _, v as *mut i32) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// An open tap.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to tap `name` (created when it does not exist; `%d` in it picks a free number).
    pub fn open(name: &str) -> Result<Self, TapError> {
        let mut ifr = IfReq::new(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        ifr.set_short((libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16);
        let fd = file.as_raw_fd();
        let err = |what: &'static str, name: &str| {
            let name = name.to_string();
            move |source| TapError::Ioctl { what, name, source }
        };
        ioctl_ifreq(fd, libc::TUNSETIFF, &mut ifr).map_err(err("TUNSETIFF", name))?;
        let name = ifr.name();
        let mut sz = VNET_HDR_LEN as i32;
        ioctl_int_ptr(fd, libc::TUNSETVNETHDRSZ, &mut sz).map_err(err("TUNSETVNETHDRSZ", &name))?;
        let tap = Self { file, name };
        // Until the guest accepts offloads, frames reach it fully formed.
        tap.set_offload(0)
            .map_err(err("TUNSETOFFLOAD", &tap.name))?;
        Ok(tap)
    }

    /// The interface's name (the one the kernel picked for a `%d` name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the interface up and, with `bridge`, enslaves it to that bridge.
    pub fn up(&self, bridge: Option<&str>) -> Result<(), TapError> {
        // SAFETY: socket(2) takes no pointers; the result is checked before use and owned by
        // `sock` below.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(TapError::Ioctl {
                what: "socket",
                name: self.name.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        let fd = sock.as_raw_fd();
        let err = |what: &'static str, name: &str| {
            let name = name.to_string();
            move |source| TapError::Ioctl { what, name, source }
        };
        if let Some(br) = bridge {
            let mut ifr = IfReq::new(&self.name)?;
            ioctl_ifreq(fd, libc::SIOCGIFINDEX, &mut ifr)
                .map_err(err("SIOCGIFINDEX", &self.name))?;
            let index = i32::from_ne_bytes([ifr.data[0], ifr.data[1], ifr.data[2], ifr.data[3]]);
            let mut b = IfReq::new(br)?;
            b.set_int(index);
            ioctl_ifreq(fd, SIOCBRADDIF, &mut b).map_err(err("SIOCBRADDIF", br))?;
        }
        let mut ifr = IfReq::new(&self.name)?;
        ioctl_ifreq(fd, libc::SIOCGIFFLAGS, &mut ifr).map_err(err("SIOCGIFFLAGS", &self.name))?;
        let flags = ifr.short() | libc::IFF_UP as i16;
        ifr.set_short(flags);
        ioctl_ifreq(fd, libc::SIOCSIFFLAGS, &mut ifr).map_err(err("SIOCSIFFLAGS", &self.name))?;
        Ok(())
    }
}

impl Backend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    fn send(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of flags) and
        // touches no memory of ours.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD as _,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
