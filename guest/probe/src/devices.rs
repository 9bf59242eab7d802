//! PCI and virtio devices: the command-line keys, and the three steps of a device run — a CPL3
//! scan of bus 0, a short CPL0 step that installs the interrupt vectors and starts the LAPIC
//! timer, and a CPL3 run of every requested device (the data path never enters the kernel; only
//! interrupt waits do).

use crate::dma::Dma;
use crate::pci::{Busy, Func, Pci, MAX_FUNCS};
use crate::serial::Line;
use crate::trap::user_call;
use crate::virtio;
use core::sync::atomic::{AtomicBool, Ordering};

/// Whether device interrupts reach the BSP (else waits spin instead of sleeping).
pub static IRQ_OK: AtomicBool = AtomicBool::new(false);

/// `blk=` modes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BlkMode {
    /// Read the first sectors (checksum).
    Read,
    /// Write the pattern, flush, read back and verify.
    Write,
    /// Verify an earlier pattern.
    Verify,
    /// Sequential and random throughput.
    Bench,
}

/// `net=` modes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NetMode {
    /// Answer ARP and ICMP echo.
    On,
    /// Count received frames, then send a burst.
    Bench,
}

/// `vsock=` modes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum VsockMode {
    /// Accept one connection and echo.
    Echo,
    /// Connect to the host and exchange one message.
    Connect,
}

/// Device options from the command line (see README.md).
#[derive(Clone, Copy)]
pub struct DevOpts {
    pub pci: bool,
    pub pci_ecam: u64,
    pub rng: Option<u64>,
    pub blk: Option<BlkMode>,
    pub blk_sectors: u64,
    pub blk_seed: u64,
    pub blk_dev: usize,
    pub blk_mib: u64,
    pub blk_rand: u64,
    pub blk_qd: u64,
    /// `blk_spin=US`: how long `blk=bench` spins at CPL3 for a completion before it sleeps
    /// until the device's interrupt (default 1000: longer than one request takes, as a
    /// polling driver spins for the whole I/O; on a PVM host an interrupt runs the emulated
    /// CPL0 path, ~80 µs from the wake-up to the next kick).
    pub blk_spin_us: u64,
    pub net: Option<NetMode>,
    pub net_dev: usize,
    pub net_ip: [u8; 4],
    pub net_secs: u64,
    pub net_frames: u64,
    pub net_tx_frames: u64,
    pub net_frame_len: u64,
    pub net_reflect: bool,
    pub vsock: Option<VsockMode>,
    pub vsock_port: u32,
    pub vsock_msg: &'static [u8],
    pub vsock_secs: u64,
    pub balloon: bool,
    pub balloon_secs: u64,
    pub balloon_changes: u64,
}

fn ip(v: &[u8]) -> Option<[u8; 4]> {
    let mut a = [0u8; 4];
    let mut parts = v.split(|&c| c == b'.');
    for b in a.iter_mut() {
        *b = u8::try_from(crate::parse_num(parts.next()?)?).ok()?;
    }
    parts.next().is_none().then_some(a)
}

fn hex(v: &[u8]) -> Option<u64> {
    let d = v.strip_prefix(b"0x")?;
    let mut n = 0u64;
    for &c in d {
        n = n
            .checked_mul(16)?
            .checked_add((c as char).to_digit(16)? as u64)?;
    }
    (!d.is_empty()).then_some(n)
}

impl DevOpts {
    /// Parses the device keys; other keys are ignored.
    pub fn parse(cmd: &'static [u8]) -> DevOpts {
        let mut o = DevOpts {
            pci: false,
            pci_ecam: 0,
            rng: None,
            blk: None,
            blk_sectors: 128,
            blk_seed: 1,
            blk_dev: 0,
            blk_mib: 16,
            blk_rand: 2000,
            blk_qd: 16,
            blk_spin_us: 1000,
            net: None,
            net_dev: 0,
            net_ip: [169, 254, 10, 2],
            net_secs: 10,
            net_frames: 0,
            net_tx_frames: 10000,
            net_frame_len: 1514,
            net_reflect: false,
            vsock: None,
            vsock_port: 1234,
            vsock_msg: b"hello",
            vsock_secs: 10,
            balloon: false,
            balloon_secs: 5,
            balloon_changes: 0,
        };
        for tok in cmd.split(|&c| c == b' ' || c == b'\t' || c == b'\n') {
            let Some(eq) = tok.iter().position(|&c| c == b'=') else {
                continue;
            };
            let (k, v) = (&tok[..eq], &tok[eq + 1..]);
            let n = crate::parse_num(v);
            match k {
                b"pci" => o.pci = v == b"on",
                b"pci_ecam" => o.pci_ecam = hex(v).unwrap_or(0),
                b"rng" => o.rng = n,
                b"blk" => {
                    o.blk = match v {
                        b"read" => Some(BlkMode::Read),
                        b"write" => Some(BlkMode::Write),
                        b"verify" => Some(BlkMode::Verify),
                        b"bench" => Some(BlkMode::Bench),
                        _ => None,
                    }
                }
                b"blk_sectors" => o.blk_sectors = n.unwrap_or(o.blk_sectors),
                b"blk_seed" => o.blk_seed = n.unwrap_or(o.blk_seed),
                b"blk_dev" => o.blk_dev = n.unwrap_or(0) as usize,
                b"blk_mib" => o.blk_mib = n.unwrap_or(o.blk_mib),
                b"blk_rand" => o.blk_rand = n.unwrap_or(o.blk_rand),
                b"blk_qd" => o.blk_qd = n.unwrap_or(o.blk_qd).clamp(1, 16),
                b"blk_spin" => o.blk_spin_us = n.unwrap_or(o.blk_spin_us).min(10_000_000),
                b"net" => {
                    o.net = match v {
                        b"on" => Some(NetMode::On),
                        b"bench" => Some(NetMode::Bench),
                        _ => None,
                    }
                }
                b"net_dev" => o.net_dev = n.unwrap_or(0) as usize,
                b"net_ip" => o.net_ip = ip(v).unwrap_or(o.net_ip),
                b"net_secs" => o.net_secs = n.unwrap_or(o.net_secs),
                b"net_frames" => o.net_frames = n.unwrap_or(0),
                b"net_tx_frames" => o.net_tx_frames = n.unwrap_or(o.net_tx_frames),
                b"net_reflect" => o.net_reflect = v == b"on",
                b"net_frame_len" => o.net_frame_len = n.unwrap_or(o.net_frame_len).clamp(60, 1514),
                b"vsock" => {
                    o.vsock = match v {
                        b"echo" => Some(VsockMode::Echo),
                        b"connect" => Some(VsockMode::Connect),
                        _ => None,
                    }
                }
                b"vsock_port" => o.vsock_port = n.unwrap_or(o.vsock_port as u64) as u32,
                b"vsock_msg" => o.vsock_msg = v,
                b"vsock_secs" => o.vsock_secs = n.unwrap_or(o.vsock_secs),
                b"balloon" => o.balloon = v == b"on",
                b"balloon_changes" => o.balloon_changes = n.unwrap_or(0),
                b"balloon_secs" => o.balloon_secs = n.unwrap_or(o.balloon_secs),
                _ => {}
            }
        }
        o
    }

    fn any(&self) -> bool {
        self.pci
            || self.rng.is_some()
            || self.blk.is_some()
            || self.net.is_some()
            || self.vsock.is_some()
            || self.balloon
    }
}

/// Everything the CPL3 device code works with (on the kernel stack, identity mapped).
pub struct Ctx {
    pub opts: DevOpts,
    pub pci: Pci,
    pub busy: Busy,
    pub funcs: [Func; MAX_FUNCS],
    pub nfuncs: usize,
    /// Memory for rings and buffers.
    pub dma: Dma,
    /// Free RAM above the DMA area (balloon pages), `[start, end)`.
    pub spare: [(u64, u64); 16],
    pub nspare: usize,
    /// BSP APIC id (MSI-X destination).
    pub apic: u32,
    /// Next free device vector index.
    pub next_irq: usize,
    /// DSDT address (for `_CBA` when there is no MCFG).
    pub dsdt: u64,
    /// RAM bytes (e820 type 1), for the balloon's statistics.
    pub ram: u64,
}

impl Ctx {
    /// The virtio functions found.
    pub fn funcs(&self) -> &[Func] {
        &self.funcs[..self.nfuncs]
    }

    /// Opens the `nth` virtio device of type `kind` on a fresh vector; prints `<name>=none` or
    /// `<name>=init_failed` when it cannot.
    pub fn open(&mut self, name: &str, kind: u16, nth: usize, want: u64) -> Option<virtio::Virtio> {
        let Some((_, f)) = virtio::find(self.funcs(), kind, nth) else {
            virtio::missing(name, false);
            return None;
        };
        let irq = self.next_irq.min(crate::irq::NIRQ - 1);
        self.next_irq += 1;
        let v = virtio::Virtio::open(&self.pci, &f, self.apic, irq, want);
        match &v {
            Some(d) => {
                Line::new().s(name).s("_msix=").dec(d.msix.size as u64);
            }
            None => virtio::missing(name, true),
        }
        v
    }
}

/// Most of the first free RAM range taken for rings and buffers.
const DMA_BYTES: u64 = 32 << 20;

extern "sysv64" fn scan_user(arg: u64) -> u64 {
    // SAFETY: `arg` is the address of the live `Ctx` on the kernel stack (identity mapped, user
    // accessible); the kernel does not touch it until this call returns.
    let c = unsafe { &mut *(arg as *mut Ctx) };
    if c.pci.ecam == 0 && c.dsdt != 0 {
        c.pci.ecam = crate::acpi::find_cba(c.dsdt);
        if c.pci.ecam != 0 {
            c.busy.add(c.pci.ecam, 1 << 20);
        }
    }
    match c.pci.ecam {
        0 => Line::new().s("pci_config=port"),
        a => Line::new().s("pci_config=ecam:").hex(a),
    };
    c.nfuncs = crate::pci::scan(&c.pci, &mut c.busy, &mut c.funcs);
    0
}

extern "sysv64" fn drive_user(arg: u64) -> u64 {
    // SAFETY: as in `scan_user`.
    let c = unsafe { &mut *(arg as *mut Ctx) };
    if let Some(n) = c.opts.rng {
        virtio::rng::run(c, n);
    }
    if let Some(m) = c.opts.blk {
        virtio::blk::run(c, m);
    }
    if let Some(m) = c.opts.net {
        virtio::net::run(c, m);
    }
    if let Some(m) = c.opts.vsock {
        virtio::vsock::run(c, m);
    }
    if c.opts.balloon {
        virtio::balloon::run(c);
    }
    0
}

/// The command line in, the device options out (parsed at CPL3: a byte-by-byte walk is costly
/// where CPL0 is emulated, and this runs on every boot).
struct ParseArg {
    cmd: &'static [u8],
    opts: DevOpts,
}

extern "sysv64" fn parse_user(arg: u64) -> u64 {
    // SAFETY: `arg` is the address of the live `ParseArg` on the kernel stack (identity mapped,
    // user accessible); the kernel does not touch it until this call returns.
    let p = unsafe { &mut *(arg as *mut ParseArg) };
    p.opts = DevOpts::parse(p.cmd);
    p.opts.any() as u64
}

/// Runs the device part of the command line (nothing when no device key is given).
pub fn run(
    cmdline: &'static [u8],
    si: &crate::pvh::StartInfo,
    ecam: u64,
    dsdt: u64,
    free: &crate::user::MemTest,
) {
    let mut p = ParseArg {
        cmd: cmdline,
        opts: DevOpts::parse(&[]),
    };
    if !matches!(user_call(parse_user, &mut p as *mut ParseArg as u64), Ok(1)) {
        return;
    }
    let opts = p.opts;
    let mut c = Ctx {
        opts,
        pci: Pci {
            ecam: if opts.pci_ecam != 0 {
                opts.pci_ecam
            } else {
                ecam
            },
        },
        busy: Busy {
            r: [(0, 0); 48],
            n: 0,
        },
        funcs: [Func::default(); MAX_FUNCS],
        nfuncs: 0,
        dma: Dma { next: 0, end: 0 },
        spare: [(0, 0); 16],
        nspare: 0,
        apic: 0,
        next_irq: 0,
        dsdt,
        ram: si.entries().filter(|e| e.kind == 1).map(|e| e.size).sum(),
    };
    for e in si.entries() {
        c.busy.add(e.addr, e.size);
    }
    if c.pci.ecam != 0 {
        c.busy.add(c.pci.ecam, 1 << 20);
    }
    c.busy.add(0xfec0_0000, 0x140_0000);
    for &(s, e) in &free.ranges[..free.n] {
        // The first range of at least 8 MiB; at most half of it, so the balloon keeps some.
        if c.dma.end == 0 && e - s >= 8 << 20 {
            let len = DMA_BYTES.min((e - s) / 2);
            c.dma = Dma {
                next: s,
                end: s + len,
            };
            if c.nspare < c.spare.len() {
                c.spare[c.nspare] = (s + len, e);
                c.nspare += 1;
            }
        } else if c.nspare < c.spare.len() {
            c.spare[c.nspare] = (s, e);
            c.nspare += 1;
        }
    }
    if user_call(scan_user, &mut c as *mut Ctx as u64).is_err() {
        return;
    }
    crate::irq::install();
    match crate::smp::irq_init() {
        Some(id) => {
            c.apic = id;
            IRQ_OK.store(true, Ordering::Release);
        }
        None => {
            Line::new().s("irq=none");
        }
    }
    let _ = user_call(drive_user, &mut c as *mut Ctx as u64);
    crate::smp::irq_done();
}
