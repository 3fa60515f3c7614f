/* fw_cfg through ports 0x510/0x511 and DMA at 0x514: signature, id, the file directory's
 * first entry, the first file, then the signature again by DMA. Prints what it read. */
    .include "common.inc"
    .code32
    .set DESC, 0x200000
    .set BUF, 0x201000
    .macro SELECT key
    mov $\key, %ax
    mov $0x510, %dx
    out %ax, %dx
    .endm
    .macro READN n                  /* print \n data bytes */
    mov $\n, %ebx
993:
    mov $0x511, %dx
    in %dx, %al
    PUTC %al
    dec %ebx
    jnz 993b
    .endm
    .globl _start
_start:
    mov $0x90000, %esp
    SELECT 0x0000                   /* signature */
    READN 4
    SELECT 0x0001                   /* id */
    READN 1
    SELECT 0x0019                   /* file directory: count, size, select, reserved, name */
    READN 20
    SELECT 0x0020                   /* the first file */
    READN 5
    movl $0x0a000000, DESC          /* control (BE): SELECT | READ, selector 0 */
    movl $0x04000000, DESC+4        /* length (BE) 4 */
    movl $0, DESC+8                 /* address (BE) high */
    movl $0x00102000, DESC+12       /* address (BE) low: 0x201000 */
    mov $0x514, %dx
    xor %eax, %eax
    out %eax, %dx                   /* DMA address high half */
    mov $0x518, %dx
    mov $0x00002000, %eax           /* bswap(0x00200000) */
    out %eax, %dx                   /* low half: starts the transfer */
    mov BUF, %ecx
    PUTD %ecx
    mov DESC, %ecx                  /* control after completion: 0 */
    PUTD %ecx
    DEBUG_EXIT 0
