/* latency.S - the latency-mmio test's guest: 16-bit real mode from the x86 reset vector,
 * run by every vCPU of the core tests' real-mode arch (a 4 KiB ROM at 0xfffff000, linked
 * at IP 0xf000). AX selects the program:
 *   1 (vCPU 0): write 0x12345678 to the latency device at 0xd0000, read it back, copy
 *     the answer to EDI, and end the run (port 0x13).
 *   2 (vCPU 1): increment the dword at 0x500 forever (the host reads it as progress).
 */
    .code16
    .text
    .globl _start
_start:
    xor %bx, %bx
    mov %bx, %ds
    cmp $1, %ax
    jne counter
    mov $0xd000, %bx
    mov %bx, %ds
    movl $0x12345678, (0)
    movl (0), %eax
    mov %eax, %edi
    out %al, $0x13
1:  cli
    hlt
    jmp 1b
counter:
    incl (0x500)
    jmp counter

    .org 0xff0
reset_vector:
    jmp _start
    .org 0x1000
