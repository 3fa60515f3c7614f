/* smp: brings up every CPU (run it with --cpus 2 or more). The boot CPU asks fw_cfg
 * (port 0x510) how many CPUs the machine has, copies a real-mode trampoline to 0x6000
 * and starts the others with INIT, SIPI, SIPI to all but itself through its local APIC.
 * Each CPU prints its APIC id (taking turns through a lock) and counts itself in; when
 * all are in, the boot CPU exits with status 0.
 *   kvmfw run --kernel examples/guests/smp.elf --cpus 2 */
    .include "common.inc"
    .set TRAMP, 0x6000
    .set LOCK, 0x6f00               /* the print lock and the CPU counter, in low RAM */
    .set COUNT, 0x6f04
    .set APIC, 0xfee00000
    MULTIBOOT
    .globl _start
_start:
    mov $0x80000, %esp
    mov $0x0005, %ax                /* fw_cfg key 5: FW_CFG_NB_CPUS */
    mov $0x510, %dx
    out %ax, %dx
    inc %dx
    in %dx, %al                     /* the count, little-endian 16 bits */
    mov %al, %bl
    in %dx, %al
    mov %al, %bh
    movzwl %bx, %ebx                /* ebx: CPUs to wait for */
    PUTS cpus
    mov %bl, %al
    add $'0', %al
    PUTC %al
    PUTC $'\n'
    movl $0, LOCK
    movl $1, COUNT                  /* the boot CPU */
    mov $tramp, %esi
    mov $TRAMP, %edi
    mov $(tramp_end - tramp), %ecx
    rep movsb
    movl $0x000c4500, APIC + 0x300  /* INIT to all excluding self */
    movl $0x000c4606, APIC + 0x300  /* SIPI, vector 0x06: start at 0600:0000 */
    movl $0x000c4606, APIC + 0x300  /* SIPI again, as the MP specification says */
1:  pause
    cmp %ebx, COUNT                 /* wait for every CPU (a CPU that never comes up */
    jb 1b                           /*   leaves the run to --timeout) */
    PUTS allup
    EXIT 0
    PUTS_FUNC

    .code16
tramp:                              /* copied to 0x6000; each AP starts here in real mode */
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov $1, %eax
    cpuid
    shr $24, %ebx                   /* the initial APIC id */
2:  lock btsl $0, LOCK              /* take the print lock */
    jc 2b
    mov $(ap_msg - tramp + TRAMP), %si
3:  lodsb
    test %al, %al
    jz 4f
    call putc16
    jmp 3b
4:  mov %bl, %al
    add $'0', %al
    call putc16
    mov $'\n', %al
    call putc16
    movl $0, LOCK                   /* release */
    lock incl COUNT
5:  hlt
    jmp 5b
putc16:
    mov %al, %ah
    mov $COM1 + 5, %dx
6:  in %dx, %al
    test $0x20, %al
    jz 6b
    mov $COM1, %dx
    mov %ah, %al
    out %al, %dx
    ret
ap_msg: .asciz "application processor up, APIC id "
tramp_end:
    .code32

    .section .rodata
cpus:  .asciz "boot CPU: fw_cfg says the machine has CPUs: "
allup: .asciz "every CPU is up; exiting with status 0\n"
