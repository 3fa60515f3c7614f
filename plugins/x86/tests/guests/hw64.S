/* 64-bit long mode (ELF64), for the hardening tests. RBX selects:
 * 0: rdtsc, an OUT to port 0xe8 (the host services it slowly), rdtsc again; reports the
 *    TSC delta across the exit (low, high dword) on port 0xe0.
 * 1: an 8-byte read of the local APIC's version register (0xfee00030), then a 4-byte
 *    read of it; reports both (low, high dword of the 8-byte read, then the 4-byte one). */
    .code64
    .globl _start
_start:
    cmp $1, %ebx
    je lapic8
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %r12
    out %al, $0xe8
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    sub %r12, %rax
    out %eax, $0xe0
    shr $32, %rax
    out %eax, $0xe0
    out %al, $0xe4
    hlt
lapic8:
    mov $0xfee00030, %esi
    mov (%rsi), %rax
    out %eax, $0xe0
    shr $32, %rax
    out %eax, $0xe0
    mov (%rsi), %eax
    out %eax, $0xe0
    out %al, $0xe4
    hlt
