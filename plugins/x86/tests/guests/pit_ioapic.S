/* 32-bit protected mode (ELF32): where the in-kernel PIT's IRQ 0 reaches the IOAPIC.
 *
 * Both 8259s are masked. IOAPIC pin 0 is programmed to vector 0x31 and pin 2 (where the
 * MP table and the MADT put ISA IRQ 0) to vector 0x30, both edge, fixed, to APIC 0. The
 * local APIC is software-enabled and PIT channel 0 set to a ~1 ms periodic rate. The
 * first timer interrupt's vector is reported on port 0xe0 (0x30: the PC's routing, as
 * QEMU's; 0x31: KVM's default table), both IOAPIC pins are masked and the run ends
 * (port 0xe4), from the handler. No tick within ~64M halts-and-wakes would report 0xDEAD. */
    .set IOAPIC, 0xFEC00000
    .set APIC, 0xFEE00000
    .text
    .code32
    .globl _start
_start:
    mov $0x30, %edx             /* IDT gates 0x30 and 0x31 */
    mov $tick30, %eax
    call gate
    mov $0x31, %edx
    mov $tick31, %eax
    call gate
    lidt idtr
    mov $0xff, %al              /* mask every 8259 input */
    out %al, $0x21
    out %al, $0xa1
    orl $0x100, APIC+0xF0       /* local APIC: software enable (SVR) */
    movl $0, APIC+0x80          /* TPR 0 */
    movl $0x10, IOAPIC          /* pin 0: vector 0x31, edge, fixed, physical */
    movl $0x31, IOAPIC+0x10
    movl $0x11, IOAPIC
    movl $0, IOAPIC+0x10        /* destination APIC 0 */
    movl $0x14, IOAPIC          /* pin 2: vector 0x30 */
    movl $0x30, IOAPIC+0x10
    movl $0x15, IOAPIC
    movl $0, IOAPIC+0x10
    mov $0x34, %al              /* PIT ch0, lo/hi, mode 2 */
    out %al, $0x43
    mov $1193 & 0xff, %al       /* ~1 ms */
    out %al, $0x40
    mov $1193 >> 8, %al
    out %al, $0x40
    xor %esi, %esi              /* the vector seen */
    mov $0x4000000, %ecx
1:  sti
    hlt
    cli
    test %esi, %esi
    jnz 2f
    loop 1b
    mov $0xDEAD, %esi
2:  mov %esi, %eax
    out %eax, $0xe0
    out %al, $0xe4
3:  hlt
    jmp 3b

gate:                           /* 32-bit interrupt gate: vector %edx, handler %eax */
    lea idt(,%edx,8), %edi
    mov %ax, (%edi)
    shr $16, %eax
    mov %ax, 6(%edi)
    mov %cs, %ax
    mov %ax, 2(%edi)
    movw $0x8E00, 4(%edi)
    ret

tick30:
    mov $0x30, %esi
    jmp tick
tick31:
    mov $0x31, %esi
tick:
    movl $0x10, IOAPIC          /* mask both pins (bit 16), so no tick storm follows */
    movl $0x10031, IOAPIC+0x10
    movl $0x14, IOAPIC
    movl $0x10030, IOAPIC+0x10
    movl $0, APIC+0xB0          /* EOI */
    jmp 2b                      /* report from here: no iret (KVM PVM cannot emulate it) */

    .data
    .align 8
idt:
    .fill 0x40, 8, 0
idt_end:
idtr:
    .word idt_end - idt - 1
    .long idt
