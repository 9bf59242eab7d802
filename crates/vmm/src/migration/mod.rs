//! Pre-copy live migration of a running VM over TCP: the source is a VMM asked
//! `{"cmd":"migrate","to":"HOST:PORT"}` on its control socket ([`send`]), the destination a
//! `ferro-vmm --incoming tcp:HOST:PORT` ([`recv`]). By default the disks are not copied: both
//! hosts see them at the same paths (shared storage). With `"copy_storage": true` the disks,
//! the kernel and the initrd go too, the disks with their own write tracking
//! ([`storage`]), into the destination's `--incoming-storage DIR`.
//!
//! # How it goes
//! 1. The source turns on KVM's dirty-page log on every memory slot, then sends every page
//!    that is not zero (round 0) while the guest runs.
//! 2. Each later round sends the pages the guest dirtied during the previous one, until the
//!    dirty pages left could be sent within `downtime_ms` at the bandwidth measured so far, or
//!    `max_rounds` rounds were sent.
//! 3. Stop and copy: the vCPUs are paused and every virtio device is locked (a block device
//!    first drains its requests in flight), the disks are flushed (once before the pause too,
//!    so this one has little left), and the last dirty pages go with the machine state
//!    ([`crate::snapshot::MachineState`], the snapshot's serde types).
//! 4. The destination builds the VM from what it received (as `--restore` does from a
//!    directory), answers ACK and runs it; the source then answers its control client and
//!    exits with status 0 (exit event reason `migrated`). Downtime is pause to ACK.
//!
//! On any failure before the ACK the source unlocks its devices, resumes the vCPUs (unless
//! they were paused before), turns the dirty log off and runs on; the destination exits with
//! status 1 and one line. A destination that has sent its ACK runs the VM: if the ACK is lost
//! on the way, both sides would run it (the classic last-message problem; the daemon that
//! drives both ends is where that gets fenced).
//!
//! # What the dirty log misses
//! KVM logs what the guest (and KVM on its behalf: kvmclock, steal time) writes. The device
//! threads (event loop, block workers) write guest memory through the VMM's own mapping, and
//! the host kernel does for a disk read straight into guest RAM; KVM sees neither. So guest
//! memory carries vm-memory's dirty bitmap (`GuestMemoryMmap<AtomicBitmap>`, one bit per 4 KiB,
//! set after every write through its API: used rings, descriptors, received frames), and the
//! writes that bypass that API mark it themselves once done: a disk read into guest RAM (the
//! block device, when the request completes, whichever path ran it) and a balloon's
//! `MADV_DONTNEED`. The migration clears it when the dirty log starts and ORs it into every
//! round's dirty pages, the last one after the devices have drained, so the pause costs no
//! pass over memory (an earlier version hashed every populated page inside the downtime:
//! ~155 ms per GiB per CPU here). `FERRO_MIGRATE_VERIFY=1` (below) checks that nothing
//! escaped.
//!
//! # Wire format (version [`wire::VERSION`]; all integers little-endian)
//! ```text
//! hello        b"FERROMIG" | version u32 | reserved u32 (0)      each side sends one first;
//!                                                                 another magic or version is
//!                                                                 refused with a clear error
//! record       kind u8 | len u32 (<= 64 MiB) | payload[len]
//!   source -> destination
//!  13 Auth     the destination's migration token (bytes)          (first, when given one)
//!   1 Config   JSON {"config": VmConfig, "regions": [[guest_addr, size], ...],
//!                    "storage"?: {"disks": [size, ...], "kernel": size, "initrd": size?}}
//!                                                                  (first)
//!   4 Round    round u32                                           (a copy round starts)
//!   2 Pages    count u32 | count x (guest_addr u64 | pages u32) | the runs' bytes
//!                                                   (1..=1000 runs of whole pages, <= 64 MiB)
//!   3 Zeros    count u32 | count x (guest_addr u64 | pages u64)    (pages that are zero now)
//!   9 Disk     disk u32 | offset u64 | bytes                       (storage: whole sectors)
//!  10 DiskZeros disk u32 | offset u64 | len u64                    (storage: reads as zeros)
//!  11 File     file u8 (0 kernel, 1 initrd) | offset u64 | bytes   (storage)
//!   5 State    fnv1a64 u64 | JSON MachineState                     (once, after the last pages)
//!   8 Verify   count u32 | count x u64                             (optional, before State)
//!   6 End      -                                                   (nothing follows)
//!   7 Abort    UTF-8 reason                                        (the source gave up)
//!   destination -> source
//!   0x41 Ack    -                                                  (the VM is built and runs)
//!   0x42 Refuse UTF-8 reason                                       (it cannot take the VM)
//! ```
//! Everything a peer sends is outside input: the destination checks the configuration, that
//! the regions are exactly the layout of its `memory_mib`, every page run and zero run
//! (page-aligned, all of it inside one region) before a byte of it lands in guest RAM, the
//! record lengths against their runs, the state's checksum and its vCPU and device counts,
//! and refuses the stream with one line otherwise. A destination given a token
//! (`--incoming-token-file`) first requires the Auth record with it: a connection without
//! it is turned away and the destination keeps listening for the real source.
//!
//! # The copy path
//! The source gathers runs of contiguous non-zero pages (up to 1 MiB a record) and `writev`s
//! the record head and the runs straight from guest RAM (the guest may write a page while
//! the kernel copies it; the dirty log, or the device bitmap, sends it again). The
//! destination reads each run straight into
//! its guest RAM once checked, populated with one `MADV_POPULATE_WRITE` per run (and, after a
//! run of 1 MiB or more, the next 2 MiB by a helper thread `migrate-in-pop` meanwhile) and
//! without THP until it is filled. Both ends ask for 4 MiB socket buffers.
//!
//! # Checking the copy
//! With `FERRO_MIGRATE_VERIFY=1` in the source VMM's environment, the stop-and-copy round
//! also sends [`chunk_hashes`] of the paused guest's memory (one per 2 MiB), and the destination
//! refuses the VM unless its own memory hashes the same, naming the first chunk that differs.
//! It costs a pass over the populated memory on both sides inside the downtime, so it is for
//! tests (`tests/tests/probe_migrate.rs` sets it), not for production.

pub mod recv;
pub mod send;
pub mod storage;
pub mod wire;

use ferro_api::VmConfig;
use serde::{Deserialize, Serialize};

/// Why a migration failed (on either side).
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The address is not `HOST:PORT`.
    #[error("bad address {0:?}: expected HOST:PORT")]
    Address(String),
    /// The destination could not be reached.
    #[error("cannot connect to {to}: {source}")]
    Connect {
        /// The address.
        to: String,
        /// Why.
        source: std::io::Error,
    },
    /// The connection failed.
    #[error("the connection failed: {0}")]
    Io(std::io::Error),
    /// The peer closed the connection mid-stream.
    #[error("the peer closed the connection mid-stream")]
    Closed,
    /// The peer does not speak this protocol.
    #[error("the peer does not speak the ferro-vmm migration protocol")]
    Magic,
    /// The peer speaks another version of it.
    #[error("the peer speaks migration protocol version {0}, this ferro-vmm speaks {v}", v = wire::VERSION)]
    Version(u32),
    /// A record breaks the format.
    #[error("malformed migration stream: {0}")]
    Malformed(String),
    /// The machine state does not match its checksum.
    #[error("the machine state does not match its checksum")]
    Checksum,
    /// The destination would not take the VM.
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    /// The source gave up.
    #[error("the source aborted the migration: {0}")]
    Aborted(String),
    /// The VM ended (guest power-off, a signal) while it was being migrated.
    #[error("the VM ended during the migration")]
    Ended,
    /// The VMM could not do its part (pause, dirty log, state).
    #[error("{0}")]
    Vmm(String),
}

impl From<crate::VmmError> for MigrationError {
    fn from(e: crate::VmmError) -> Self {
        Self::Vmm(e.to_string())
    }
}

impl From<ferro_hypervisor::HypervisorError> for MigrationError {
    fn from(e: ferro_hypervisor::HypervisorError) -> Self {
        Self::Vmm(e.to_string())
    }
}

/// The [`wire::Kind::Config`] record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Setup {
    /// The VM's configuration.
    pub config: VmConfig,
    /// Its RAM regions: (guest address, size), in address order.
    pub regions: Vec<(u64, u64)>,
    /// Storage migration: what is copied besides memory; `None` for shared storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<storage::StorageCopy>,
}

/// `HOST:PORT` from `HOST:PORT` or `tcp:HOST:PORT`.
pub fn tcp_address(spec: &str) -> Result<&str, MigrationError> {
    let addr = spec.strip_prefix("tcp:").unwrap_or(spec);
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(addr),
        _ => Err(MigrationError::Address(spec.to_string())),
    }
}

/// The environment variable that turns the end-to-end check of the copy on (source side).
pub const VERIFY_ENV: &str = "FERRO_MIGRATE_VERIFY";
/// Bytes of guest memory per [`chunk_hashes`] entry.
pub const VERIFY_CHUNK: u64 = 2 << 20;

/// One hash per [`VERIFY_CHUNK`] of `mem`'s regions in order (a region's last chunk may be
/// shorter), folded from [`page_hash`] of each page; anonymous pages this process never
/// populated are zero and hash as such without being read.
pub fn chunk_hashes(mem: &crate::memory::GuestMemory) -> Vec<u64> {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
    let zero = page_hash(&[0u8; wire::PAGE as usize]);
    let per_chunk = (VERIFY_CHUNK / wire::PAGE) as usize;
    let mut out = Vec::new();
    let mut buf = [0u8; wire::PAGE as usize];
    for r in mem.iter() {
        let pages = (r.len() / wire::PAGE) as usize;
        let touched = crate::memfile::populated(r);
        for first in (0..pages).step_by(per_chunk) {
            let mut h = 0xcbf2_9ce4_8422_2325u64;
            for p in first..(first + per_chunk).min(pages) {
                let absent = touched.as_ref().is_some_and(|t| t.get(p) == Some(&false));
                let addr = GuestAddress(r.start_addr().0 + p as u64 * wire::PAGE);
                let v = if absent || mem.read_slice(&mut buf, addr).is_err() {
                    zero
                } else {
                    page_hash(&buf)
                };
                h = (h ^ v).wrapping_mul(0x0000_0100_0000_01b3);
            }
            out.push(h);
        }
    }
    out
}

/// Asks for 4 MiB send and receive buffers on a migration socket (capped by the host's
/// `net.core.{w,r}mem_max`): the default 16 KiB send buffer makes the sender wait on the
/// receiver for every few pages. Best effort: a refusal only costs speed.
pub(crate) fn socket_buffers(stream: &std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 4 << 20;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a socket this process owns, with a pointer to a live c_int and
        // its size; it changes only the socket's buffer sizes.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

/// A 64-bit hash of one page, fast enough to run over all populated guest memory while the
/// guest is paused ([`chunk_hashes`]): four independent multiply-xor lanes over its words.
pub fn page_hash(page: &[u8]) -> u64 {
    page_hash_with(page, |_| {})
}

/// [`page_hash`], showing every word to `word` on the way.
#[inline(always)]
fn page_hash_with(page: &[u8], mut word: impl FnMut(u64)) -> u64 {
    const K: [u64; 4] = [
        0x9e37_79b9_7f4a_7c15,
        0xc2b2_ae3d_27d4_eb4f,
        0x1656_67b1_9e37_79f9,
        0x85eb_ca77_c2b2_ae63,
    ];
    let mut h = [1u64, 2, 3, 4];
    for block in page.chunks_exact(32) {
        for (lane, w) in block.chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            let x = u64::from_le_bytes(a);
            word(x);
            h[lane] = (h[lane] ^ x).wrapping_mul(K[lane]).rotate_left(29);
        }
    }
    let mut out = 0xcbf2_9ce4_8422_2325u64;
    for (lane, v) in h.iter().enumerate() {
        out = (out ^ v).wrapping_mul(K[lane]);
        out ^= out >> 31;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(tcp_address("tcp:127.0.0.1:0").unwrap(), "127.0.0.1:0");
        assert_eq!(
            tcp_address("host.example:4444").unwrap(),
            "host.example:4444"
        );
        assert_eq!(tcp_address("[::1]:4444").unwrap(), "[::1]:4444");
        for bad in ["", "host", ":1", "tcp:host:x", "host:99999"] {
            assert!(tcp_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn page_hash_sees_every_word() {
        let zero = [0u8; 4096];
        let h0 = page_hash(&zero);
        let mut seen = std::collections::HashSet::new();
        for at in (0..4096).step_by(8) {
            let mut p = zero;
            p[at] = 1;
            let h = page_hash(&p);
            assert_ne!(h, h0, "a one at {at}");
            assert!(seen.insert(h), "two pages with one word set share a hash");
        }
        // Swapping two words changes it.
        let mut a = zero;
        a[0] = 1;
        a[8] = 2;
        let mut b = zero;
        b[0] = 2;
        b[8] = 1;
        assert_ne!(page_hash(&a), page_hash(&b));
    }

    /// `cargo test --release -p ferro-vmm --lib page_hash_speed -- --ignored --nocapture`: what
    /// `FERRO_MIGRATE_VERIFY`'s check costs per GiB of populated guest memory.
    #[test]
    #[ignore]
    fn page_hash_speed() {
        let data: Vec<u8> = (0..64u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        for _ in 0..4 {
            for p in data.chunks_exact(4096) {
                x ^= page_hash(p);
            }
        }
        let per_gib = t.elapsed().as_secs_f64() * 1000.0 * 4.0;
        println!("page_hash: {per_gib:.0} ms per GiB ({x:x})");
    }
}
