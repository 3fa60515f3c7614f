/* fork.S - the fork tests' guest: 16-bit real mode from the x86 reset vector.
 *
 * Mapped as the 4 KiB ROM at 0xfffff000 (linked at IP 0xf000), as realmode.S.
 * Warm-up: fill the table t[i] = i*i (16-bit words, i < 0x4000) at 0x10000, then end
 * the run (write to port 0x13). Then, in each process after a fork: read a 32-bit value
 * v from port 0x14, compute r = r*31 + (t[i] ^ v) over the table (32-bit, r starts 0),
 * storing the low 16 bits of t[i] ^ v back into t[i] (so the guest dirties the table and
 * a second pass without a reset gives another result), write r to port 0x15 and end the
 * run again; then halt.
 */
    .code16
    .text
    .globl _start
_start:
    mov $0x1000, %ax
    mov %ax, %ds
    xor %bx, %bx
    xor %si, %si
1:  mov %bx, %ax
    mul %bx
    mov %ax, (%si)
    add $2, %si
    inc %bx
    cmp $0x4000, %bx
    jb 1b
    out %al, $0x13          /* warm: the run ends here */
    in $0x14, %eax
    mov %eax, %edx          /* v */
    xor %ecx, %ecx          /* r */
    xor %si, %si
2:  imul $31, %ecx, %ecx
    movzwl (%si), %eax
    xor %edx, %eax
    mov %ax, (%si)          /* the table is changed in place: a second pass differs */
    add %eax, %ecx
    add $2, %si
    cmp $0x8000, %si
    jb 2b
    mov %ecx, %eax
    out %eax, $0x15
    out %al, $0x13
3:  cli
    hlt
    jmp 3b

    .org 0xff0
reset_vector:
    jmp _start
    .org 0x1000
