/*
 * kvmfw_ops_x86_64.S - pseudo-op calls for bare-metal x86-64 guests (window identity mapped
 * at KVMFW_OPS_BASE). System V calling convention: arguments in rdi, rsi, rdx, rcx; the
 * result in rax. Assemble with: cc -c kvmfw_ops_x86_64.S
 *
 *   uint64_t kvmfw_asm_op(unsigned op, uint64_t a0, uint64_t a1, uint64_t a2);
 *   void     kvmfw_asm_exit(uint64_t code);
 *   void     kvmfw_asm_fail(uint64_t code);
 */
#ifndef KVMFW_OPS_BASE
#define KVMFW_OPS_BASE 0xffff0000
#endif

    .text
    .globl kvmfw_asm_op
kvmfw_asm_op:                     /* edi = op, rsi/rdx/rcx = ARG0..ARG2 */
    movl    $KVMFW_OPS_BASE, %eax
    movq    %rsi, 0x00(%rax)
    movq    %rdx, 0x08(%rax)
    movq    %rcx, 0x10(%rax)
    movl    %edi, %edi
    shlq    $8, %rdi
    addq    %rdi, %rax
    movq    (%rax), %rax          /* the read runs the operation and returns its result */
    ret

    .globl kvmfw_asm_exit
kvmfw_asm_exit:                   /* rdi = exit code */
    movl    $KVMFW_OPS_BASE, %eax
    movq    %rdi, 0x2100(%rax)
    ret

    .globl kvmfw_asm_fail
kvmfw_asm_fail:                   /* rdi = failure code */
    movl    $KVMFW_OPS_BASE, %eax
    movq    %rdi, 0x2200(%rax)
    ret

    .section .note.GNU-stack,"",@progbits
