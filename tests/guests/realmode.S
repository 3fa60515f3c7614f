/* realmode.S - the core's test guest: 16-bit real mode from the x86 reset vector.
 *
 * Mapped as a 4 KiB ROM at 0xfffff000 (linked at IP 0xf000 of the reset code segment);
 * the CPU starts at CS base 0xffff0000, IP 0xfff0,
 * which jumps to _start. RAM is at 0 (DS=0). The host selects a program through AX
 * (pushed into the vCPU by the test arch plugin before the first entry):
 *   1 pio      out/in on ports 0x10/0x11/0x12, then exit
 *   2 mmio     byte write, byte read and word write at 0x20010/0x20020/0x20030
 *   3 sync     out BX on port 0x12 (word), BX += 1, SI = 0x5151, exit
 *   4 spin     loop forever (the run timer must end it)
 *   5 triple   load an empty IDT and raise int3: triple fault
 *   6 halt     cli; hlt
 *   7 emufail  an x87 load from MMIO, which KVM's instruction emulator cannot do
 *   8 pioloop  ECX iterations of "out %al, $0x10", then exit (benchmark)
 *   9 mmioloop ECX iterations of "mov %al, (0x0010)" with DS=0x2000, then exit (benchmark)
 *  10 count    count in RSI until the host stops the run (event-bounded slices)
 * With AX=0 the program and ECX come from rom_program/rom_count at ROM offset 0xfe0
 * (6 = halt unless patched), so hosts that cannot set registers (QEMU) can run it.
 * "exit" writes AL=0 to port 0x13.
 */
    .code16
    .text
    .globl _start
_start:
    test %ax, %ax           /* no program from the host: take the one built into the ROM */
    jnz 1f
    mov %cs:(rom_program), %ax
    mov %cs:(rom_count), %ecx
1:  cmp $1, %ax
    je pio
    cmp $2, %ax
    je mmio
    cmp $3, %ax
    je sync
    cmp $4, %ax
    je spin
    cmp $5, %ax
    je triple
    cmp $6, %ax
    je halt
    cmp $7, %ax
    je emufail
    cmp $8, %ax
    je pioloop
    cmp $9, %ax
    je mmioloop
    cmp $10, %ax
    je count
    jmp halt

pio:
    mov $0x10, %dx
    mov $'O', %al
    out %al, %dx
    mov $'K', %al
    out %al, %dx
    mov $0x11, %dx
    in %dx, %al             /* the test device answers 0x41 */
    inc %al
    mov $0x10, %dx
    out %al, %dx            /* 'B' */
    mov $0x12, %dx
    mov $0xbeef, %ax
    out %ax, %dx
    jmp exit

mmio:
    mov $0x2000, %ax
    mov %ax, %ds
    movb $0x5a, (0x0010)
    mov (0x0020), %al       /* the test device answers 0x33 */
    movw $0x1234, (0x0030)
    xor %cx, %cx
    mov %cx, %ds
    mov $0x10, %dx
    out %al, %dx
    jmp exit

sync:
    mov $0x12, %dx
    mov %bx, %ax
    out %ax, %dx
    inc %bx
    mov $0x5151, %si
    jmp exit

spin:
    jmp spin

triple:
    lidt (0x0500)           /* RAM is zero: an IDT and a GDT with limit 0 */
    lgdt (0x0500)
    mov %cr0, %eax
    or $1, %al              /* protected mode: descriptors now come from the tables */
    mov %eax, %cr0
    mov $8, %ax
    mov %ax, %ds            /* #GP (selector beyond the GDT) -> #DF -> triple fault */
    jmp halt

halt:
    cli
    hlt
    jmp halt

emufail:
    mov $0x2000, %ax
    mov %ax, %ds
    fildl (0x0040)          /* x87 load from MMIO (0x20040): real hardware cannot finish
                               it without KVM's emulator, which has no x87 memory forms */
    jmp exit

pioloop:
    mov $0x10, %dx
1:  out %al, %dx
    dec %ecx
    jnz 1b
    jmp exit

mmioloop:
    mov $0x2000, %bx
    mov %bx, %ds
1:  mov %al, (0x0010)
    dec %ecx
    jnz 1b
    xor %bx, %bx
    mov %bx, %ds
    jmp exit

count:
    inc %esi
    jmp count

exit:
    xor %al, %al
    mov $0x13, %dx
    out %al, %dx
    jmp halt

    .org 0xfe0
rom_program:                /* patched by benchmarks for hosts that cannot set registers */
    .word 6
    .word 0
rom_count:
    .long 0
    .org 0xff0
reset_vector:
    jmp _start
    .org 0x1000
