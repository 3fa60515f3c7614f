/*
 * kvmfw-armv8 perf test guest (AArch64, EL1, MMU off), linked at 0x40000000.
 * x0 = iterations (set by the host). The loop is exactly two instructions per iteration,
 * so the guest retires 2 * x0 + 3 instructions from the entry up to and including the store
 * that reports done at TESTDEV+0x08 (x0 = 0 counts as 2^64 iterations: "forever").
 */
        .text
        .global _start
_start:
        movz    x10, #0x0B00, lsl #16   /* TESTDEV */
        cbz     x0, 2f
1:      subs    x0, x0, #1
        b.ne    1b
        str     xzr, [x10, #0x08]       /* done */
        b       .
2:      sub     x0, x0, #1              /* 2^64 - 1 iterations */
        b       1b
