/* Real mode (flat at 0x7c00), for `kvmfw run --checkpoint-*` on the default board: EBX =
 * rol(EBX * 33 + ECX, 5) over 1000 steps, then one character 'a' + (BL & 15) on the UART
 * (0x3f8); 200 characters, a newline, then debug-exit (0xf4) with 0 (exit status 1).
 *
 * After the first 100 characters it idles: the in-kernel 8259 (vector base 8, only IRQ0)
 * and PIT channel 0 (~100 Hz), `sti; hlt` until 100 ticks came (at least ~1 s of the
 * host's and so of simulated time), then IRQ0 masked again. So a run lasts over a second
 * of simulated time however fast the CPU is, and a checkpoint placed by simulated time
 * before that always falls mid-run; the output does not depend on when it falls. */
    .code16
    .globl _start
    .set IDLE_TICKS, 100
_start:
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7c00, %sp
    movw $tick, 0x08*4
    movw $0, 0x08*4+2
    mov $0x3f8, %dx
    xor %ebx, %ebx
    xor %si, %si
outer:
    mov $1000, %ecx
inner:
    imul $33, %ebx, %ebx
    add %ecx, %ebx
    rol $5, %ebx
    loop inner
    mov %bl, %al
    and $15, %al
    add $0x61, %al
    out %al, %dx
    inc %si
    cmp $100, %si
    jne 1f
    call idle
1:  cmp $200, %si
    jb outer
    mov $10, %al
    out %al, %dx
    mov $0xf4, %dx
    xor %al, %al
    out %al, %dx
2:  hlt
    jmp 2b

idle:
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
    mov $11932, %ax             /* ~100 Hz */
    out %al, $0x40
    mov %ah, %al
    out %al, $0x40
3:  sti
    hlt
    cli
    cmpw $IDLE_TICKS, ticks
    jb 3b
    ret

/* IRQ0: count; once enough came mask IRQ0 before the EOI (KVM re-injects ticks missed
 * while a handler ran: left unmasked, a slow host could re-enter here forever) */
tick:
    push %ax
    incw ticks
    cmpw $IDLE_TICKS, ticks
    jb 4f
    mov $0xff, %al
    out %al, $0x21
4:  mov $0x20, %al              /* EOI */
    out %al, $0x20
    pop %ax
    iret

ticks:
    .word 0
