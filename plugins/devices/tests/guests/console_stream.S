/* Print 'x' forever, no newline: the host ends the run (timeout, signal). */
    .include "common.inc"
    .code32
    .globl _start
_start:
    mov $0x90000, %esp
1:  mov $'x', %al
    PUTC %al
    jmp 1b
