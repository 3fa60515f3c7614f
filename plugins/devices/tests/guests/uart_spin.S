/* Print a line through the 16550 by polling LSR.THRE, then spin without exits: the line
   must still reach the host (the 16550's coalesced THR writes are flushed by an event). */
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
2:  jmp 2b
msg: .asciz "printed, now spinning\n"
