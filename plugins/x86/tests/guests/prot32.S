/* 32-bit protected mode (ELF32): 10! = 3628800 on port 0xe0, then CS and CR0. */
    .code32
    .globl _start
_start:
    mov $1, %eax
    mov $1, %ecx
1:  imul %ecx, %eax
    inc %ecx
    cmp $11, %ecx
    jne 1b
    out %eax, $0xe0
    mov %cs, %eax
    out %eax, $0xe0
    mov %cr0, %eax
    out %eax, $0xe0
    out %al, $0xe4
    hlt
