//! Ferrovisor's probe: a tiny PVH kernel that reports what the VMM gives it on COM1, runs a few
//! timed workloads in user mode, and exits the way its command line asks.
//!
//! Kernel-mode (CPL0) work is kept to a minimum: on PVM hosts CPL0 is emulated at roughly two
//! million instructions a second while CPL3 runs natively. See README.md for the contract.

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod acpi;
mod beat;
mod boot;
mod count;
mod cpu;
mod devices;
mod dma;
mod exit;
mod irq;
mod kvmclock;
mod mem;
mod mmio;
mod msix;
mod paging;
mod pci;
mod phys;
mod pvh;
mod rtc;
mod serial;
mod smp;
mod trap;
mod user;
mod virtio;

use exit::Exit;
use serial::Line;

/// Options from the kernel command line.
struct Opts {
    exit: Exit,
    smp: bool,
    pio: Option<u64>,
    pio_kernel: bool,
    work: Option<u64>,
    memtest: Option<u64>,
    input: Option<u64>,
    count: Option<u64>,
}

pub(crate) fn parse_num(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &c in v {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add((c - b'0') as u64)?;
    }
    Some(n)
}

fn parse_cmdline(cmd: &[u8]) -> Opts {
    let mut o = Opts {
        exit: Exit::Poweroff,
        smp: true,
        pio: None,
        pio_kernel: false,
        work: None,
        memtest: None,
        input: None,
        count: None,
    };
    for tok in cmd.split(|&c| c == b' ' || c == b'\t' || c == b'\n') {
        let Some(eq) = tok.iter().position(|&c| c == b'=') else {
            continue;
        };
        let (k, v) = (&tok[..eq], &tok[eq + 1..]);
        match k {
            b"exit" => o.exit = Exit::parse(v).unwrap_or(Exit::Poweroff),
            b"smp" => o.smp = v != b"off",
            b"pio" => o.pio = parse_num(v),
            b"pio_cpl" => o.pio_kernel = v == b"0",
            b"work" => o.work = parse_num(v),
            b"memtest" => o.memtest = parse_num(v),
            b"input" => o.input = parse_num(v),
            b"count" => o.count = parse_num(v),
            _ => {}
        }
    }
    o
}

/// RAM ranges above the probe image, clipped to the mapped part of the address space.
fn free_ram(si: &pvh::StartInfo) -> user::MemTest {
    let mut m = user::MemTest {
        ranges: [(0, 0); user::MAX_RANGES],
        n: 0,
        bytes: 0,
    };
    let floor = (core::ptr::addr_of!(boot::__image_end) as u64 + 0x1f_ffff) & !0x1f_ffff;
    for e in si.entries() {
        if e.kind != 1 || m.n == user::MAX_RANGES {
            continue;
        }
        let s = e.addr.max(floor);
        let end = e.addr.saturating_add(e.size).min(phys::mapped_end()) & !7;
        if s < end {
            m.ranges[m.n] = (s, end);
            m.n += 1;
        }
    }
    m
}

/// Entry from `boot.rs` on the BSP, in long mode, with the boot stack.
#[no_mangle]
extern "sysv64" fn kmain(start_info: u32) -> ! {
    trap::init();
    let si = pvh::StartInfo::read(start_info as u64);
    if !si.valid {
        Line::new().s("pvh=bad_magic");
    }
    Line::new().s("cmdline=").b(si.cmdline);
    let opts = parse_cmdline(si.cmdline);

    let (mut ram, mut ram_end) = (0u64, 0u64);
    for e in si.entries() {
        Line::new()
            .s("e820=")
            .hex(e.addr)
            .s(",")
            .hex(e.size)
            .s(",")
            .dec(e.kind as u64);
        if e.kind == 1 {
            ram += e.size;
            ram_end = ram_end.max(e.addr.saturating_add(e.size));
        }
    }
    Line::new().s("mem_ram_bytes=").dec(ram);
    paging::map_high(ram_end);
    let kvmclock = kvmclock::init();

    let rsdp = acpi::find_rsdp(si.rsdp);
    let mut acpi = acpi::Acpi::parse(rsdp);
    Line::new().s("rsdp=").hex(rsdp);
    Line::new().s("acpi_oem=").b(acpi.oem_trimmed());
    Line::new().s("acpi_cpus=").dec(acpi.ncpus as u64);
    // One trip to CPL3 both proves user mode works and scans the DSDT for `_S5_`.
    let (user_ok, s5) = user::boot_check(acpi.dsdt.0);
    acpi.s5 = s5;
    {
        let mut l = Line::new();
        l.s("acpi_pm=");
        match (acpi.hw_reduced(), acpi.sleep_ctl, acpi.pm1a_cnt) {
            (true, Some(g), _) => l.s("sleep_reg:").hex(g.addr),
            (_, _, Some(g)) => l.s("pm1a:").hex(g.addr),
            _ => l.s("none"),
        };
        l.s(",s5:");
        match acpi.s5 {
            Some(v) => l.dec(v as u64),
            None => l.s("none"),
        };
    }
    Line::new().s("kvmclock=").dec(kvmclock as u64);

    let online = if opts.smp && acpi.ncpus > 1 {
        smp::start_aps(&acpi)
    } else {
        1
    };
    Line::new().s("cpus_online=").dec(online as u64);

    let t = rtc::read();
    {
        let mut l = Line::new();
        l.s("rtc=").dec(t.year as u64).s("-");
        two(&mut l, t.month).s("-");
        two(&mut l, t.day).s(" ");
        two(&mut l, t.hour).s(":");
        two(&mut l, t.min).s(":");
        two(&mut l, t.sec);
    }
    Line::new()
        .s("user=")
        .s(if user_ok { "ok" } else { "fail" });

    if let Some(n) = opts.pio {
        let ns = if opts.pio_kernel {
            user::pio_kernel(n)
        } else {
            user::pio(n).unwrap_or(0)
        };
        let per_sec = if ns == 0 {
            0
        } else {
            (n as u128 * 1_000_000_000 / ns as u128) as u64
        };
        Line::new()
            .s("pio_exits=")
            .dec(n)
            .s(" pio_ns=")
            .dec(ns)
            .s(" pio_per_sec=")
            .dec(per_sec);
    }
    let free = free_ram(&si);
    if let Some(rounds) = opts.work {
        let buf = free.ranges[..free.n]
            .iter()
            .find(|r| r.1 - r.0 >= user::WORK_BYTES)
            .map(|r| r.0);
        let mut w = user::Work {
            rounds,
            buf: buf.unwrap_or(0),
            sum: 0,
            ns: 0,
        };
        if buf.is_none() || !user::work(&mut w) {
            w.sum = 0;
        }
        Line::new()
            .s("work_rounds=")
            .dec(rounds)
            .s(" work_ns=")
            .dec(w.ns)
            .s(" work_sum=")
            .hex(w.sum);
    }
    if let Some(mib) = opts.memtest {
        let mut m = free;
        m.bytes = mib.saturating_mul(1 << 20);
        match user::memtest(&m) {
            Ok(()) => Line::new().s("memtest=ok"),
            Err(a) => Line::new().s("memtest=fail:").hex(a),
        };
    }

    if let Some(n) = opts.input {
        let mut buf = [0u8; serial::INPUT_MAX];
        let want = (n as usize).min(buf.len());
        let got = serial::read_input(&mut buf[..want], 10_000_000_000);
        Line::new().s("input=").escaped(&buf[..got]);
        if got < want {
            Line::new().s("input_timeout=").dec(got as u64);
        }
    }

    if let Some(ticks) = opts.count {
        let f = free_ram(&si);
        let region = f.ranges[..f.n]
            .iter()
            .find(|r| r.1 - r.0 >= count::REGION_BYTES)
            .map(|r| r.0);
        count::run(ticks, region);
    }

    beat::run(si.cmdline, &free_ram(&si));

    devices::run(si.cmdline, &si, acpi.ecam, acpi.dsdt.0, &free_ram(&si));

    Line::new().s("probe=done");
    Line::new().s("probe=exit:").s(opts.exit.name());
    exit::exit(opts.exit, &acpi)
}

fn two(l: &mut Line, v: u8) -> &mut Line {
    l.dec((v / 10) as u64).dec((v % 10) as u64)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    serial::raw(b"\nprobe=rust_panic:");
    if let Some(loc) = info.location() {
        serial::raw(loc.file().as_bytes());
        let mut buf = [0u8; 20];
        serial::raw(b":");
        serial::raw(serial::fmt_dec(loc.line() as u64, &mut buf));
    }
    serial::raw(b"\n");
    exit::panic_stop()
}
