//! AP bring-up: INIT-SIPI-SIPI to every enabled MADT processor, a real-mode trampoline at
//! 0x8000 that reuses the BSP's GDT and page tables, and a per-AP `ap=<id>` report.

use crate::acpi::Acpi;
use crate::cpu::{cpuid, pause, rdmsr, wrmsr};
use crate::serial::Line;
use crate::trap::{LAPIC_EOI, LAPIC_X2, WAKE_COUNT, WAKE_VECTOR};
use crate::{kvmclock, phys};
use core::arch::asm;
use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Where the trampoline is copied (page aligned, below 1 MiB: SIPI vector 0x08).
const TRAMPOLINE: u64 = 0x8000;
/// APs that get a stack (more are not started).
pub const MAX_APS: usize = 127;

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
}

// Real mode (CS = 0x0800, IP = 0) -> protected mode (selector 0x40) -> long mode, then into the
// kernel image. Only position-independent references inside the copied page; kernel symbols are
// absolute addresses below 4 GiB.
global_asm!(
    r#"
    .section .text.ap, "ax", @progbits
    .global ap_tramp_start
    .global ap_tramp_end
    .code16
ap_tramp_start:
    cli
    cld
    xor %ax, %ax
    mov %ax, %ds
    lgdtl 0x8000 + (ap_gdtr - ap_tramp_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    .byte 0x66, 0xea
    .long 0x8000 + (ap_pm32 - ap_tramp_start)
    .word 0x40
    .code32
ap_pm32:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %cr4, %eax
    or $0x620, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx
    rdmsr
    or $0x101, %eax
    wrmsr
    mov %cr0, %eax
    and $0x9ffffff3, %eax
    or $0x80000023, %eax
    mov %eax, %cr0
    .byte 0xea
    .long ap_start64
    .word 0x08
    .balign 8
ap_gdtr:
    .word 9 * 8 - 1
    .long gdt
ap_tramp_end:

    .code64
    .section .text, "ax", @progbits
ap_start64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $1, %eax
    lock xadd %eax, ap_next_stack(%rip)
    cmp ${max_aps}, %eax
    jae 2f
    inc %eax
    shl $13, %rax
    lea ap_stacks(%rip), %rsp
    add %rax, %rsp
    call ap_main
2:  cli
    hlt
    jmp 2b

    .section .data.ap, "aw", @progbits
    .balign 4
ap_next_stack:
    .long 0
    .section .noinit.ap, "aw", @nobits
    .balign 4096
ap_stacks:
    .skip 8192 * {max_aps}
"#,
    max_aps = const MAX_APS,
    options(att_syntax)
);

/// Reported APIC ids (bit per id, ids below 1024).
static REPORTED: [AtomicU64; 16] = [const { AtomicU64::new(0) }; 16];
/// APs that printed their line.
static ONLINE: AtomicU32 = AtomicU32::new(0);
/// Whether the BSP sleeps in `hlt` while it waits (then each AP sends it a wake-up IPI).
static BSP_SLEEPS: AtomicBool = AtomicBool::new(false);
/// The BSP's APIC id.
static BSP_ID: AtomicU32 = AtomicU32::new(0);

/// This CPU's APIC id (x2APIC id when CPUID leaf 0xB has it).
pub fn apic_id() -> u32 {
    let (max, ..) = cpuid(0, 0);
    if max >= 0xb {
        let (_, b, _, d) = cpuid(0xb, 0);
        if b != 0 {
            return d;
        }
    }
    cpuid(1, 0).1 >> 24
}

#[no_mangle]
extern "sysv64" fn ap_main() -> ! {
    let id = apic_id();
    let mut line = Line::new();
    line.s("ap=").dec(id as u64);
    if id < 1024 {
        REPORTED[(id / 64) as usize].fetch_or(1 << (id % 64), Ordering::AcqRel);
    }
    ONLINE.fetch_add(1, Ordering::AcqRel);
    drop(line);
    if BSP_SLEEPS.load(Ordering::Acquire) {
        Lapic::current().ipi(BSP_ID.load(Ordering::Relaxed), 0x4000 | WAKE_VECTOR as u32);
    }
    crate::cpu::halt_forever()
}

struct Lapic {
    x2: bool,
    base: u64,
}

impl Lapic {
    /// This CPU's LAPIC (mode and base from IA32_APIC_BASE).
    fn current() -> Lapic {
        let v = rdmsr(0x1b);
        Lapic {
            x2: v & (1 << 10) != 0,
            base: v & 0x000f_ffff_ffff_f000,
        }
    }

    fn read(&self, reg: u32) -> u32 {
        if self.x2 {
            rdmsr(0x800 + (reg >> 4)) as u32
        } else {
            phys::r32(self.base + reg as u64)
        }
    }

    fn write(&self, reg: u32, val: u32) {
        if self.x2 {
            wrmsr(0x800 + (reg >> 4), val as u64);
        } else {
            phys::write(self.base + reg as u64, 4, val as u64);
        }
    }

    /// Software-enables the LAPIC, tells the wake ISR how to EOI, and checks with a self-IPI
    /// that interrupts reach this CPU. Only then is it safe to wait in `hlt`.
    fn enable_and_test(&self) -> bool {
        // Firmware (SeaBIOS on q35) may have left the 8259s routed through LINT0 with the PIT
        // ticking: mask both PICs and the LINTs so that only the wake vector can arrive.
        crate::cpu::outb(0x21, 0xff);
        crate::cpu::outb(0xa1, 0xff);
        self.write(0x350, 1 << 16);
        self.write(0x360, 1 << 16);
        LAPIC_X2.store(self.x2, Ordering::Relaxed);
        LAPIC_EOI.store(self.base + 0xb0, Ordering::Relaxed);
        // SVR: software enable; spurious interrupts also go to the wake vector (its ISR's EOI is
        // harmless for them), so no vector without an IDT entry can be raised.
        self.write(0xf0, (self.read(0xf0) & !0xff) | 0x100 | WAKE_VECTOR as u32);
        let before = WAKE_COUNT.load(Ordering::Acquire);
        self.ipi(0, (1 << 18) | 0x4000 | WAKE_VECTOR as u32); // shorthand: self
                                                              // SAFETY: the IDT has a handler for WAKE_VECTOR and nothing else can arrive (PICs and
                                                              // LINTs masked above, the timer LVT is masked after reset); interrupts are open only
                                                              // for the short poll below.
        unsafe { asm!("sti", options(nostack)) };
        let mut seen = false;
        for _ in 0..5000 {
            if WAKE_COUNT.load(Ordering::Acquire) != before {
                seen = true;
                break;
            }
            pause();
        }
        // SAFETY: closes the window opened above.
        unsafe { asm!("cli", options(nostack)) };
        seen
    }

    /// Periodic LAPIC timer on the wake vector (`count` bus cycles, divide by 1), or off.
    fn timer(&self, count: Option<u32>) {
        match count {
            Some(c) => {
                self.write(0x3e0, 0xb);
                self.write(0x320, (1 << 17) | WAKE_VECTOR as u32);
                self.write(0x380, c);
            }
            None => {
                self.write(0x320, 1 << 16);
                self.write(0x380, 0);
            }
        }
    }

    fn ipi(&self, dest: u32, lo: u32) {
        if self.x2 {
            wrmsr(0x830, ((dest as u64) << 32) | lo as u64);
            return;
        }
        phys::write(self.base + 0x310, 4, (dest as u64) << 24);
        phys::write(self.base + 0x300, 4, lo as u64);
        let mut n = 0;
        while phys::r32(self.base + 0x300) & (1 << 12) != 0 && n < 1000 {
            pause();
            n += 1;
        }
    }
}

/// Starts every enabled AP of the MADT and waits for their reports. Returns CPUs online.
pub fn start_aps(acpi: &Acpi) -> u32 {
    let me = apic_id();
    let len =
        core::ptr::addr_of!(ap_tramp_end) as usize - core::ptr::addr_of!(ap_tramp_start) as usize;
    // SAFETY: 0x8000..0x9000 is reserved for the probe's trampoline by the boot contract (RAM,
    // unused by the loader); the source is the trampoline's bytes in this image; len < 4 KiB.
    unsafe {
        core::ptr::copy_nonoverlapping(
            core::ptr::addr_of!(ap_tramp_start),
            TRAMPOLINE as *mut u8,
            len,
        )
    };
    let lapic = Lapic::current();
    BSP_ID.store(me, Ordering::Relaxed);
    let sleep = lapic.enable_and_test();
    BSP_SLEEPS.store(sleep, Ordering::Release);
    let mut started = 0u32;
    for id in acpi.cpus() {
        if id == me || started as usize >= MAX_APS || (!lapic.x2 && id > 0xff) {
            continue;
        }
        lapic.ipi(id, 0x4500); // INIT, assert
        lapic.ipi(id, 0x4600 | (TRAMPOLINE >> 12) as u32); // SIPI
        lapic.ipi(id, 0x4600 | (TRAMPOLINE >> 12) as u32); // SIPI again
        started += 1;
    }
    // Generous: 5 s of kvmclock; without it, 500 timer ticks (~10 ms each on KVM's 1 GHz APIC
    // bus) when sleeping, or a large number of spins.
    let deadline = kvmclock::now_ns() + 5_000_000_000;
    let mut spins = 0u64;
    if sleep {
        lapic.timer(Some(10_000_000));
    }
    while ONLINE.load(Ordering::Acquire) < started {
        spins += 1;
        if sleep {
            // SAFETY: `sti; hlt` is atomic with respect to interrupts (STI shadow), so a wake-up
            // IPI sent after the check above still ends the `hlt`; the periodic timer bounds the
            // sleep in any case. The wake ISR only counts and EOIs.
            unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
        } else {
            pause();
        }
        let expired = if kvmclock::enabled() {
            (sleep || spins.is_multiple_of(64)) && kvmclock::now_ns() > deadline
        } else {
            spins
                > if sleep {
                    500 + MAX_APS as u64
                } else {
                    200_000_000
                }
        };
        if expired {
            break;
        }
    }
    if sleep {
        lapic.timer(None);
    }
    for id in acpi.cpus() {
        if id == me {
            continue;
        }
        let seen = id < 1024
            && REPORTED[(id / 64) as usize].load(Ordering::Acquire) & (1 << (id % 64)) != 0;
        if !seen {
            Line::new().s("ap_timeout=").dec(id as u64);
        }
    }
    1 + ONLINE.load(Ordering::Acquire)
}

/// Period of the LAPIC timer while devices run (bus cycles; ~1 ms on KVM's 1 GHz APIC bus):
/// it bounds every `wait_for_irq` sleep.
const DEVICE_TICK: u32 = 1_000_000;

/// Prepares the BSP for device interrupts (MSI-X): LAPIC software-enabled and checked with a
/// self-IPI (PICs and LINTs masked), and a periodic timer on the wake vector so that no sleep
/// lasts longer than a tick. Returns the BSP's APIC id, or None when interrupts do not arrive.
pub fn irq_init() -> Option<u32> {
    let lapic = Lapic::current();
    if !lapic.enable_and_test() {
        return None;
    }
    lapic.timer(Some(DEVICE_TICK));
    Some(apic_id())
}

/// Stops the periodic timer started by `irq_init`.
pub fn irq_done() {
    Lapic::current().timer(None);
}
