/* Lines, then text without a newline right before debug-exit ends the run. */
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
msg: .asciz "first\nsecond\nno newline at the end"
