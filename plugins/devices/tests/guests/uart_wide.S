/* Read the 16550's registers one byte and one word wide, then print what came back: a
   word read is not one register, so the device answers it (all ones), with the compiled
   path on or off. */
    .include "common.inc"
    .code32
    .globl _start
_start:
    mov $0x90000, %esp
    mov $0x3fb, %dx
    mov $0x03, %al
    out %al, %dx            /* LCR = 8N1 */
    mov $0x3fc, %dx
    mov $0x0b, %al
    out %al, %dx            /* MCR = DTR | RTS | OUT2 */
    mov $0x3fb, %dx
    in %dx, %ax             /* LCR and MCR as one word */
    mov %eax, %ebx
    mov $0x3fc, %dx
    in %dx, %al             /* MCR alone */
    mov %al, %cl
    PUTC %bl
    PUTC %bh
    PUTC %cl
    DEBUG_EXIT 0x21
