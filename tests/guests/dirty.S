/* dirty.S - the snapshot tests' guest: 16-bit real mode from the x86 reset vector.
 *
 * Mapped as the 4 KiB ROM at 0xfffff000 (linked at IP 0xf000), as realmode.S. Each run
 * increments the first byte of rom_count pages (at most 256: real mode reaches 1 MiB),
 * page rom_first onwards, one page apart; then DI += 1, SI = 0x5151, BP = page count,
 * an OUT to port 0x12 (a test device may write guest RAM there: "DMA"), and exit by
 * writing 0 to port 0x13. The host patches rom_count/rom_first (ROM offsets 0xfe0/0xfe2).
 */
    .code16
    .text
    .globl _start
_start:
    mov %cs:(rom_count), %cx
    mov %cs:(rom_first), %bx
    shl $8, %bx             /* page -> real-mode segment */
    mov %cx, %bp
    jcxz 2f
1:  mov %bx, %ds
    incb (0)
    add $0x100, %bx
    dec %cx
    jnz 1b
2:  xor %ax, %ax
    mov %ax, %ds
    inc %di
    mov $0x5151, %si
    out %al, $0x12
    out %al, $0x13
3:  cli
    hlt
    jmp 3b

    .org 0xfe0
rom_count:
    .word 1
rom_first:
    .word 1
    .org 0xff0
reset_vector:
    jmp _start
    .org 0x1000
