/* debug-exit: ends the run with a status of the guest's choosing through the
 * debug-exit device (QEMU's isa-debug-exit at port 0xf4): writing v gives the host exit
 * status (v << 1) | 1, here (0x21 << 1) | 1 = 67.
 *   kvmfw run --kernel examples/guests/debug-exit.elf --device debug-exit; echo $? */
    .include "common.inc"
    MULTIBOOT
    .globl _start
_start:
    mov $0x80000, %esp
    PUTS msg
    mov $0x21, %eax
    out %eax, $0xf4                 /* kvmfw ends the run here with status 67 */
    PUTS nodev                      /* only reached without the device */
    cli
    hlt
    PUTS_FUNC
    .section .rodata
msg:   .asciz "Leaving through debug-exit with value 0x21: kvmfw exits with status 67.\n"
nodev: .asciz "No debug-exit device at port 0xf4 (add --device debug-exit): halting.\n"
