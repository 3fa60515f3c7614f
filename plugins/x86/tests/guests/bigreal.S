/* Multiboot v1 ELF32 linked at 16 KiB (as kvm-unit-tests' realmode test): drops from the
 * loader's protected mode to big real mode (data segments keep a 4 GiB limit) and calls
 * through a register, the address read from a function table at 0x9010, where kvmfw
 * used to write its multiboot information over the kernel. Reports: the dword written
 * above 1 MiB through DS, the called function's value, the
 * value of a software interrupt through the real-mode IVT, EBX (the info address) and the
 * info structure's flags read back through it; then ends the run (port 0xe4). */
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0
    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
    .text
    .code32
    .globl _start
_start:
    mov %ebx, %edi              /* multiboot info, kept for the report */
    lgdtl gdt_desc
    ljmp $0x08, $pm16
    .code16
pm16:
    mov $0x10, %ax              /* 4 GiB data segment: the limit survives real mode */
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %cr0, %eax
    and $~1, %eax
    mov %eax, %cr0
    ljmp $0, $rm
rm:
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x3000, %esp
    mov $0x200000, %edx
    movl $0x12345678, (%edx)    /* above 1 MiB: only in big real mode */
    movl (%edx), %eax
    outl %eax, $0xe0
    movl (fn_table), %eax
    calll *%eax
    outl %eax, $0xe0
    movw $isr, (0x50 * 4)       /* a real-mode interrupt through the IVT at 0 (the */
    movw $0, (0x50 * 4 + 2)     /* IDTR a BIOS leaves: base 0, limit 0x3ff) */
    int $0x50
    outl %eax, $0xe0
    mov %edi, %eax
    outl %eax, $0xe0
    movl (%edi), %eax           /* the info's flags, through a 32-bit address */
    outl %eax, $0xe0
    outb %al, $0xe4
    hlt
gdt:
    .quad 0
    .quad 0x00009b000000ffff    /* 0x08: 16-bit code, 64 KiB */
    .quad 0x008f93000000ffff    /* 0x10: 16-bit data, 4 GiB */
gdt_desc:
    .word 23
    .long gdt
    .org 0x5004                 /* 0x4000 + 0x5010 - 0xc (the header's place) */
fn_table:
    .long func
    .org 0x6000
func:
    mov $0xc0ffee, %eax
    retl
isr:
    mov $0x1717, %eax
    iret
