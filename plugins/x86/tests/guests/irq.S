/* Real mode (flat at 0x7c00): interrupts. The IVT points vector 0x20 (userspace
 * controller, IRQ 0), 0x08 (8259 IRQ 0 after reset) and 2 (NMI) at handlers that report
 * the vector on port 0xe0. With BX=1 the guest programs the 8259 (base 0x08, IRQ0
 * unmasked) and PIT channel 0 (periodic, ~1 ms) for the in-kernel irqchip test. It then
 * halts with interrupts on until two interrupts have arrived, and ends the run. */
    .code16
    .globl _start
_start:
    xor %ax, %ax
    mov %ax, %ds
    movw $h20, 0x20*4
    movw $0, 0x20*4+2
    movw $h08, 0x08*4
    movw $0, 0x08*4+2
    movw $hnmi, 2*4
    movw $0, 2*4+2
    xor %si, %si                /* count of interrupts seen */
    cmp $1, %bx
    jne 1f
    mov $0x11, %al              /* ICW1: edge, cascade, ICW4 */
    out %al, $0x20
    mov $0x08, %al              /* ICW2: vector base 8 */
    out %al, $0x21
    mov $0x04, %al
    out %al, $0x21
    mov $0x01, %al              /* ICW4: 8086 mode */
    out %al, $0x21
    mov $0xfe, %al              /* unmask IRQ0 */
    out %al, $0x21
    mov $0x34, %al              /* PIT ch0, lo/hi, mode 2 */
    out %al, $0x43
    mov $1193, %ax              /* ~1 ms */
    out %al, $0x40
    mov %ah, %al
    out %al, $0x40
1:  sti
    hlt
    cmp $2, %si
    jb 1b
    cli
    mov %si, %ax
    out %ax, $0xe0
    out %al, $0xe4
    hlt
h20:
    push %ax
    mov $0x20, %ax
    out %ax, $0xe0
    inc %si
    pop %ax
    iret
h08:
    push %ax
    mov $0x08, %ax
    out %ax, $0xe0
    inc %si
    mov $0x20, %al              /* EOI */
    out %al, $0x20
    pop %ax
    iret
hnmi:
    push %ax
    mov $0x02, %ax
    out %ax, $0xe0
    inc %si
    pop %ax
    iret
