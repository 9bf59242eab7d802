//! The PVH entry (32-bit protected mode, paging off), the static GDT and page tables, and the
//! switch to long mode. Everything here runs before Rust code and is kept to a few hundred
//! instructions: on hosts where CPL0 is emulated each instruction costs about half a microsecond.
//!
//! Layout of the GDT (also used by the AP trampoline and by user mode):
//! 0x08 kernel code 64, 0x10 kernel data, 0x18 user code 32 (unused), 0x20 user data,
//! 0x28 user code 64, 0x30 TSS (16 bytes, filled in by `cpu::init`), 0x40 kernel code 32.

use core::arch::global_asm;

/// Kernel code selector (64-bit).
pub const KCODE64: u16 = 0x08;
/// TSS selector.
pub const TSS_SEL: u16 = 0x30;

extern "C" {
    /// The GDT (9 descriptors).
    pub static mut gdt: [u64; 9];
    /// The page-directory-pointer table covering 0..512 GiB (entries 0..3 point at static PDs).
    pub static mut pdpt: [u64; 512];
    /// Spare page directories for 2 MiB mappings above 4 GiB (60 of them, not zeroed).
    pub static mut pd_high: [[u64; 512]; 60];
    /// Top of the stack used on entry from CPL3 (TSS.RSP0).
    pub static trap_stack_top: u8;
    /// Start of the scratch region the user-mode workloads use as their stack.
    pub static user_stack_top: u8;
    /// End of the loaded image (page aligned).
    pub static __image_end: u8;
}

// The PVH ELF note: name "Xen", type 18 (XEN_ELFNOTE_PHYS32_ENTRY), a 32-bit entry address.
global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4
"#,
    options(att_syntax)
);

// 32-bit entry: write the start marker, zero .bss, load our GDT, enable PAE + long mode + paging
// with the static identity map, and jump to 64-bit code. EBX holds the start info address.
global_asm!(
    r#"
    .section .text.boot, "ax", @progbits
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    mov $0x3f8, %edx
    mov $probe_start_msg, %esi
1:  lodsb
    test %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb
    mov %ebx, boot_info_ptr
    lgdtl gdt_ptr
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    /* CR4: PAE | OSFXSR | OSXMMEXCPT */
    mov %cr4, %eax
    or $0x620, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    /* EFER: LME (and SCE, harmless: syscall is not used) */
    mov $0xc0000080, %ecx
    rdmsr
    or $0x101, %eax
    wrmsr
    /* CR0: PG | NE | MP | PE, clear CD, NW, TS, EM */
    mov %cr0, %eax
    and $0x9ffffff3, %eax
    or $0x80000023, %eax
    mov %eax, %cr0
    .byte 0xea
    .long start64
    .word 0x08

    .code64
start64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    lea bsp_stack_top(%rip), %rsp
    mov boot_info_ptr(%rip), %edi
    call kmain
3:  cli
    hlt
    jmp 3b

    .section .rodata.boot, "a", @progbits
probe_start_msg:
    .asciz "probe=start\n"
"#,
    options(att_syntax)
);

// GDT, its pseudo-descriptor, and the boot variables that must survive the .bss clear.
global_asm!(
    r#"
    .section .data.boot, "aw", @progbits
    .balign 16
    .global gdt
gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cffa000000ffff
    .quad 0x00cff2000000ffff
    .quad 0x00affa000000ffff
    .quad 0
    .quad 0
    .quad 0x00cf9a000000ffff
gdt_end:
    .balign 8
    .global gdt_ptr
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
    .balign 4
    .global boot_info_ptr
boot_info_ptr:
    .long 0
"#,
    options(att_syntax)
);

// Identity map of 0..4 GiB with 2 MiB pages, user-accessible (U bit everywhere: user mode runs
// code and touches data anywhere). 3..4 GiB (MMIO: LAPIC, IOAPIC, ...) is uncached.
// Built by the assembler so that no CPL0 loop has to write 2048 entries at boot.
global_asm!(
    r#"
    .section .data.pagetables, "aw", @progbits
    .balign 4096
    .global pml4
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
    .global pdpt
pdpt:
    .quad pd_low + 0x0007
    .quad pd_low + 0x1007
    .quad pd_low + 0x2007
    .quad pd_low + 0x3007
    .fill 508, 8, 0
pd_low:
    .set pgidx, 0
    .rept 1536
    .quad (pgidx << 21) | 0x87
    .set pgidx, pgidx + 1
    .endr
    .rept 512
    .quad (pgidx << 21) | 0x9f
    .set pgidx, pgidx + 1
    .endr

    .section .noinit.stacks, "aw", @nobits
    .balign 4096
    .global pd_high
pd_high:
    .skip 60 * 4096
bsp_stack:
    .skip 32768
    .global bsp_stack_top
bsp_stack_top:
    .skip 4096
    .global trap_stack_top
trap_stack_top:
    .skip 65536
    .global user_stack_top
user_stack_top:
"#,
    options(att_syntax)
);
