/* Read the RTC's clock registers (NMI masked on the index port) and print them raw. */
    .include "common.inc"
    .code32
    .globl _start
_start:
    mov $0x90000, %esp
    mov $regs, %esi
1:  lodsb
    cmp $0xff, %al
    je 2f
    or $0x80, %al               /* NMI disabled while we read */
    out %al, $0x70
    in $0x71, %al
    PUTC %al
    jmp 1b
2:  mov $0x0d, %al              /* register D, NMI enabled again */
    out %al, $0x70
    in $0x71, %al
    PUTC %al
    DEBUG_EXIT 0
regs: .byte 0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32, 0x0a, 0x0b, 0xff
