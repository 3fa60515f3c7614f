/* kvmfw's embedded x86 default guest: a multiboot v1 ELF32 kernel (32-bit protected mode,
 * entered like QEMU -kernel). It prints a greeting and what the boot loader told it on the
 * 16550 UART at 0x3f8, asks the pseudo-op device (MMIO 0xffff0000) to dump stats, and
 * exits with status 0 through the pseudo-op exit; without that device it halts with
 * interrupts off, which also ends the run with status 0. Kept short: on kvm_pvm every
 * CPL0 instruction is emulated. */
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00000003
    .set COM1, 0x3f8
    .set PSEUDO_OP, 0xffff0000

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

    .text
    .code32
    .globl _start
_start:
    mov $0x80000, %esp
    mov %ebx, %edi              /* multiboot info */
    mov $hello, %esi
    call puts
    cmp $0x2BADB002, %eax
    jne 1f
    mov $mbok, %esi
    call puts
    mov 16(%edi), %esi          /* command line */
    call puts
    mov $nl, %esi
    call puts
1:  movl $0, PSEUDO_OP + 0x4100 /* dump_stats */
    mov $bye, %esi
    call puts
    movl $0, PSEUDO_OP + 0x2100 /* exit(0) */
    cli
    hlt

/* puts(esi): polls the line status register (THR empty) before each byte */
puts:
    push %eax
    push %edx
2:  lodsb
    test %al, %al
    jz 4f
    mov %al, %ah
    mov $COM1 + 5, %dx
3:  inb %dx, %al
    test $0x20, %al
    jz 3b
    mov $COM1, %dx
    mov %ah, %al
    outb %al, %dx
    jmp 2b
4:  pop %edx
    pop %eax
    ret

    .section .rodata
hello: .asciz "Hello from kvmfw: the x86 default guest is running in 32-bit protected mode.\n"
mbok:  .asciz "Booted by kvmfw's multiboot loader; command line: "
nl:    .asciz "\n"
bye:   .asciz "Asked the pseudo-op device for stats; exiting with status 0.\n"
