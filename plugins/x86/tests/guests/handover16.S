/* Real mode (flat binary at 0x7c00) checksum loop with port IO inside the loop and a
   store/load through DS (handover tests): result and iteration count to port 0xe0. */
    .code16
    .globl _start
_start:
    xor %ax, %ax
    mov %ax, %ds
    xor %bx, %bx
    xor %di, %di
    mov $300, %cx
    mov $0x100, %dx
1:  in (%dx), %ax
    add %ax, %bx
    rol $3, %bx
    mov %bx, 0x600
    xor 0x600, %bx
    xor %ax, %bx
    add %cx, %bx
    inc %di
    loop 1b
    mov %bx, %ax
    out %ax, $0xe0
    mov %di, %ax
    out %ax, $0xe0
    out %al, $0xe4
    hlt
