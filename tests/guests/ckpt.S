/* ckpt.S - the checkpoint tests' guest: a computation whose result depends on its
 * registers and on guest RAM, with an exit every 256 iterations (points to checkpoint at).
 *
 * Real mode from the reset vector, as realmode.S (ROM at 0xfffff000, RAM at 0). For each
 * i in 0..N-1 (N = 0x8000): EBX = EBX * 33 + i, stored at 0x10000 + 4 * (i & 0x3fff)
 * (64 KiB of RAM written); every 256 iterations "out %al, $0x20" (AL = i >> 8). Then it
 * sums those 64 KiB as 32-bit words and writes the sum to port 0x10 (a dword: the result),
 * and exits by writing 0 to port 0x13.
 */
    .code16
    .text
    .globl _start
_start:
    cld
    mov $0x1000, %ax
    mov %ax, %ds
    xor %ebx, %ebx
    xor %ecx, %ecx          /* i */
loop:
    imul $33, %ebx, %ebx
    add %ecx, %ebx
    mov %ecx, %edi
    and $0x3fff, %edi
    shl $2, %edi
    mov %ebx, (%di)
    test $0xff, %cl
    jnz 1f
    mov %ecx, %eax
    shr $8, %eax
    out %al, $0x20
1:  inc %ecx
    cmp $0x8000, %ecx
    jb loop
    /* sum the 64 KiB */
    xor %eax, %eax
    xor %si, %si
    mov $0x4000, %cx
2:  add (%si), %eax
    add $4, %si
    dec %cx
    jnz 2b
    mov $0x10, %dx
    out %eax, %dx
    xor %al, %al
    out %al, $0x13
3:  cli
    hlt
    jmp 3b

    .org 0xff0
reset_vector:
    jmp _start
    .org 0x1000
