//! TSS, IDT, and the switch to CPL3 and back (`user_call`).
//!
//! `user_call(f, arg)` saves the kernel's callee-saved registers and stack pointer, `iretq`s to
//! CPL3 (IOPL 3, interrupts off) where it calls `f(arg)` on the user stack, and comes back when
//! `f` returns or when it faults (the exception handler unwinds to the saved kernel state).
//!
//! The way back is `int3` through a DPL3 gate (an `int 0x80` gate with DPL3 returns the same
//! way). `syscall` is deliberately not used: on a PVM host (non-PVM guest) `syscall` lands in
//! LSTAR without leaving user privilege and `int 0x80` raises #UD, while exceptions from CPL3,
//! `int3` included, are delivered through the IDT everywhere (also, PVM only accepts a STAR whose
//! user selectors match the host's). Likewise IOPL 3 is not honoured by PVM, so user-mode port
//! I/O is allowed by the TSS I/O bitmap (which PVM's emulation of the trapped `out` consults).
//!
//! Any other `int3` from CPL3 is a request to wait for an interrupt (`wait_for_irq`): the handler
//! sleeps once in `sti; hlt` and returns to the user code, so CPL3 device drivers can block on
//! MSI-X interrupts without leaving their call.

use crate::boot;
use crate::serial;
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

extern "C" {
    static isr_stubs: u8;
    static mut tss: [u8; TSS_SIZE];
    static mut idt: [u64; 2 * 256];
    fn wake_isr();
    fn int80_entry();
    fn user_call_asm(f: extern "sysv64" fn(u64) -> u64, arg: u64, stack_top: u64) -> u64;
}

// Exception stubs (16 bytes each so the IDT can be filled by index), the common exception path,
// the return path from CPL3 and the CPL3 entry trampoline.
global_asm!(
    r#"
    .section .text.trap, "ax", @progbits
    .balign 16
    .global isr_stubs
isr_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    .if (\v == 8) || ((\v >= 10) && (\v <= 14)) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
    .else
    pushq $0
    .endif
    pushq $\v
    jmp isr_common
    .endr

isr_common:
    /* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS. */
    testb $3, 24(%rsp)
    jnz 1f
    mov %rsp, %rdi
    and $-16, %rsp
    call kernel_fault
    ud2
1:  cmpq $3, (%rsp)
    jne 4f
    /* `int3` at the end of `user_entry` returns from `user_call`; any other `int3` from CPL3
       asks to wait for an interrupt (`wait_for_irq`): sleep once with interrupts open, then
       resume the user code right after its `int3`. No register is touched on that path. */
    cmpq $user_ret_point, 16(%rsp)
    je user_return
    add $16, %rsp
    sti
    hlt
    cli
    iretq
4:  mov %rsp, %rdi
    mov user_kernel_rsp(%rip), %rsp
    call user_fault
    mov $-1, %rax
    jmp user_resume

    /* Return from CPL3 with the result in RDI: `int3` (vector 3 from CPL3, the path used because
       it works on every host tried) or `int 0x80`. The frame on the trap stack is dropped. */
    .global int80_entry
int80_entry:
user_return:
    mov user_kernel_rsp(%rip), %rsp
    mov %rdi, %rax
user_resume:
    add $8, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret

    /* The wake-up interrupt (APs' IPIs and the BSP's LAPIC timer while it waits for them):
       count it, EOI (x2APIC MSR or xAPIC MMIO), return. */
    .global wake_isr
wake_isr:
    push %rax
    push %rcx
    push %rdx
    lock incl WAKE_COUNT(%rip)
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

    .global user_call_asm
user_call_asm:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    push %rax
    mov %rsp, user_kernel_rsp(%rip)
    pushq $0x23
    push %rdx
    pushq $0x3002
    pushq $0x2b
    lea user_entry(%rip), %rax
    push %rax
    iretq
user_entry:
    mov %rdi, %rax
    mov %rsi, %rdi
    call *%rax
    mov %rax, %rdi
    int3
user_ret_point:
    ud2

    .section .data.trap, "aw", @progbits
    .balign 16
    .global idt
idt:
    .fill 2 * 256, 8, 0
    .global user_kernel_rsp
user_kernel_rsp:
    .quad 0

    .balign 16
    .global tss
tss:
    .fill 104, 1, 0
    /* I/O permission bitmap: every port allowed at CPL3 (hosts that cannot give the guest IOPL 3,
       such as PVM, emulate user-mode port I/O and consult this bitmap). */
    .fill 8192, 1, 0
    .byte 0xff
"#,
    options(att_syntax)
);

/// Vector, RIP and CR2 of the last CPL3 fault (vector u64::MAX when the last call returned).
static USER_FAULT: [AtomicU64; 3] = [const { AtomicU64::new(u64::MAX) }; 3];

#[repr(C)]
struct Frame {
    vector: u64,
    err: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

fn cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 at CPL0 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

#[no_mangle]
extern "sysv64" fn kernel_fault(f: &Frame) -> ! {
    let mut b = [0u8; 18];
    serial::raw(b"\nprobe=fault:vec=");
    serial::raw(serial::fmt_hex(f.vector, &mut b));
    serial::raw(b",err=");
    serial::raw(serial::fmt_hex(f.err, &mut b));
    serial::raw(b",rip=");
    serial::raw(serial::fmt_hex(f.rip, &mut b));
    serial::raw(b",cr2=");
    serial::raw(serial::fmt_hex(cr2(), &mut b));
    serial::raw(b"\n");
    crate::exit::panic_stop()
}

#[no_mangle]
extern "sysv64" fn user_fault(f: &Frame) {
    USER_FAULT[0].store(f.vector, Ordering::Relaxed);
    USER_FAULT[1].store(f.rip, Ordering::Relaxed);
    USER_FAULT[2].store(cr2(), Ordering::Relaxed);
}

/// A CPL3 fault: vector, RIP, CR2.
#[derive(Clone, Copy)]
pub struct UserFault {
    /// Exception vector.
    pub vector: u64,
    /// Faulting instruction.
    pub rip: u64,
    /// CR2 at the time (page faults).
    pub cr2: u64,
}

/// Vector of the wake-up interrupt (see `smp`).
pub const WAKE_VECTOR: u8 = 0xf0;
/// Wake-up interrupts taken (incremented by `wake_isr`).
#[no_mangle]
pub static WAKE_COUNT: AtomicU32 = AtomicU32::new(0);
/// Whether the BSP's LAPIC is in x2APIC mode (`wake_isr` EOIs through the MSR then).
#[no_mangle]
pub static LAPIC_X2: AtomicBool = AtomicBool::new(false);
/// Address of the xAPIC EOI register (used by `wake_isr`).
#[no_mangle]
pub static LAPIC_EOI: AtomicU64 = AtomicU64::new(0xfee0_00b0);

/// TSS size: the 104-byte 64-bit TSS, an 8 KiB I/O bitmap, and its terminating 0xff byte.
const TSS_SIZE: usize = 104 + 8192 + 1;

fn gate(handler: u64, dpl: u64) -> [u64; 2] {
    let lo = (handler & 0xffff)
        | ((boot::KCODE64 as u64) << 16)
        | ((0x8e | (dpl << 5)) << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [lo, handler >> 32]
}

/// Loads the TSS and the IDT. BSP only.
pub fn init() {
    let trap_top = core::ptr::addr_of!(boot::trap_stack_top) as u64;
    // SAFETY: `tss`, `gdt` and `idt` are static tables only this function writes, before any
    // other CPU runs and before they are loaded; the writes stay inside their declared sizes.
    unsafe {
        let t = core::ptr::addr_of_mut!(tss) as *mut u8;
        (t.add(4) as *mut u64).write_unaligned(trap_top); // RSP0
        (t.add(102) as *mut u16).write_unaligned(104); // I/O bitmap right after the TSS
        let base = t as u64;
        let limit = (TSS_SIZE - 1) as u64;
        let lo = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        let g = core::ptr::addr_of_mut!(boot::gdt) as *mut u64;
        g.add(6).write_volatile(lo);
        g.add(7).write_volatile(base >> 32);

        let stubs = core::ptr::addr_of!(isr_stubs) as u64;
        let i = core::ptr::addr_of_mut!(idt) as *mut [u64; 2];
        for v in 0..32u64 {
            // #BP is reachable from CPL3: `int3` is how user mode returns.
            let dpl = if v == 3 { 3 } else { 0 };
            i.add(v as usize).write_volatile(gate(stubs + v * 16, dpl));
        }
        i.add(0x80)
            .write_volatile(gate(int80_entry as *const () as u64, 3));
        i.add(WAKE_VECTOR as usize)
            .write_volatile(gate(wake_isr as *const () as u64, 0));
    }
    let idtr: [u16; 5] = {
        let b = core::ptr::addr_of!(idt) as u64;
        [
            (256 * 16 - 1) as u16,
            b as u16,
            (b >> 16) as u16,
            (b >> 32) as u16,
            (b >> 48) as u16,
        ]
    };
    // SAFETY: the IDT and TSS were just initialised and live for the whole run.
    unsafe {
        asm!("lidt [{}]", in(reg) idtr.as_ptr(), options(nostack, readonly, preserves_flags));
        asm!("ltr {0:x}", in(reg) boot::TSS_SEL, options(nostack, nomem, preserves_flags));
    }
}

/// Installs interrupt gate `vector` (DPL 0) pointing at `handler`. BSP, CPL0, before the
/// vector can be raised.
pub fn set_gate(vector: u8, handler: u64) {
    let i = core::ptr::addr_of_mut!(idt) as *mut [u64; 2];
    // SAFETY: `vector` < 256 indexes inside the 256-entry IDT; only the BSP writes it, and the
    // vector is not in use yet (its source is programmed after this call).
    unsafe { i.add(vector as usize).write_volatile(gate(handler, 0)) };
}

/// Called at CPL3: sleeps in the kernel (`sti; hlt`) until the next interrupt (a device's MSI-X
/// vector or the periodic LAPIC timer), then returns. Interrupts that became pending while user
/// mode ran (with IF clear) end the sleep at once.
#[inline(always)]
pub fn wait_for_irq() {
    // `int3` from CPL3 enters `isr_common` through the DPL3 gate, which (the return address
    // not being `user_ret_point`) runs `sti; hlt; cli; iretq` on the trap stack. Memory is
    // clobbered on purpose: interrupt handlers update counters meanwhile.
    // SAFETY: it resumes here with every register and the user stack unchanged.
    unsafe { asm!("int3") };
}

/// Runs `f(arg)` at CPL3 on the user stack; Err if it faulted.
pub fn user_call(f: extern "sysv64" fn(u64) -> u64, arg: u64) -> Result<u64, UserFault> {
    let stack = core::ptr::addr_of!(boot::user_stack_top) as u64;
    USER_FAULT[0].store(u64::MAX, Ordering::Relaxed);
    // SAFETY: `f` is a function of this image (identity mapped, user accessible); it runs at CPL3
    // on a dedicated stack and only touches memory it is given. The assembly returns here with
    // the callee-saved registers and stack restored, on success or fault alike.
    let r = unsafe { user_call_asm(f, arg, stack) };
    let v = USER_FAULT[0].load(Ordering::Relaxed);
    if v != u64::MAX {
        let f = UserFault {
            vector: v,
            rip: USER_FAULT[1].load(Ordering::Relaxed),
            cr2: USER_FAULT[2].load(Ordering::Relaxed),
        };
        serial::Line::new()
            .s("user_fault=")
            .hex(f.vector)
            .s(",rip:")
            .hex(f.rip)
            .s(",cr2:")
            .hex(f.cr2);
        return Err(f);
    }
    Ok(r)
}
