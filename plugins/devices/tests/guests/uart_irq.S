/* Real mode (flat at 0x7c00), in-kernel 8259: print a line from the 16550's THR-empty
 * interrupt (IRQ 4, vector 0x0c), one character per interrupt, then report the number of
 * interrupts through debug-exit. */
    .code16
    .globl _start
_start:
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7000, %sp
    movw $isr, 0x0c*4
    movw $0, 0x0c*4+2
    mov $0x11, %al              /* 8259: ICW1 edge, cascade, ICW4 */
    out %al, $0x20
    mov $0x08, %al              /* ICW2: vectors 0x08-0x0f */
    out %al, $0x21
    mov $0x04, %al
    out %al, $0x21
    mov $0x01, %al
    out %al, $0x21
    mov $0xef, %al              /* unmask IRQ 4 only */
    out %al, $0x21
    mov $msg, %si
    xor %di, %di                /* interrupts taken */
    xor %bp, %bp                /* done flag */
    mov $0x3fc, %dx             /* MCR: DTR | RTS | OUT2 */
    mov $0x0b, %al
    out %al, %dx
    mov $0x3f9, %dx             /* IER: THR empty -> interrupts at once */
    mov $0x02, %al
    out %al, %dx
1:  sti
    hlt
    cli
    test %bp, %bp
    jz 1b
    mov %di, %ax
    out %ax, $0xf4
2:  hlt
    jmp 2b
isr:
    push %ax
    push %dx
    inc %di
    mov $0x3fa, %dx             /* IIR: reading it acknowledges THRE */
    in %dx, %al
    and $0x0f, %al
    cmp $0x02, %al
    jne 4f
    lodsb
    test %al, %al
    jz 3f
    mov $0x3f8, %dx
    out %al, %dx
    jmp 4f
3:  mov $0x3f9, %dx             /* all sent: THRE interrupts off */
    xor %al, %al
    out %al, %dx
    mov $1, %bp
4:  mov $0x20, %al              /* EOI */
    out %al, $0x20
    pop %dx
    pop %ax
    iret
msg: .asciz "irq-driven\n"
