/* pseudo-ops: the guest talks to kvmfw (gem5's m5ops) through the pseudo-op device of
 * the default board (MMIO 0xffff0000): marks a work item around a loop, asks for a stats
 * dump (--stats FILE keeps it), and exits with status 3 through exit(3).
 *   kvmfw run --kernel examples/guests/pseudo-ops.elf --stats stats.txt; echo $? */
    .include "common.inc"
    MULTIBOOT
    .globl _start
_start:
    mov $0x80000, %esp
    cmpl $0x4f4d564b, PSEUDO_OP + 0x38      /* "KVMO": is the device there? */
    jne nodev
    PUTS begin
    movl $1, PSEUDO_OP + 0x00               /* ARG0: work id 1 */
    movl $0, PSEUDO_OP + 0x08               /* ARG1: thread 0 */
    mov PSEUDO_OP + OP_WORK_BEGIN, %eax     /* work_begin(1, 0) */
    mov $200, %ecx
1:  PUTC $'.'
    loop 1b
    PUTC $'\n'
    mov PSEUDO_OP + OP_WORK_END, %eax       /* work_end(1, 0) */
    PUTS dump
    movl $0, PSEUDO_OP + 0x00
    movl $0, PSEUDO_OP + 0x08
    mov PSEUDO_OP + OP_DUMP_STATS, %eax     /* dump_stats(0, 0): now */
    PUTS bye
    EXIT 3
nodev:
    PUTS missing
    cli
    hlt
    PUTS_FUNC
    .section .rodata
begin:   .asciz "work_begin(1): printing 200 dots as the work item\n"
dump:    .asciz "work_end(1); asking kvmfw for a stats dump (system.work counts the item)\n"
bye:     .asciz "exit(3): kvmfw ends the run with status 3\n"
missing: .asciz "No pseudo-op device at 0xffff0000 (keep the default board): halting.\n"
