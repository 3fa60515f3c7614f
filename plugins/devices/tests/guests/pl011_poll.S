/* Print a line through a PL011 at 0x09000000 as Linux's console does (poll FR.TXFF before
   each byte, FR.BUSY at the end), read its ID and control registers, and leave through
   debug-exit with the first PeriphID byte. */
    .code32
    .globl _start
_start:
    mov $0x90000, %esp
    mov $0x09000000, %ebx
    mov $msg, %esi
1:  lodsb
    test %al, %al
    jz 3f
2:  testl $0x20, 0x18(%ebx)      /* FR.TXFF */
    jnz 2b
    movzbl %al, %eax
    mov %eax, (%ebx)             /* DR */
    jmp 1b
3:  testl $0x08, 0x18(%ebx)      /* FR.BUSY */
    jnz 3b
    movw 0x30(%ebx), %ax         /* CR, 16 bits wide (as Linux reads it) */
    cmp $0x300, %ax
    jne 4f
    mov 0xfe0(%ebx), %eax        /* PeriphID0 */
    out %eax, $0xf4
4:  mov $0x7f, %eax
    out %eax, $0xf4
5:  hlt
    jmp 5b
msg: .asciz "kvmfw pl011\n"
