/* Enumerate PCI bus 0 through 0xcf8/0xcfc, size and program 01.0's BAR 0, use it. */
    .include "common.inc"
    .code32
    .globl _start
_start:
    mov $0x90000, %esp
    xor %ebx, %ebx              /* device number */
1:  mov %ebx, %eax
    shl $11, %eax
    or $0x80000000, %eax
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %dx
    in %dx, %eax
    cmp $0xffffffff, %eax
    je 2f
    mov %eax, %edi
    PUTC %bl
    PUTD %edi
2:  inc %ebx
    cmp $32, %ebx
    jne 1b
    mov $0x80000810, %eax       /* 01.0 BAR 0 */
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %dx
    mov $0xffffffff, %eax
    out %eax, %dx
    in %dx, %eax                /* the size mask */
    PUTD %eax
    mov $0xc0002000, %eax
    mov $0xcfc, %dx
    out %eax, %dx
    mov $0x80000804, %eax       /* 01.0 command: memory space on */
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %dx
    mov $0x0002, %ax
    out %ax, %dx
    movl $0x12345678, 0xc0002010
    mov 0xc0002010, %eax
    PUTD %eax
    DEBUG_EXIT 0
