/* AArch64 EL1 hand-over guest (loaded at 0x40000000): turns the MMU on (identity map,
   1 GiB blocks: device memory below 1 GiB, normal memory above), then runs a checksum loop
   with an MMIO read and write in each iteration (device at 0x0a000000) and a RAM store and
   load; x5 counts iterations. Results: x1 (checksum), x5; then stores them to MMIO +8/+16
   and waits in wfi. */
    .globl _start
_start:
    ldr x0, =0x40100000          /* L1 table */
    mov x1, #0x401               /* block 0: PA 0, AF, attr 0 (device) */
    str x1, [x0]
    ldr x1, =0x40000705          /* block 1: PA 1 GiB, AF, inner shareable, attr 1 */
    str x1, [x0, #8]
    ldr x1, =0xff00              /* MAIR: attr0 device nGnRnE, attr1 normal WB */
    msr mair_el1, x1
    ldr x1, =0x80803519          /* TCR: T0SZ 25, WB WA, inner shareable, EPD1 */
    msr tcr_el1, x1
    msr ttbr0_el1, x0
    isb
    mrs x1, sctlr_el1
    orr x1, x1, #1               /* M */
    orr x1, x1, #(1 << 2)        /* C */
    orr x1, x1, #(1 << 12)       /* I */
    msr sctlr_el1, x1
    isb
    mov x1, #0
    mov x5, #0
    mov x2, #300
    ldr x3, =0x0a000000
    ldr x6, =0x40200000
    mov x7, #31
1:  ldr w4, [x3]
    add x1, x1, x4
    mul x1, x1, x7
    ldr w4, [x3, #4]
    eor x1, x1, x4
    str w1, [x3, #4]
    ror x1, x1, #59
    str x1, [x6]
    ldr x8, [x6]
    add x1, x1, x8
    add x5, x5, #1
    subs x2, x2, #1
    b.ne 1b
    str x1, [x3, #8]
    str x5, [x3, #16]
2:  wfi
    b 2b
