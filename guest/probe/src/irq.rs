//! Device interrupt vectors: 32 IDT entries from `IRQ_BASE`, each counting its arrivals and
//! sending the LAPIC an EOI. The counts are read at CPL3 (the statics are identity mapped).

use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, Ordering};

/// First device vector.
pub const IRQ_BASE: u8 = 0x40;
/// Number of device vectors.
pub const NIRQ: usize = 32;

/// Interrupts taken per device vector (`IRQ_BASE + i`), incremented by `irq_common`.
#[no_mangle]
pub static IRQ_COUNT: [AtomicU32; NIRQ] = [const { AtomicU32::new(0) }; NIRQ];

extern "C" {
    static irq_stubs: u8;
}

// One 16-byte stub per vector (push RAX, load the index, jump), then the common part: count,
// EOI (x2APIC MSR or xAPIC MMIO, as `wake_isr` does), return. A handful of instructions, since
// CPL0 is emulated on some hosts.
global_asm!(
    r#"
    .section .text.irq, "ax", @progbits
    .balign 16
    .global irq_stubs
irq_stubs:
    .set irqn, 0
    .rept {n}
    .balign 16
    push %rax
    mov $irqn, %eax
    jmp irq_common
    .set irqn, irqn + 1
    .endr
irq_common:
    push %rcx
    push %rdx
    lea IRQ_COUNT(%rip), %rcx
    lock incl (%rcx,%rax,4)
    cmpb $0, LAPIC_X2(%rip)
    jne 1f
    mov LAPIC_EOI(%rip), %rax
    movl $0, (%rax)
    jmp 2f
1:  mov $0x80b, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
2:  pop %rdx
    pop %rcx
    pop %rax
    iretq
"#,
    n = const NIRQ,
    options(att_syntax)
);

/// Installs the device vectors in the IDT (CPL0, BSP).
pub fn install() {
    let base = core::ptr::addr_of!(irq_stubs) as u64;
    for i in 0..NIRQ as u64 {
        crate::trap::set_gate(IRQ_BASE + i as u8, base + i * 16);
    }
}

/// Interrupts taken so far on device vector index `i` (0 for indices out of range).
pub fn count(i: usize) -> u32 {
    IRQ_COUNT.get(i).map_or(0, |c| c.load(Ordering::Acquire))
}
