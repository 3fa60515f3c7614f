/* The default x86 board as a guest sees it: COM1, the RTC, the i8042, fw_cfg, PCI through
 * 0xcf8 and the pseudo-op window. Prints what each answers, then pseudo-op exit(5). */
    .include "common.inc"
    .code32
    .globl _start
_start:
    mov $0x90000, %esp
    mov $0x0d, %al                  /* RTC register D: 0x80 (valid) */
    out %al, $0x70
    in $0x71, %al
    PUTC %al
    in $0x64, %al                   /* i8042 status */
    PUTC %al
    mov $0x510, %dx                 /* fw_cfg signature */
    xor %ax, %ax
    out %ax, %dx
    mov $4, %ebx
1:  mov $0x511, %dx
    in %dx, %al
    PUTC %al
    dec %ebx
    jnz 1b
    mov $0x80000000, %eax           /* PCI 00.0 vendor/device */
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %dx
    in %dx, %eax
    PUTD %eax
    movl $5, 0xffff2100             /* pseudo-op exit(5) */
2:  hlt
    jmp 2b
