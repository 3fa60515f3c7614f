/* Two lines, then a prompt without a newline, then spin: the prompt must show anyway. */
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
msg: .asciz "line one\nline two\nprompt> "
