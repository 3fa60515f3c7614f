/* Real mode (flat at 0x7c00): the in-kernel 8259 and PIT. The guest programs the master
 * 8259 (vector base 0x08, only IRQ0 unmasked) and PIT channel 0 (periodic, ~1 ms), halts
 * with interrupts on, and reports each tick's vector on port 0xe0. The handler masks IRQ0
 * at the 8259 once two ticks came, before its EOI: KVM re-injects PIT ticks that were
 * missed while a handler ran, so on a slow host (every report is an exit to userspace,
 * which can take longer than the 1 ms period) a handler that left IRQ0 unmasked would be
 * re-entered right after each iret and never reach the cli. It then reports the count
 * and ends the run (port 0xe4). */
    .code16
    .globl _start
_start:
    xor %ax, %ax
    mov %ax, %ds
    movw $h08, 0x08*4
    movw $0, 0x08*4+2
    xor %si, %si                /* ticks seen */
    mov $0x11, %al              /* ICW1: edge, cascade, ICW4 */
    out %al, $0x20
    mov $0x08, %al              /* ICW2: vector base 8 */
    out %al, $0x21
    mov $0x04, %al              /* ICW3: slave on IRQ2 */
    out %al, $0x21
    mov $0x01, %al              /* ICW4: 8086 mode */
    out %al, $0x21
    mov $0xfe, %al              /* OCW1: unmask IRQ0 only */
    out %al, $0x21
    mov $0x34, %al              /* PIT ch0, lo/hi, mode 2 */
    out %al, $0x43
    mov $1193, %ax              /* ~1 ms */
    out %al, $0x40
    mov %ah, %al
    out %al, $0x40
1:  sti
    hlt
    cli
    cmp $2, %si
    jb 1b
    mov %si, %ax
    out %ax, $0xe0
    out %al, $0xe4
2:  hlt
    jmp 2b
h08:
    push %ax
    mov $0x08, %ax
    out %ax, $0xe0
    inc %si
    cmp $2, %si
    jb 3f
    mov $0xff, %al              /* enough ticks: mask every 8259 input */
    out %al, $0x21
3:  mov $0x20, %al              /* EOI */
    out %al, $0x20
    pop %ax
    iret
