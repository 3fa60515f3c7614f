/* Known instruction stream: 4096 times `inc %r12`, then hlt (instruction-stop tests). */
    .code64
    .globl _start
_start:
    .rept 4096
    inc %r12
    .endr
    out %al, $0xe4
    hlt
