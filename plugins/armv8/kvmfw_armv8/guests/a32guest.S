/*
 * kvmfw-armv8 AArch32 test guest: one bare-metal ARM (A32) program for a KVM_ARM_VCPU_EL1_32BIT
 * vCPU, entered in SVC mode with A/I/F masked and the MMU off (as the loader boots zImages:
 * r0 = 0, r1 = ~0, r2 = device tree). Linked at 0x40000000 (RAM base).
 *
 * Steps (each reports to the test device TESTDEV, offsets as testguest.S):
 *   1. VFP + NEON: sum(i * 1.5, i = 1..10) * 2 = 165 (VFP double) plus the horizontal sum of
 *      {1,2,3,4} * {10,20,30,40} = 300 (NEON i32): 465, printed on the PL011 as
 *      "A32 RESULT 465" and written at 0x00.
 *   2. Checkpoint: r4-r12, the banked r13/r14 of IRQ mode, d8-d15, FPSCR and SPSR_irq hold
 *      known values; the write at 0x28 is where a host may stop, save and restore the vCPU.
 *      Then every one is checked: 0x00 gets 0xC0DE0000 (all kept) or 0xBAD00000 + index.
 *   3. PSCI_VERSION through HVC (SMC32 calling convention): the result at 0x30.
 *   4. GICv3 through the AArch32 CP15 CPU interface: ready at 0x18, the host raises SPI 5
 *      (INTID 37); the IRQ handler reports the INTID at 0x20.
 *   5. Virtual timer (CNTV_TVAL/CTL through CP15, PPI 27) fires; reported at 0x20.
 *   6. Done at 0x08, then PSCI SYSTEM_OFF.
 * An unexpected exception writes its vector offset at 0x50.
 * Rebuild: ./build.sh (needs binutils-arm-linux-gnueabihf); the .bin/.elf are committed.
 */
        .syntax unified
        .arch   armv7-a
        .fpu    neon-vfpv4
        .arch_extension virt
        .arm
        .equ TESTDEV, 0x0B000000
        .equ UART, 0x09000000
        .equ GICD, 0x08000000
        .equ GICR_SGI, 0x080B0000
        .equ TEST_SPI_INTID, 37
        .equ VTIMER_INTID, 27

        .text
        .global _start
_start:
        ldr     sp, =svc_stack_top
        cps     #0x12                   /* IRQ mode: its own stack */
        ldr     sp, =irq_stack_top
        cps     #0x13
        ldr     r0, =vectors
        mcr     p15, 0, r0, c12, c0, 0  /* VBAR */
        mrc     p15, 0, r0, c1, c0, 2   /* CPACR: cp10/cp11 full access */
        orr     r0, r0, #(0xf << 20)
        mcr     p15, 0, r0, c1, c0, 2
        isb
        mov     r0, #0x40000000         /* FPEXC.EN */
        vmsr    fpexc, r0
        ldr     r10, =TESTDEV

/* 1. VFP and NEON */
        mov     r0, #0
        vmov    d0, r0, r0
        vmov.f64 d1, #1.5
        vmov.f64 d2, #1.0               /* i */
        vmov.f64 d3, #1.0
        mov     r1, #10
1:      vmul.f64 d4, d2, d1
        vadd.f64 d0, d0, d4
        vadd.f64 d2, d2, d3
        subs    r1, r1, #1
        bne     1b
        vadd.f64 d0, d0, d0             /* 82.5 * 2 = 165 */
        vcvt.s32.f64 s10, d0
        vmov    r4, s10
        adr     r0, vec_a
        vld1.32 {q1}, [r0]!
        vld1.32 {q2}, [r0]
        vmul.i32 q3, q1, q2
        vpadd.i32 d8, d6, d7
        vpadd.i32 d8, d8, d8
        vmov.32 r5, d8[0]
        add     r4, r4, r5              /* 465 */
        adr     r0, msg
        bl      puts
        mov     r0, r4
        bl      putdec
        mov     r0, #10
        bl      putc
        str     r4, [r10, #0x00]

/* 2. checkpoint */
        ldr     r0, =0x12345678
        vmov    d8, r0, r0
        ldr     r1, =0x0badf00d
        vmov    d15, r0, r1
        vmov.i32 q5, #0x5a              /* d10, d11 */
        mov     r0, #0x00c00000         /* FPSCR.RMode = round toward zero */
        vmsr    fpscr, r0
        cps     #0x12
        ldr     r13, =irq_stack_top
        ldr     r14, =0x1414
        ldr     r0, =0x600001d3
        msr     spsr_cxsf, r0
        cps     #0x13
        mov     r4, #4
        mov     r5, #5
        mov     r6, #6
        mov     r7, #7
        mov     r8, #8
        mov     r9, #9
        ldr     r11, =0xb0b0b0b0
        ldr     r12, =0xc0c0c0c0
        str     r4, [r10, #0x28]        /* the host may save and restore here */
        mov     r0, #0xBA000000
        orr     r0, r0, #0xD00000
        cmp     r4, #4
        addne   r0, r0, #4
        cmpeq   r5, #5
        addne   r0, r0, #5
        cmpeq   r6, #6
        addne   r0, r0, #6
        cmpeq   r7, #7
        addne   r0, r0, #7
        cmpeq   r8, #8
        addne   r0, r0, #8
        cmpeq   r9, #9
        addne   r0, r0, #9
        ldreq   r1, =TESTDEV
        cmpeq   r10, r1
        addne   r0, r0, #10
        ldreq   r1, =0xb0b0b0b0
        cmpeq   r11, r1
        addne   r0, r0, #11
        ldreq   r1, =0xc0c0c0c0
        cmpeq   r12, r1
        addne   r0, r0, #12
        bne     2f
        vmov    r1, r2, d8
        ldr     r3, =0x12345678
        cmp     r1, r3
        cmpeq   r2, r3
        addne   r0, r0, #0x18
        bne     2f
        vmov    r1, r2, d15
        cmp     r1, r3
        ldreq   r3, =0x0badf00d
        cmpeq   r2, r3
        addne   r0, r0, #0x1f
        bne     2f
        vmov    r1, r2, d11
        cmp     r1, #0x5a
        cmpeq   r2, #0x5a
        addne   r0, r0, #0x1b
        bne     2f
        vmrs    r1, fpscr
        cmp     r1, #0x00c00000
        addne   r0, r0, #0x20
        bne     2f
        cps     #0x12
        mov     r1, r14
        mrs     r2, spsr
        cps     #0x13
        ldr     r3, =0x1414
        cmp     r1, r3
        addne   r0, r0, #0x21
        bne     2f
        ldr     r3, =0x600001d3
        cmp     r2, r3
        addne   r0, r0, #0x22
        bne     2f
        mrs     r1, cpsr
        and     r1, r1, #0x1f
        cmp     r1, #0x13
        addne   r0, r0, #0x23
        bne     2f
        ldr     r0, =0xC0DE0000
2:      str     r0, [r10, #0x00]

/* 3. PSCI */
        ldr     r0, =0x84000000         /* PSCI_VERSION */
        hvc     #0
        str     r0, [r10, #0x30]

/* 4. SPI through the vGICv3 (CP15 CPU interface) */
        mrc     p15, 0, r2, c12, c12, 5 /* ICC_SRE */
        orr     r2, r2, #1
        mcr     p15, 0, r2, c12, c12, 5
        isb
        mov     r2, #0xf0
        mcr     p15, 0, r2, c4, c6, 0   /* ICC_PMR */
        mov     r2, #1
        mcr     p15, 0, r2, c12, c12, 7 /* ICC_IGRPEN1 */
        isb
        ldr     r1, =GICD
        mov     r2, #0x13               /* GICD_CTLR: ARE, EnableGrp1, EnableGrp0 */
        str     r2, [r1]
        mov     r2, #(1 << (TEST_SPI_INTID - 32))
        str     r2, [r1, #0x84]         /* GICD_IGROUPR1 */
        mov     r3, #0xa0
        strb    r3, [r1, #(0x400 + TEST_SPI_INTID)]
        add     r4, r1, #0x6000
        mov     r3, #0
        str     r3, [r4, #(8 * TEST_SPI_INTID)]         /* GICD_IROUTER: vCPU 0 */
        str     r3, [r4, #(8 * TEST_SPI_INTID + 4)]
        str     r2, [r1, #0x104]        /* GICD_ISENABLER1 */
        ldr     r6, =irq_flag
        mov     r3, #0
        str     r3, [r6]
        cpsie   i
        str     r3, [r10, #0x18]        /* ready: the host raises the SPI */
        bl      wait_irq

/* 5. virtual timer */
        ldr     r1, =GICR_SGI
        mov     r2, #(1 << VTIMER_INTID)
        str     r2, [r1, #0x80]         /* GICR_IGROUPR0 */
        mov     r3, #0xa0
        strb    r3, [r1, #(0x400 + VTIMER_INTID)]
        str     r2, [r1, #0x100]        /* GICR_ISENABLER0 */
        mov     r3, #0
        str     r3, [r6]
        ldr     r2, =20000
        mcr     p15, 0, r2, c14, c3, 0  /* CNTV_TVAL */
        mov     r2, #1
        mcr     p15, 0, r2, c14, c3, 1  /* CNTV_CTL: enable */
        isb
        bl      wait_irq

/* 6. done, power off */
        str     r3, [r10, #0x08]
        ldr     r0, =0x84000008         /* PSCI SYSTEM_OFF */
        hvc     #0
        b       .

wait_irq:                               /* the handler sets irq_flag */
1:      ldr     r3, [r6]
        cmp     r3, #0
        bxne    lr
        wfi
        b       1b

puts:                                   /* r0: NUL-terminated string */
        push    {r4, lr}
        mov     r4, r0
1:      ldrb    r0, [r4], #1
        cmp     r0, #0
        popeq   {r4, pc}
        bl      putc
        b       1b

putc:                                   /* r0: byte; PL011 UARTDR, waits while TXFF */
        ldr     r1, =UART
1:      ldr     r2, [r1, #0x18]
        tst     r2, #0x20
        bne     1b
        str     r0, [r1]
        bx      lr

putdec:                                 /* r0 < 10000, unsigned, no leading zeros */
        push    {r4-r6, lr}
        mov     r4, r0
        adr     r5, pow10
        mov     r6, #0                  /* a digit was printed */
1:      ldr     r1, [r5], #4
        cmp     r1, #0
        popeq   {r4-r6, pc}
        mov     r0, #'0'
2:      cmp     r4, r1
        subhs   r4, r4, r1
        addhs   r0, r0, #1
        bhs     2b
        cmp     r0, #'0'
        movne   r6, #1
        cmp     r1, #1
        moveq   r6, #1
        cmp     r6, #0
        beq     1b
        bl      putc
        b       1b

        .balign 4
pow10:  .word   1000, 100, 10, 1, 0
vec_a:  .word   1, 2, 3, 4
vec_b:  .word   10, 20, 30, 40
msg:    .asciz  "A32 RESULT "
        .balign 4
        .ltorg

        .balign 32
vectors:
        b       bad_reset               /* 0x00 */
        b       bad_undef               /* 0x04 */
        b       bad_svc                 /* 0x08 */
        b       bad_pabt                /* 0x0c */
        b       bad_dabt                /* 0x10 */
        b       bad_hyp                 /* 0x14 */
        b       irq_handler             /* 0x18 */
        b       bad_fiq                 /* 0x1c */
bad_reset: mov  r0, #0x00
        b       bad
bad_undef: mov  r0, #0x04
        b       bad
bad_svc: mov    r0, #0x08
        b       bad
bad_pabt: mov   r0, #0x0c
        b       bad
bad_dabt: mov   r0, #0x10
        b       bad
bad_hyp: mov    r0, #0x14
        b       bad
bad_fiq: mov    r0, #0x1c
bad:    ldr     r1, =TESTDEV
        str     r0, [r1, #0x50]
        b       .

irq_handler:
        sub     lr, lr, #4
        push    {r0-r3, lr}
        mrc     p15, 0, r0, c12, c12, 0 /* ICC_IAR1 */
        ldr     r1, =TESTDEV
        str     r0, [r1, #0x20]
        mov     r2, #0
        mcr     p15, 0, r2, c14, c3, 1  /* quiet the timer (level interrupt) */
        mcr     p15, 0, r0, c12, c12, 1 /* ICC_EOIR1 */
        ldr     r1, =irq_flag
        mov     r2, #1
        str     r2, [r1]
        pop     {r0-r3, lr}
        movs    pc, lr
        .ltorg

        .data
        .balign 8
irq_flag: .word 0
        .balign 16
        .space  1024
svc_stack_top:
        .space  512
irq_stack_top:
