/* virtio-blk: a virtio-mmio (version 2) block driver in miniature. Finds the device at
 * 0xd0000000 (the virtio-blk default), negotiates VIRTIO_F_VERSION_1, sets up queue 0,
 * reads sector 0 of the disk and prints it as text (up to the first NUL), then exits
 * with status 0 (or 1 if the device reported an error). disk.img holds a greeting.
 *   kvmfw run --kernel examples/guests/virtio-blk.elf \
 *             --device virtio-blk,file=examples/guests/disk.img,readonly=on */
    .include "common.inc"
    .set VIO, 0xd0000000
    .set DESC, 0x200000             /* the queue's three rings, in guest RAM */
    .set AVAIL, 0x201000
    .set USED, 0x202000
    .set HDR, 0x203000              /* the request: header, data, status byte */
    .set STAT, 0x203100
    .set BUF, 0x204000
    MULTIBOOT
    .globl _start
_start:
    mov $0x80000, %esp
    cmpl $0x74726976, VIO + 0x000   /* MagicValue "virt" */
    jne nodev
    cmpl $2, VIO + 0x008            /* DeviceID 2: a block device */
    jne nodev
    movl $0, VIO + 0x070            /* Status: reset */
    movl $3, VIO + 0x070            /* ACKNOWLEDGE | DRIVER */
    movl $1, VIO + 0x024            /* DriverFeaturesSel 1 */
    movl $1, VIO + 0x020            /* VIRTIO_F_VERSION_1 (bit 32) */
    movl $11, VIO + 0x070           /* | FEATURES_OK */
    testl $8, VIO + 0x070
    jz nodev
    movl $0, VIO + 0x030            /* QueueSel 0 */
    movl $4, VIO + 0x038            /* QueueNum */
    movl $DESC, VIO + 0x080
    movl $0, VIO + 0x084
    movl $AVAIL, VIO + 0x090
    movl $0, VIO + 0x094
    movl $USED, VIO + 0x0a0
    movl $0, VIO + 0x0a4
    movl $1, VIO + 0x044            /* QueueReady */
    movl $15, VIO + 0x070           /* | DRIVER_OK */
    movl $0, HDR                    /* VIRTIO_BLK_T_IN: read */
    movl $0, HDR + 4
    movl $0, HDR + 8                /* sector 0 */
    movl $0, HDR + 12
    movb $0, BUF + 512              /* the text ends with the sector at the latest */
    /* descriptor 0: header (device reads) -> 1: 512 bytes (device writes) -> 2: status */
    movl $HDR, DESC + 0
    movl $16, DESC + 8
    movw $1, DESC + 12              /* NEXT */
    movw $1, DESC + 14
    movl $BUF, DESC + 16
    movl $512, DESC + 24
    movw $3, DESC + 28              /* NEXT | WRITE */
    movw $2, DESC + 30
    movl $STAT, DESC + 32
    movl $1, DESC + 40
    movw $2, DESC + 44              /* WRITE */
    movb $0xff, STAT
    movw $0, AVAIL + 4              /* ring[0] = descriptor 0 */
    movw $1, AVAIL + 2              /* idx 1 */
    movl $0, VIO + 0x050            /* QueueNotify: queue 0 */
1:  cmpw $1, USED + 2               /* the device used the request */
    jne 1b
    cmpb $0, STAT                   /* VIRTIO_BLK_S_OK */
    jne ioerr
    PUTS said
    PUTS BUF
    EXIT 0
ioerr:
    PUTS failed
    EXIT 1
nodev:
    PUTS missing
    cli
    hlt
    PUTS_FUNC
    .section .rodata
said:    .asciz "virtio-blk: sector 0 of the disk says: "
failed:  .asciz "virtio-blk: the read failed\n"
missing: .asciz "No virtio-blk device at 0xd0000000 (add --device virtio-blk,file=DISK).\n"
