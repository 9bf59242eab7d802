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
mod boot;
mod cpu;
mod exit;
mod mem;
mod phys;
mod pvh;
mod serial;

use exit::Exit;
use serial::Line;

/// Options from the kernel command line.
struct Opts {
    exit: Exit,
    smp: bool,
    pio: Option<u64>,
    work: Option<u64>,
    memtest: Option<u64>,
}

fn parse_num(v: &[u8]) -> Option<u64> {
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
    let mut o = Opts { exit: Exit::Poweroff, smp: true, pio: None, work: None, memtest: None };
    for tok in cmd.split(|&c| c == b' ' || c == b'\t' || c == b'\n') {
        let Some(eq) = tok.iter().position(|&c| c == b'=') else { continue };
        let (k, v) = (&tok[..eq], &tok[eq + 1..]);
        match k {
            b"exit" => o.exit = Exit::parse(v).unwrap_or(Exit::Poweroff),
            b"smp" => o.smp = v != b"off",
            b"pio" => o.pio = parse_num(v),
            b"work" => o.work = parse_num(v),
            b"memtest" => o.memtest = parse_num(v),
            _ => {}
        }
    }
    o
}

/// Entry from `boot.rs` on the BSP, in long mode, with the boot stack.
#[no_mangle]
extern "sysv64" fn kmain(start_info: u32) -> ! {
    let si = pvh::StartInfo::read(start_info as u64);
    if !si.valid {
        Line::new().s("pvh=bad_magic");
    }
    Line::new().s("cmdline=").b(si.cmdline);
    let opts = parse_cmdline(si.cmdline);

    let mut ram = 0u64;
    for e in si.entries() {
        Line::new().s("e820=").hex(e.addr).s(",").hex(e.size).s(",").dec(e.kind as u64);
        if e.kind == 1 {
            ram += e.size;
        }
    }
    Line::new().s("mem_ram_bytes=").dec(ram);

    let rsdp = acpi::find_rsdp(si.rsdp);
    let mut acpi = acpi::Acpi::parse(rsdp);
    Line::new().s("rsdp=").hex(rsdp);
    Line::new().s("acpi_oem=").b(acpi.oem_trimmed());
    Line::new().s("acpi_cpus=").dec(acpi.cpus_counted as u64);
    if acpi.dsdt.0 != 0 {
        let v = acpi::find_s5(acpi.dsdt.0);
        acpi.s5 = (v <= 0xff).then_some(v as u8);
    }
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

    Line::new().s("probe=done");
    Line::new().s("probe=exit:").s(opts.exit.name());
    exit::exit(opts.exit, &acpi)
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
