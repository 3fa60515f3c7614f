/* Long mode (ELF64) checkpoint guest: known AVX/AVX2 (AVX-512 when RDI bit 0 is set),
 * x87, GPR and MSR state built at CPL3 while two timers interrupt it (PIT via the 8259 on
 * vector 0x20, the local APIC timer on 0x40; in-kernel irqchip).
 *
 * CPL0 setup (emulated on kvm_pvm): own GDT with user segments and a 64-bit TSS (RSP0 for
 * interrupts from CPL3), an IDT, known MSRs (SYSENTER_*, STAR/LSTAR/FMASK, KERNEL_GS_BASE,
 * PAT, FS_BASE; SYSENTER_ESP/EIP with 32-bit values: AMD keeps only their low half, and
 * KVM on AMD reads back only that half where the CPU (e.g. TCG's) keeps more, so a
 * 64-bit value would differ between a run and its restore for no fault of the restore),
 * 8259 + PIT at ~100 Hz, LAPIC timer periodic; then iretq to CPL3 with IF=1.
 * CPL3 (native): N iterations of vector/x87/GPR mixing, `progress` updated every 2^20
 * iterations. Half-way the guest marks the point where the host checkpoints or forks it:
 * it waits until both timers have ticked, then `int3` (#BP, a DPL3 gate; kvm_pvm turns
 * an `int $n` from CPL3 into #UD, not int3) copies the tick
 * counts to mark_pic/mark_apic and writes port 0xe2 (the reporter's mark, which the host
 * may stop at), so the stop is placed by the guest, not by the host's speed. After the
 * loop it waits until both timers ticked again since the mark (so they provably interrupt
 * a restored or forked guest). Then `ud2` (#UD, vector 6) reports on port
 * 0xe0, as dwords: the results (ymm0, ymm2, zmm17, zmm18, st0 as 10 bytes in 2 qwords, r8,
 * r9, the qword at %fs:0), the MSRs above read back, then the PIT and APIC tick counts
 * (timing-dependent: last), and ends the run (port 0xe4). Any other vector reports
 * 0xdead and ends the run. Host sets XCR0 (and CR4.OSXSAVE where CPUID has XSAVE). */
    .code64
    .globl _start, progress, ticks_pic, ticks_apic, mark_pic, mark_apic
    .set N, 0x10000000
    .set LAPIC, 0xfee00000
_start:
    mov %edi, flags(%rip)
    lgdt gdt_desc(%rip)
    pushq $0x08
    lea 1f(%rip), %rax
    push %rax
    lretq
1:  mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    lea kstack_top(%rip), %rsp
    /* TSS descriptor at 0x28: base = tss, limit 0x67, type 9, present */
    lea tss(%rip), %rax
    lea gdt(%rip), %rdi
    movw $0x67, 0x28(%rdi)
    mov %ax, 0x2a(%rdi)
    shr $16, %rax
    mov %al, 0x2c(%rdi)
    movb $0x89, 0x2d(%rdi)
    movb $0, 0x2e(%rdi)
    mov %ah, 0x2f(%rdi)
    shr $16, %rax
    mov %eax, 0x30(%rdi)
    movl $0, 0x34(%rdi)
    lea kstack_top(%rip), %rax
    mov %rax, tss+4(%rip)           /* RSP0 */
    movw $0x68, tss+0x66(%rip)      /* no IO bitmap */
    mov $0x28, %ax
    ltr %ax
    /* IDT: every vector to `unexpected`, then the real handlers */
    xor %ecx, %ecx
2:  lea unexpected(%rip), %rax
    mov $0x8e, %edx
    call set_gate
    inc %ecx
    cmp $256, %ecx
    jb 2b
    mov $0x20, %ecx
    lea tick_pic(%rip), %rax
    call set_gate
    mov $0x40, %ecx
    lea tick_apic(%rip), %rax
    call set_gate
    mov $0xff, %ecx
    lea spurious(%rip), %rax
    call set_gate
    mov $6, %ecx
    lea finish(%rip), %rax
    call set_gate
    mov $3, %ecx
    lea mark(%rip), %rax
    mov $0xee, %edx                 /* DPL3: CPL3 may `int3` */
    call set_gate
    lidt idt_desc(%rip)
    /* MSRs with known values */
    mov $0x174, %ecx
    mov $0x08, %eax
    xor %edx, %edx
    wrmsr
    mov $0x175, %ecx
    mov $0x9abcdef0, %eax
    xor %edx, %edx
    wrmsr
    mov $0x176, %ecx
    mov $0x13572468, %eax
    xor %edx, %edx
    wrmsr
    mov $0xc0000081, %ecx           /* STAR */
    xor %eax, %eax
    mov $0x00230008, %edx
    wrmsr
    mov $0xc0000082, %ecx           /* LSTAR */
    mov $0x12345678, %eax
    mov $0xffff8000, %edx
    wrmsr
    mov $0xc0000084, %ecx           /* FMASK */
    mov $0x4700, %eax
    xor %edx, %edx
    wrmsr
    mov $0xc0000102, %ecx           /* KERNEL_GS_BASE */
    mov $0x55667788, %eax
    mov $0x00003344, %edx
    wrmsr
    mov $0x277, %ecx                /* PAT */
    mov $0x00070106, %eax
    mov $0x00070106, %edx
    wrmsr
    mov $0xc0000100, %ecx           /* FS_BASE */
    lea fsdata(%rip), %rax
    mov %rax, %rdx
    shr $32, %rdx
    wrmsr
    /* 8259: vector base 0x20, only IRQ0; PIT channel 0 periodic at ~100 Hz */
    mov $0x11, %al
    out %al, $0x20
    mov $0x20, %al
    out %al, $0x21
    mov $0x04, %al
    out %al, $0x21
    mov $0x01, %al
    out %al, $0x21
    mov $0xfe, %al
    out %al, $0x21
    mov $0x34, %al
    out %al, $0x43
    mov $11932, %ax
    out %al, $0x40
    mov %ah, %al
    out %al, $0x40
    /* local APIC: enabled, timer periodic on vector 0x40 every 5,000,000 bus cycles */
    mov $LAPIC, %ebx
    movl $0x1ff, 0xf0(%rbx)
    movl $0xb, 0x3e0(%rbx)
    movl $0x20040, 0x320(%rbx)
    movl $5000000, 0x380(%rbx)
    /* to CPL3, interrupts on */
    pushq $0x1b
    lea ustack_top(%rip), %rax
    push %rax
    pushq $0x202
    pushq $0x23
    lea user(%rip), %rax
    push %rax
    iretq

/* IDT gate %ecx -> handler %rax, type/attributes %dl (selector 0x08) */
set_gate:
    lea idt(%rip), %rsi
    shl $4, %ecx
    add %rcx, %rsi
    shr $4, %ecx
    mov %ax, (%rsi)
    movw $0x08, 2(%rsi)
    movb $0, 4(%rsi)
    mov %dl, 5(%rsi)
    mov %rax, %r8
    shr $16, %r8
    mov %r8w, 6(%rsi)
    shr $16, %r8
    mov %r8d, 8(%rsi)
    movl $0, 12(%rsi)
    ret

tick_pic:
    push %rax
    incq ticks_pic(%rip)
    mov $0x20, %al
    out %al, $0x20
    pop %rax
    iretq

tick_apic:
    push %rax
    incq ticks_apic(%rip)
    mov $LAPIC, %eax
    movl $0, 0xb0(%rax)
    pop %rax
    iretq

spurious:
    iretq

/* int3 (#BP) from CPL3: the mark (interrupts off, so the counts are those at the stop) */
mark:
    push %rax
    mov ticks_pic(%rip), %rax
    mov %rax, mark_pic(%rip)
    mov ticks_apic(%rip), %rax
    mov %rax, mark_apic(%rip)
    out %al, $0xe2
    pop %rax
    iretq

unexpected:
    mov $0xdead, %eax
    out %eax, $0xe0
    out %al, $0xe4
    hlt
    jmp unexpected

/* reached from user mode with `ud2` (#UD): report (see the header) and end the run */
finish:
    cli
    lea results(%rip), %rsi
    mov $2 * NRES, %ecx
1:  mov (%rsi), %eax
    out %eax, $0xe0
    add $4, %rsi
    loop 1b
    lea msr_list(%rip), %rsi
2:  mov (%rsi), %ecx
    test %ecx, %ecx
    jz 3f
    rdmsr
    out %eax, $0xe0
    mov %edx, %eax
    out %eax, $0xe0
    add $4, %rsi
    jmp 2b
3:  mov ticks_pic(%rip), %eax
    out %eax, $0xe0
    mov ticks_apic(%rip), %eax
    out %eax, $0xe0
    out %al, $0xe4
4:  hlt
    jmp 4b

/* ---- CPL3 ---- */
user:
    mov flags(%rip), %edi
    vmovdqu init_a(%rip), %ymm0
    vmovdqu init_b(%rip), %ymm1
    vpxor %ymm2, %ymm2, %ymm2
    fninit
    fld1
    fldz                            /* st0 = 0, st1 = 1 */
    mov $0x0123456789abcdef, %r8
    mov $0x0fedcba987654321, %r9
    test $1, %edi
    jz 1f
    vmovdqu64 init_z(%rip), %zmm16
    vmovdqu64 init_z+64(%rip), %zmm17
    vpxorq %zmm18, %zmm18, %zmm18
    mov $0xa5a5a5a5a5a5a5a5, %rax
    kmovq %rax, %k1
1:  mov $N, %rcx
loop:
    vpaddq %ymm1, %ymm0, %ymm0
    vpxor %ymm0, %ymm2, %ymm2
    vpsllq $1, %ymm2, %ymm3
    vpsrlq $63, %ymm2, %ymm4
    vpor %ymm4, %ymm3, %ymm2        /* ymm2 = rol(ymm2 ^ ymm0, 1) */
    fadd %st(1), %st                /* st0 += 1 */
    add %rcx, %r8
    rol $7, %r9
    xor %r8, %r9
    test $1, %edi
    jz 2f
    vpaddq %zmm16, %zmm17, %zmm17
    vpxorq %zmm17, %zmm18, %zmm18{%k1}
    vprolq $3, %zmm18, %zmm18
2:  test $0xfffff, %ecx
    jnz 3f
    mov %rcx, progress(%rip)
    cmp $N / 2, %rcx
    jne 3f
    call wait_and_mark
3:  dec %rcx
    jnz loop
    movq $0, progress(%rip)
6:  pause                           /* both timers ticked since the mark */
    mov ticks_pic(%rip), %rax
    cmp mark_pic(%rip), %rax
    jbe 6b
    mov ticks_apic(%rip), %rax
    cmp mark_apic(%rip), %rax
    jbe 6b
    lea results(%rip), %rsi
    vmovdqu %ymm0, (%rsi)
    vmovdqu %ymm2, 32(%rsi)
    test $1, %edi
    jz 4f
    vmovdqu64 %zmm17, 64(%rsi)
    vmovdqu64 %zmm18, 128(%rsi)
4:  fstpt 192(%rsi)
    mov %r8, 208(%rsi)
    mov %r9, 216(%rsi)
    mov %fs:0, %rax
    mov %rax, 224(%rsi)
    ud2                             /* #UD: to `finish` at CPL0 */
5:  jmp 5b

/* CPL3: wait until both timers have ticked, then the mark */
wait_and_mark:
    push %rax
1:  pause
    mov ticks_pic(%rip), %rax
    test %rax, %rax
    jz 1b
    mov ticks_apic(%rip), %rax
    test %rax, %rax
    jz 1b
    int3
    pop %rax
    ret

    .data
    .align 16
gdt:
    .quad 0
    .quad 0x00AF9B000000FFFF        /* 0x08 kernel code64 */
    .quad 0x00CF93000000FFFF        /* 0x10 kernel data */
    .quad 0x00CFF3000000FFFF        /* 0x18 user data (0x1b) */
    .quad 0x00AFFB000000FFFF        /* 0x20 user code64 (0x23) */
    .quad 0, 0                      /* 0x28 TSS, filled at run time */
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .quad gdt
idt_desc:
    .word 256 * 16 - 1
    .quad idt
msr_list:
    .long 0x174, 0x175, 0x176, 0xc0000081, 0xc0000082, 0xc0000084, 0xc0000102, 0x277, 0
    .align 32
init_a:
    .quad 0x1111111111111111, 0x2222222222222222, 0x3333333333333333, 0x4444444444444444
init_b:
    .quad 0x0101010101010101, 0x0303030303030303, 0x0505050505050505, 0x0707070707070707
    .align 64
init_z:
    .quad 1, 2, 3, 4, 5, 6, 7, 8
    .quad 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80
fsdata:
    .quad 0xf5f5f5f5a0a0a0a0
progress:
    .quad 0
flags:
    .quad 0
ticks_pic:
    .quad 0
ticks_apic:
    .quad 0
mark_pic:
    .quad 0
mark_apic:
    .quad 0
    .set NRES, 29
    .align 64
results:
    .fill NRES, 8, 0
    .align 16
tss:
    .fill 0x68, 1, 0
    .align 4096
idt:
    .fill 256 * 16, 1, 0
    .fill 4096, 1, 0
kstack_top:
    .fill 4096, 1, 0
ustack_top:
