/* Real mode (flat at 0x7c00): string IO and PCI configuration mechanism #1.
 * rep outsw of 4 words to port 0xe8, rep insb of 4 bytes from port 0xe8 into the buffer,
 * then reads PCI config dword 0 of 00:03.0 and writes 0xcafe to register 0x10 of the
 * same function (word access at 0xcfc), reporting what the reads returned. */
    .code16
    .globl _start
_start:
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    cld
    mov $words, %si
    mov $4, %cx
    mov $0xe8, %dx
    rep outsw
    mov $buf, %di
    mov $4, %cx
    rep insb
    mov buf, %eax
    out %eax, $0xe0
    mov $0x80001800, %eax       /* bus 0, dev 3, fn 0, reg 0 */
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %dx
    in %dx, %eax
    out %eax, $0xe0
    mov $0x80001810, %eax       /* reg 0x10 */
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcafe, %ax
    mov $0xcfe, %dx             /* word at offset 0x12 */
    out %ax, %dx
    mov $0xcf8, %dx
    in %dx, %eax
    out %eax, $0xe0
    out %al, $0xe4
    hlt
words: .word 0x1111, 0x2222, 0x3333, 0x4444
buf:   .long 0
