/* Long mode: loads an empty IDT and divides by zero -> triple fault. */
    .code64
    .globl _start
_start:
    xor %ecx, %ecx
    div %ecx
    hlt
