/* Multiboot v1 ELF32: reports what the loader handed over, in order: EAX, EBX, info
 * flags, mem_lower, mem_upper, byte sum of the command line, mods_count, the module's
 * first dword, mmap_length, the first mmap entry's type; then 64-bit code would follow. */
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00000003
    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
    .text
    .code32
    .globl _start
_start:
    out %eax, $0xe0
    mov %ebx, %eax
    out %eax, $0xe0
    mov (%ebx), %eax
    out %eax, $0xe0
    mov 4(%ebx), %eax
    out %eax, $0xe0
    mov 8(%ebx), %eax
    out %eax, $0xe0
    mov 16(%ebx), %esi
    xor %eax, %eax
    xor %ecx, %ecx
1:  movb (%esi), %cl
    add %ecx, %eax
    inc %esi
    test %ecx, %ecx
    jnz 1b
    out %eax, $0xe0
    mov 20(%ebx), %eax
    out %eax, $0xe0
    mov 24(%ebx), %esi
    mov (%esi), %esi
    mov (%esi), %eax
    out %eax, $0xe0
    mov 44(%ebx), %eax
    out %eax, $0xe0
    mov 48(%ebx), %esi
    mov 20(%esi), %eax
    out %eax, $0xe0
    out %al, $0xe4
    hlt
    .bss
    .space 64
