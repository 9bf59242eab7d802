//! memcpy/memmove/memset/memcmp/bcmp for the compiler (no libc here). String instructions keep
//! them short at CPL0, where every instruction is expensive on emulating hosts.

use core::arch::global_asm;

global_asm!(
    r#"
    .section .text.mem, "ax", @progbits
    .global memcpy
memcpy:
    mov %rdi, %rax
    mov %rdx, %rcx
    rep movsb
    ret

    .global memmove
memmove:
    mov %rdi, %rax
    mov %rdx, %rcx
    cmp %rsi, %rdi
    jbe 1f
    lea -1(%rsi,%rdx), %rsi
    lea -1(%rdi,%rdx), %rdi
    std
    rep movsb
    cld
    ret
1:  rep movsb
    ret

    .global memset
memset:
    mov %rdi, %r8
    mov %esi, %eax
    mov %rdx, %rcx
    rep stosb
    mov %r8, %rax
    ret

    .global memcmp
    .global bcmp
memcmp:
bcmp:
    xor %eax, %eax
    test %rdx, %rdx
    jz 2f
1:  movzbl (%rdi), %eax
    movzbl (%rsi), %ecx
    sub %ecx, %eax
    jnz 2f
    inc %rdi
    inc %rsi
    dec %rdx
    jnz 1b
2:  ret

    /* Referenced by the precompiled `core` in unoptimised builds; never called (panic=abort). */
    .global rust_eh_personality
rust_eh_personality:
    ud2
"#,
    options(att_syntax)
);
