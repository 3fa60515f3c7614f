/* hello: the smallest useful guest. Prints a line on the serial console (the 16550 at
 * 0x3f8 of the default board) and ends the run with status 0 through the pseudo-op
 * exit (a halted CPU alone does not end it: the in-kernel LAPIC could still wake it).
 *   kvmfw run --kernel examples/guests/hello.elf */
    .include "common.inc"
    MULTIBOOT
    .globl _start
_start:
    mov $0x80000, %esp
    PUTS hello
    EXIT 0
    PUTS_FUNC
    .section .rodata
hello: .asciz "Hello, world! (an example guest, on kvmfw's serial console)\n"
