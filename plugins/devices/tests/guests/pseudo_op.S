/* Every pseudo-op through the MMIO window at 0xffff0000 (32-bit accesses). Prints:
 * sum(1..6), dump_stats, reset_stats, dump_reset_stats, checkpoint, work_begin, work_end
 * results (low byte), rpns > 0, bytes written, bytes read, the bytes read; then exit(7). */
    .include "common.inc"
    .code32
    .set OPS, 0xffff0000
    .set DATA, 0x201000
    .set INBUF, 0x202000
    .globl _start
_start:
    mov $0x90000, %esp
    cmpl $0x4f4d564b, OPS+0x38          /* MAGIC */
    jne fail
    mov $1, %eax
    mov $OPS, %edi
1:  mov %eax, (%edi)                    /* ARG0..ARG5 = 1..6 */
    movl $0, 4(%edi)
    add $8, %edi
    inc %eax
    cmp $7, %eax
    jne 1b
    mov OPS+0x2300, %eax                /* sum */
    PUTC %al
    movl $0, OPS+0x00
    movl $0, OPS+0x08
    mov OPS+0x4100, %eax                /* dump_stats */
    PUTC %al
    mov OPS+0x4000, %eax                /* reset_stats */
    PUTC %al
    mov OPS+0x4200, %eax                /* dump_reset_stats */
    PUTC %al
    mov OPS+0x4300, %eax                /* checkpoint */
    PUTC %al
    movl $5, OPS+0x00
    movl $1, OPS+0x08
    mov OPS+0x5a00, %eax                /* work_begin(5, 1) */
    PUTC %al
    mov OPS+0x5b00, %eax                /* work_end(5, 1) */
    PUTC %al
    mov OPS+0x0700, %eax                /* rpns */
    mov OPS+0x0704, %ecx
    or %ecx, %eax
    setnz %al
    PUTC %al
    /* writefile(DATA, 10, 0, "out.txt") */
    mov $msg, %esi
    mov $DATA, %edi
    mov $10, %ecx
    rep movsb
    movl $DATA, OPS+0x00
    movl $10, OPS+0x08
    movl $0, OPS+0x10
    movl $name_out, OPS+0x18
    mov OPS+0x4f00, %eax
    PUTC %al
    /* readfile(INBUF, 64, 0, "in.txt") */
    movl $INBUF, OPS+0x00
    movl $64, OPS+0x08
    movl $name_in, OPS+0x18
    mov OPS+0x5000, %eax
    mov %eax, %ebx
    PUTC %bl
    mov $INBUF, %esi
2:  test %ebx, %ebx
    jz 3f
    lodsb
    PUTC %al
    dec %ebx
    jmp 2b
3:  movl $7, OPS+0x2100                 /* exit(7) */
4:  hlt
    jmp 4b
fail:
    DEBUG_EXIT 0x7f
msg: .ascii "guest data"
name_out: .asciz "out.txt"
name_in: .asciz "in.txt"
