/* Real mode (flat at 0x7c00): `cli; hlt` must stay halted on a maskable interrupt and
 * resume only on an NMI. Reports 2 from the NMI handler, 0x55 once past the hlt, then
 * 0x20 from the vector 0x20 handler once it enables interrupts and halts again, and ends. */
    .code16
    .globl _start
_start:
    xor %ax, %ax
    mov %ax, %ds
    movw $h20, 0x20*4
    movw $0, 0x20*4+2
    movw $hnmi, 2*4
    movw $0, 2*4+2
    cli
    hlt
    mov $0x55, %ax
    out %ax, $0xe0
    sti
    hlt                         /* the queued vector ends this one */
    cli
    out %al, $0xe4
    hlt
h20:
    push %ax
    mov $0x20, %ax
    out %ax, $0xe0
    pop %ax
    iret
hnmi:
    push %ax
    mov $0x02, %ax
    out %ax, $0xe0
    pop %ax
    iret
