/* 64-bit long mode (ELF64): fib(60) = 1548008755920 on port 0xe0 (low, high dword). */
    .code64
    .globl _start
_start:
    xor %eax, %eax
    mov $1, %edx
    mov $60, %ecx
1:  lea (%rax,%rdx), %rbx
    mov %rdx, %rax
    mov %rbx, %rdx
    dec %ecx
    jnz 1b
    out %eax, $0xe0
    shr $32, %rax
    out %eax, $0xe0
    mov %cr4, %rax
    out %eax, $0xe0
    out %al, $0xe4
    hlt
