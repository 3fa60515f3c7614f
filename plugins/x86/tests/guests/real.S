/* Real mode (flat binary at 0x7c00): sum 1..100 = 5050, reported on port 0xe0. */
    .code16
    .globl _start
_start:
    xor %ax, %ax
    mov $100, %cx
1:  add %cx, %ax
    loop 1b
    out %ax, $0xe0
    mov %bx, %ax            /* echo BX (set by the host) + 1 */
    inc %ax
    out %ax, $0xe0
    out %al, $0xe4          /* end the run */
    hlt
