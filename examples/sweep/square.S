/* square: the sweep example guest. Boots, asks kvmfw for a checkpoint (the sweep's base)
 * and, in every run restored from it, reads its parameter N from the host file "n"
 * (pseudo-op readfile, from the variant's directory), prints "square=N*N", writes the same
 * line to the host file "result.txt" (pseudo-op writefile) and exits with status 0.
 * Without a file "n" it prints so and exits with status 1 (pseudo-op fail).
 *   kvmfw sweep examples/sweep/sweep.toml --out /tmp/sq */
    .include "common.inc"
    .set OP_CHECKPOINT, 0x4300
    .set OP_FAIL, 0x2200
    .set OP_READ_FILE, 0x5000
    .set OP_WRITE_FILE, 0x4f00
    MULTIBOOT
    .globl _start
_start:
    mov $0x80000, %esp
    cmpl $0x4f4d564b, PSEUDO_OP + 0x38      /* "KVMO": is the device there? */
    jne nodev
    PUTS booted
    movl $0, PSEUDO_OP + 0x00               /* checkpoint(0, 0): now */
    movl $0, PSEUDO_OP + 0x08
    mov PSEUDO_OP + OP_CHECKPOINT, %eax
    /* a restored run continues here */
    movl $numbuf, PSEUDO_OP + 0x00          /* readfile(numbuf, 20, 0, "n") */
    movl $0, PSEUDO_OP + 0x04
    movl $20, PSEUDO_OP + 0x08
    movl $0, PSEUDO_OP + 0x0c
    movl $0, PSEUDO_OP + 0x10
    movl $0, PSEUDO_OP + 0x14
    movl $name_n, PSEUDO_OP + 0x18
    movl $0, PSEUDO_OP + 0x1c
    mov PSEUDO_OP + OP_READ_FILE, %eax      /* bytes read, or all ones */
    cmp $20, %eax
    ja nofile
    /* parse decimal digits into %ebx */
    mov %eax, %ecx
    mov $numbuf, %esi
    xor %ebx, %ebx
1:  test %ecx, %ecx
    jz 2f
    movzbl (%esi), %eax
    sub $'0', %eax
    cmp $9, %eax
    ja 2f
    imul $10, %ebx
    add %eax, %ebx
    inc %esi
    dec %ecx
    jmp 1b
2:  mov %ebx, %eax
    mul %ebx                                /* edx:eax = N*N (N < 65536 keeps it in eax) */
    /* format "square=<eax>\n" into line: digits backwards into tmp, then copy */
    mov $tmpend, %edi
    mov $10, %ecx
3:  xor %edx, %edx
    div %ecx
    add $'0', %dl
    dec %edi
    mov %dl, (%edi)
    test %eax, %eax
    jnz 3b
    mov $line + 7, %esi                     /* after "square=" */
4:  cmp $tmpend, %edi
    je 5f
    mov (%edi), %al
    mov %al, (%esi)
    inc %edi
    inc %esi
    jmp 4b
5:  movb $'\n', (%esi)
    inc %esi
    movb $0, (%esi)
    sub $line, %esi                         /* length without the NUL */
    PUTS line
    movl $line, PSEUDO_OP + 0x00            /* writefile(line, len, 0, "result.txt") */
    movl $0, PSEUDO_OP + 0x04
    movl %esi, PSEUDO_OP + 0x08
    movl $0, PSEUDO_OP + 0x0c
    movl $0, PSEUDO_OP + 0x10
    movl $0, PSEUDO_OP + 0x14
    movl $name_out, PSEUDO_OP + 0x18
    movl $0, PSEUDO_OP + 0x1c
    mov PSEUDO_OP + OP_WRITE_FILE, %eax
    EXIT 0
nofile:
    PUTS missing_n
    movl $1, PSEUDO_OP + OP_FAIL
6:  cli
    hlt
    jmp 6b
nodev:
    PUTS missing
    cli
    hlt
    PUTS_FUNC
    .section .rodata
booted:    .asciz "square: booted; asking for a checkpoint\n"
name_n:    .asciz "n"
name_out:  .asciz "result.txt"
missing_n: .asciz "square: no parameter file n (give the guest one through pseudo_op_dir)\n"
missing:   .asciz "No pseudo-op device at 0xffff0000 (keep the default board): halting.\n"
    .data
line:      .ascii "square="
           .space 24
numbuf:    .space 24
tmp:       .space 12
tmpend:
