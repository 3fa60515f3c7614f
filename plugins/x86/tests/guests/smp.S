/* Multiboot v1 ELF32 SMP bring-up, as an OS without ACPI does it.
 *
 * The boot CPU finds the MP floating pointer in 0xF0000-0xFFFFF, checks both checksums,
 * walks the configuration table and counts the enabled processors, keeping the APIC ids of
 * the application processors. It reports (port 0xe0): the processor count, its own APIC id
 * read from the local APIC (MMIO 0xFEE00020). It copies a real-mode trampoline to 0x6000
 * and sends each AP INIT, SIPI, SIPI (vector 0x06) through the local APIC's ICR. Each AP
 * starts in real mode at 0600:0000, reads its APIC id with CPUID leaf 1, sets its bit in a
 * mask at 0x6F04, reports 0xA00 | id, increments the counter at 0x6F00 (both locked) and
 * halts. The BSP waits for the counter to reach the processor count, reports
 * the counter and the mask, and ends the run (port 0xe4). Errors report 0xDEAD000x. */
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00000003
    .set TRAMP, 0x6000
    .set COUNTER, 0x6F00
    .set MASK, 0x6F04
    .set APIC, 0xFEE00000
    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
    .text
    .code32
    .globl _start
_start:
    mov $0xF0000, %esi
1:  cmpl $0x5F504D5F, (%esi)        /* "_MP_" */
    jne 2f
    xor %eax, %eax
    xor %ecx, %ecx
3:  addb (%esi,%ecx), %al
    inc %ecx
    cmp $16, %ecx
    jb 3b
    test %al, %al
    jz found
2:  add $16, %esi
    cmp $0x100000, %esi
    jb 1b
    mov $0xDEAD0001, %eax           /* no MP floating pointer */
    jmp fail
found:
    mov 4(%esi), %esi               /* the configuration table */
    cmpl $0x504D4350, (%esi)        /* "PCMP" */
    mov $0xDEAD0002, %eax
    jne fail
    movzwl 4(%esi), %ecx
    xor %eax, %eax
    xor %edx, %edx
4:  addb (%esi,%edx), %al
    inc %edx
    cmp %ecx, %edx
    jb 4b
    test %al, %al
    mov $0xDEAD0003, %eax           /* bad table checksum */
    jnz fail
    movzwl 34(%esi), %ecx           /* entry count */
    lea 44(%esi), %edi
    xor %ebx, %ebx                  /* enabled processors */
    mov $ap_ids, %ebp
5:  cmpb $0, (%edi)
    jne 6f
    testb $1, 3(%edi)               /* enabled */
    jz 7f
    inc %ebx
    testb $2, 3(%edi)               /* the BSP */
    jnz 7f
    movzbl 1(%edi), %eax
    mov %eax, (%ebp)
    add $4, %ebp
7:  add $20, %edi
    jmp 8f
6:  add $8, %edi
8:  loop 5b
    mov %ebx, %eax
    out %eax, $0xe0                 /* processors in the MP table */
    mov APIC+0x20, %eax
    shr $24, %eax
    out %eax, $0xe0                 /* my APIC id, from the local APIC */
    movl $1, COUNTER
    movl $0, MASK
    mov $tramp, %esi
    mov $TRAMP, %edi
    mov $(tramp_end - tramp), %ecx
    rep movsb
    mov $ap_ids, %esi
9:  cmp %ebp, %esi
    jae 10f
    mov (%esi), %eax
    shl $24, %eax
    mov %eax, APIC+0x310            /* destination */
    movl $0x00004500, APIC+0x300    /* INIT */
    mov %eax, APIC+0x310
    movl $0x00004606, APIC+0x300    /* SIPI, vector 0x06 */
    mov %eax, APIC+0x310
    movl $0x00004606, APIC+0x300    /* SIPI again (as the MP spec says) */
    add $4, %esi
    jmp 9b
10:                                 /* no iteration bound: how many BSP iterations an AP
                                     * takes to come up depends on host load (the test's run
                                     * timeout is the bound) */
11: cmp %ebx, COUNTER
    jae 12f
    pause
    jmp 11b
12: mov COUNTER, %eax
    out %eax, $0xe0                 /* CPUs up, BSP included */
    mov MASK, %eax
    out %eax, $0xe0                 /* APIC ids of the APs that came up */
    out %al, $0xe4
    hlt
fail:
    out %eax, $0xe0
    out %al, $0xe4
    hlt

    .code16
tramp:                              /* copied to 0x6000; entered at 0600:0000 */
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov $1, %eax
    cpuid
    shr $24, %ebx
    lock btsl %ebx, MASK
    mov %bx, %ax
    or $0xA00, %ax
    out %ax, $0xe0
    lock incl COUNTER               /* last: the BSP may end the run once all are in */
13: hlt
    jmp 13b
tramp_end:

    .bss
    .align 4
ap_ids:
    .space 4 * 256
