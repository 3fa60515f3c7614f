/*
 * kvmfw-armv8 test guest: bare-metal AArch64 programs run at EL1 with the MMU off.
 * Linked at 0x40000000 (RAM base). Entry points are branches at fixed offsets (see
 * kvmfw_armv8/guests/__init__.py). Every program reports to the test device at
 * TESTDEV (0x0B000000, MMIO, offsets below) and never returns.
 *
 *   0x00 W result      0x08 W done          0x10 R host value    0x18 W ready
 *   0x20 W irq intid   0x30 W psci result   0x40 W secondary MPIDR, 0x48 W its context id
 *   0x28 W pause (the host stops the run there, e.g. to checkpoint; the guest goes on)
 *   0x50 W ESR of an unexpected exception   0x110 W done (regs program, through SP_EL0)
 * Rebuild: ./build.sh (needs binutils-aarch64-linux-gnu); the .bin is committed.
 */
        .equ TESTDEV, 0x0B000000
        .equ GICD, 0x08000000
        .equ GICR_SGI, 0x080B0000       /* redistributor of vCPU 0, SGI/PPI frame */
        .equ TEST_SPI_INTID, 37         /* SPI 5 */
        .equ VTIMER_INTID, 27

        .macro testdev reg
        movz    \reg, #(TESTDEV >> 16), lsl #16
        .endm

        .text
        .global _start
_start:
        b       compute                 /* 0x00 */
        b       regs                    /* 0x04 */
        b       irq_test                /* 0x08 */
        b       timer_test              /* 0x0c */
        b       psci_test               /* 0x10 */
        b       sysoff_test             /* 0x14 */
        b       secondary               /* 0x18: CPU_ON entry */
        b       ckpt_test               /* 0x1c */

/* sum 1..100, plus a value read from the host through an MMIO read */
compute:
        testdev x10
        mov     x1, #0
        mov     x2, #1
1:      add     x1, x1, x2
        add     x2, x2, #1
        cmp     x2, #101
        b.ne    1b
        ldr     x3, [x10, #0x10]
        add     x1, x1, x3
        str     x1, [x10, #0x00]
        str     xzr, [x10, #0x08]
        b       .

/* every register group: read what the host wrote, change it, let the host read back */
regs:
        .irp    i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30
        add     x\i, x\i, #(\i + 1)
        .endr
        .irp    i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        mvn     v\i\().16b, v\i\().16b
        .endr
        stp     x0, x1, [sp, #-16]!     /* SP_EL1 (EL1h) is the host's stack */
        mrs     x0, sp_el0
        add     x0, x0, #0x10
        msr     sp_el0, x0
        mrs     x0, elr_el1
        add     x0, x0, #4
        msr     elr_el1, x0
        mrs     x0, spsr_el1
        eor     x0, x0, #0xf0000000
        msr     spsr_el1, x0
        mrs     x0, fpcr
        eor     x0, x0, #0x01000000     /* FZ */
        msr     fpcr, x0
        mrs     x0, fpsr
        orr     x0, x0, #0x08000000     /* QC */
        msr     fpsr, x0
        ldp     x0, x1, [sp], #16
        cmp     x0, x0                  /* NZCV = 0110 */
        msr     spsel, #0               /* SP_EL0 = the host's TESTDEV+0x110 */
        str     xzr, [sp]               /* done, without touching a general register */
        msr     spsel, #1
        b       .

gic_cpu_init:
        mrs     x2, S3_0_C12_C12_5      /* ICC_SRE_EL1 */
        orr     x2, x2, #1
        msr     S3_0_C12_C12_5, x2
        isb
        mov     x2, #0xf0
        msr     S3_0_C4_C6_0, x2        /* ICC_PMR_EL1 */
        mov     x2, #1
        msr     S3_0_C12_C12_7, x2      /* ICC_IGRPEN1_EL1 */
        isb
        movz    x1, #(GICD >> 16), lsl #16
        mov     w2, #0x13               /* GICD_CTLR: ARE, EnableGrp1, EnableGrp0 */
        str     w2, [x1]
        adr     x2, vectors
        msr     vbar_el1, x2
        isb
        ret

irq_test:
        bl      gic_cpu_init
        movz    x1, #(GICD >> 16), lsl #16
        mov     w2, #(1 << (TEST_SPI_INTID - 32))
        str     w2, [x1, #0x84]         /* GICD_IGROUPR1: group 1 */
        mov     w3, #0xa0
        strb    w3, [x1, #(0x400 + TEST_SPI_INTID)]     /* GICD_IPRIORITYR */
        add     x4, x1, #0x6000
        str     xzr, [x4, #(8 * TEST_SPI_INTID)]        /* GICD_IROUTER: vCPU 0 */
        str     w2, [x1, #0x104]        /* GICD_ISENABLER1 */
        mov     x20, #0
        msr     daifclr, #2             /* unmask IRQ */
        testdev x10
        str     xzr, [x10, #0x18]       /* ready: the host raises the SPI now */
        b       wait_irq

timer_test:
        bl      gic_cpu_init
        movz    x1, #(GICR_SGI >> 16), lsl #16
        mov     w2, #(1 << VTIMER_INTID)
        str     w2, [x1, #0x80]         /* GICR_IGROUPR0: group 1 */
        mov     w3, #0xa0
        strb    w3, [x1, #(0x400 + VTIMER_INTID)]       /* GICR_IPRIORITYR */
        str     w2, [x1, #0x100]        /* GICR_ISENABLER0 */
        mov     x20, #0
        msr     daifclr, #2
        mov     x2, #20000
        msr     cntv_tval_el0, x2
        mov     x2, #1                  /* ENABLE, not masked */
        msr     cntv_ctl_el0, x2
        isb
wait_irq:                               /* the handler sets x20; it may run before wfi */
1:      cbnz    x20, 2f
        wfi
        b       1b
2:
        testdev x10
        str     xzr, [x10, #0x08]       /* done */
        b       .

/* an SPI pending and the virtual timer armed, IRQs masked, at a pause; after it the guest
   unmasks and counts both interrupts in x20 (a checkpoint/restore at the pause must keep
   the vGIC's and the timer's state) */
ckpt_test:
        bl      gic_cpu_init
        movz    x1, #(GICR_SGI >> 16), lsl #16
        mov     w2, #(1 << VTIMER_INTID)
        str     w2, [x1, #0x80]         /* GICR_IGROUPR0: group 1 */
        mov     w3, #0xa0
        strb    w3, [x1, #(0x400 + VTIMER_INTID)]
        str     w2, [x1, #0x100]        /* GICR_ISENABLER0 */
        movz    x1, #(GICD >> 16), lsl #16
        mov     w2, #(1 << (TEST_SPI_INTID - 32))
        str     w2, [x1, #0x84]         /* GICD_IGROUPR1 */
        movz    w3, #0xa2aa
        movk    w3, #0xaaaa, lsl #16
        str     w3, [x1, #0xc08]        /* GICD_ICFGR2: SPI 37 level-triggered, 32..47 edge */
        mov     w3, #0x90
        strb    w3, [x1, #(0x400 + TEST_SPI_INTID)]
        add     x4, x1, #0x6000
        str     xzr, [x4, #(8 * TEST_SPI_INTID)]
        str     w2, [x1, #0x104]        /* GICD_ISENABLER1 */
        mov     x20, #0
        movz    x2, #0x10, lsl #16      /* 1 Mi ticks: 16 ms at 62.5 MHz */
        msr     cntv_tval_el0, x2
        mov     x2, #1                  /* ENABLE, not masked; PSTATE.I masks it */
        msr     cntv_ctl_el0, x2
        isb
        testdev x10
        str     xzr, [x10, #0x18]       /* ready: the host raises the SPI */
        str     xzr, [x10, #0x28]       /* pause */
        msr     daifclr, #2
1:      cmp     x20, #2
        b.hs    2f
        wfi
        b       1b
2:      str     xzr, [x10, #0x08]       /* done */
        b       .

psci_test:
        movz    x0, #0x0003
        movk    x0, #0xc400, lsl #16    /* PSCI 0.2 CPU_ON (SMC64/HVC64) */
        mov     x1, #1                  /* target MPIDR: Aff0 = 1 */
        ldr     x2, =secondary
        movz    x3, #0xbeef             /* context id, arrives in the target's x0 */
        hvc     #0
        testdev x10
        str     x0, [x10, #0x30]
        adr     x1, psci_reported
        mov     w2, #1
        str     w2, [x1]                /* the secondary powers off only after this */
1:      wfi
        b       1b

secondary:
        testdev x10
        mrs     x1, mpidr_el1
        str     x1, [x10, #0x40]
        str     x0, [x10, #0x48]
        adr     x1, psci_reported       /* MMU off: Device memory, no cache to maintain */
3:      ldr     w2, [x1]
        cbz     w2, 3b
sysoff_test:
        movz    x0, #0x0008
        movk    x0, #0x8400, lsl #16    /* PSCI SYSTEM_OFF */
        hvc     #0
        b       .

        .ltorg
        .balign 8
psci_reported:
        .word   0, 0

/* exception vectors: IRQ from the current EL (SP_ELx) reports its INTID; anything else
   reports ESR_EL1 at 0x50 */
        .balign 2048
vectors:
        .irp    slot, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
        .balign 128
        .if     \slot == 5             /* IRQ, current EL with SP_ELx */
        b       irq_handler
        .else
        b       unexpected
        .endif
        .endr

        .balign 128
unexpected:
        testdev x10
        mrs     x9, esr_el1
        str     x9, [x10, #0x50]
        b       .

irq_handler:
        mrs     x9, S3_0_C12_C12_0      /* ICC_IAR1_EL1 */
        testdev x10
        str     x9, [x10, #0x20]
        cmp     x9, #VTIMER_INTID       /* (NZCV of the interrupted code is in SPSR) */
        b.ne    1f
        msr     cntv_ctl_el0, xzr       /* quiet the timer (level interrupt) */
1:      msr     S3_0_C12_C12_1, x9      /* ICC_EOIR1_EL1 */
        add     x20, x20, #1
        eret
