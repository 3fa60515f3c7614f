/* Long mode at CPL0 (ELF64): state round trip for GPRs, CRs, MSRs and segments.
 * Reports CR0, CR3, CR4, KERNEL_GS_BASE (lo, hi), DS selector; writes
 * KERNEL_GS_BASE + 1 and FS_BASE = 0x12345000; adds 0x1111 to rbx, rsi, rdi, rbp,
 * r8-r15. */
    .code64
    .globl _start
_start:
    mov %cr0, %rax
    out %eax, $0xe0
    mov %cr3, %rax
    out %eax, $0xe0
    mov %cr4, %rax
    out %eax, $0xe0
    mov $0xc0000102, %ecx
    rdmsr
    out %eax, $0xe0
    xchg %eax, %edx
    out %eax, $0xe0
    xchg %eax, %edx
    add $1, %eax
    wrmsr
    mov $0xc0000100, %ecx
    mov $0x12345000, %eax
    xor %edx, %edx
    wrmsr
    mov %ds, %eax
    out %eax, $0xe0
    add $0x1111, %rbx
    add $0x1111, %rsi
    add $0x1111, %rdi
    add $0x1111, %rbp
    add $0x1111, %r8
    add $0x1111, %r9
    add $0x1111, %r10
    add $0x1111, %r11
    add $0x1111, %r12
    add $0x1111, %r13
    add $0x1111, %r14
    add $0x1111, %r15
    out %al, $0xe4
    hlt
