/* 32-bit protected mode (ELF32) checksum loop with port IO and MMIO inside the loop
   (handover tests): result and iteration count to port 0xe0. */
    .code32
    .globl _start
_start:
    xor %ebx, %ebx
    xor %edi, %edi
    mov $400, %ecx
    mov $0xd0001000, %esi
    mov $0x100, %dx
1:  in (%dx), %eax
    add %eax, %ebx
    imul $31, %ebx, %ebx
    mov (%esi), %eax
    xor %eax, %ebx
    mov %ebx, (%esi)
    rol $5, %ebx
    mov %ebx, data
    add data, %ebx
    inc %edi
    dec %ecx
    jnz 1b
    mov %ebx, %eax
    out %eax, $0xe0
    mov %edi, %eax
    out %eax, $0xe0
    out %al, $0xe4
    hlt
    .data
data: .long 0
