/* A virtio-mmio v2 driver in miniature: negotiate, set up queue 0, write sector 1, read it
 * back, compare. Prints the two status bytes and 1 if the data matched. */
    .include "common.inc"
    .code32
    .set VIO, 0xd0000000
    .set DESC, 0x200000
    .set AVAIL, 0x201000
    .set USED, 0x202000
    .set HDR, 0x203000
    .set WBUF, 0x204000
    .set RBUF, 0x206000
    .set STAT, 0x205000
    .globl _start
_start:
    mov $0x90000, %esp
    cmpl $0x74726976, VIO+0x000
    jne fail
    movl $0, VIO+0x070                  /* reset */
    movl $3, VIO+0x070                  /* ACKNOWLEDGE | DRIVER */
    movl $1, VIO+0x024                  /* DriverFeaturesSel 1 */
    movl $1, VIO+0x020                  /* VIRTIO_F_VERSION_1 */
    movl $11, VIO+0x070                 /* | FEATURES_OK */
    testl $8, VIO+0x070
    jz fail
    movl $0, VIO+0x030                  /* QueueSel 0 */
    movl $8, VIO+0x038                  /* QueueNum */
    movl $DESC, VIO+0x080
    movl $0, VIO+0x084
    movl $AVAIL, VIO+0x090
    movl $0, VIO+0x094
    movl $USED, VIO+0x0a0
    movl $0, VIO+0x0a4
    movl $1, VIO+0x044                  /* QueueReady */
    movl $15, VIO+0x070                 /* | DRIVER_OK */
    mov $WBUF, %edi                     /* the data to write: bytes 0..255 twice */
    xor %ecx, %ecx
1:  mov %cl, (%edi,%ecx)
    inc %ecx
    cmp $512, %ecx
    jne 1b
    movl $1, HDR                        /* VIRTIO_BLK_T_OUT */
    movl $0, HDR+4
    movl $1, HDR+8                      /* sector 1 */
    movl $0, HDR+12
    /* descriptors 0 (header) -> 1 (data, readable) -> 2 (status, writable) */
    movl $HDR, DESC+0
    movl $0, DESC+4
    movl $16, DESC+8
    movw $1, DESC+12
    movw $1, DESC+14
    movl $WBUF, DESC+16
    movl $0, DESC+20
    movl $512, DESC+24
    movw $1, DESC+28
    movw $2, DESC+30
    movl $STAT, DESC+32
    movl $0, DESC+36
    movl $1, DESC+40
    movw $2, DESC+44
    movw $0, DESC+46
    movb $0x77, STAT
    movw $0, AVAIL+4                    /* ring[0] = head 0 */
    movw $1, AVAIL+2                    /* idx = 1 */
    movl $0, VIO+0x050                  /* QueueNotify */
2:  cmpw $1, USED+2
    jne 2b
    mov STAT, %al
    PUTC %al
    movl $3, VIO+0x064                  /* InterruptACK */
    /* read it back: descriptors 3 (header) -> 4 (data, writable) -> 5 (status) */
    movl $0, HDR                        /* VIRTIO_BLK_T_IN */
    movl $HDR, DESC+48
    movl $0, DESC+52
    movl $16, DESC+56
    movw $1, DESC+60
    movw $4, DESC+62
    movl $RBUF, DESC+64
    movl $0, DESC+68
    movl $512, DESC+72
    movw $3, DESC+76
    movw $5, DESC+78
    movl $STAT, DESC+80
    movl $0, DESC+84
    movl $1, DESC+88
    movw $2, DESC+92
    movw $0, DESC+94
    movb $0x77, STAT
    movw $3, AVAIL+6                    /* ring[1] = head 3 */
    movw $2, AVAIL+2
    movl $0, VIO+0x050
3:  cmpw $2, USED+2
    jne 3b
    mov STAT, %al
    PUTC %al
    mov $WBUF, %esi
    mov $RBUF, %edi
    mov $512, %ecx
    cld
    repe cmpsb
    sete %al
    PUTC %al
    DEBUG_EXIT 0
fail:
    DEBUG_EXIT 0x7f
