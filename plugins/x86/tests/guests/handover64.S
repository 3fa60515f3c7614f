/* Long mode checksum loop with port IO and MMIO inside the loop (handover tests):
   each iteration reads port 0x100 (a counter device), reads and writes MMIO 0xd0001000,
   mixes into rbx; r12 counts iterations. Result to port 0xe0 (low, high), end at 0xe4. */
    .code64
    .globl _start
_start:
    xor %ebx, %ebx
    xor %r12d, %r12d
    mov $400, %ecx
    mov $0xd0001000, %rsi
    mov $0x100, %dx
1:  in (%dx), %eax
    add %rax, %rbx
    imul $31, %rbx, %rbx
    mov (%rsi), %eax
    xor %rax, %rbx
    mov %ebx, (%rsi)
    rol $5, %rbx
    mov %rbx, data(%rip)
    add data(%rip), %rbx
    inc %r12
    dec %ecx
    jnz 1b
    mov %ebx, %eax
    out %eax, $0xe0
    mov %rbx, %rax
    shr $32, %rax
    out %eax, $0xe0
    mov %r12d, %eax
    out %eax, $0xe0
    out %al, $0xe4
    hlt
    .data
data: .quad 0
