/* Print a line through the 16550 by polling LSR.THRE, then leave through debug-exit. */
    .include "common.inc"
    .code32
    .globl _start
_start:
    mov $0x90000, %esp
    mov $msg, %esi
1:  lodsb
    test %al, %al
    jz 2f
    PUTC %al
    jmp 1b
2:  DEBUG_EXIT 0x21
msg: .asciz "kvmfw 16550\n"
