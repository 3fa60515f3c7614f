/* hello16: a flat binary in real mode, as a boot sector is entered: load it at 0x7c00
 * with --load-addr. It prints a line on COM1 and halts with interrupts off; with the
 * userspace irqchip (every HLT comes to kvmfw) a machine whose vCPUs all halt ends its
 * run with status 0.
 *   kvmfw run --kernel examples/guests/hello16.bin --load-addr 0x7c00 \
 *             --option irqchip=userspace --cpus 2 */
    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov $msg, %si
1:  lodsb
    test %al, %al
    jz 3f
    mov %al, %ah
    mov $0x3fd, %dx
2:  in %dx, %al                     /* wait until the UART can take a byte */
    test $0x20, %al
    jz 2b
    mov $0x3f8, %dx
    mov %ah, %al
    out %al, %dx
    jmp 1b
3:  hlt
    jmp 3b
msg: .asciz "Hello from real mode, loaded at 0x7c00 as a boot sector would be.\n"
