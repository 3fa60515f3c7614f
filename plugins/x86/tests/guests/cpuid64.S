/* Long mode at CPL0 (ELF64): CPUID as KVM presents it (at CPL3 kvm_pvm runs CPUID
 * natively and shows the host's). Reports leaf 0 EBX, EDX, ECX (vendor), leaf 1 EAX,
 * ECX, EDX, leaf 7 EBX and EAX, EBX, ECX, EDX of leaves 0x80000002-4 (the brand string)
 * on port 0xe0. */
    .code64
    .globl _start
_start:
    xor %eax, %eax
    cpuid
    mov %ebx, %eax
    out %eax, $0xe0
    mov %edx, %eax
    out %eax, $0xe0
    mov %ecx, %eax
    out %eax, $0xe0
    mov $1, %eax
    cpuid
    out %eax, $0xe0
    mov %ecx, %eax
    out %eax, $0xe0
    mov %edx, %eax
    out %eax, $0xe0
    mov $7, %eax
    xor %ecx, %ecx
    cpuid
    mov %ebx, %eax
    out %eax, $0xe0
    mov $0x80000002, %esi
1:  mov %esi, %eax
    cpuid
    out %eax, $0xe0
    mov %ebx, %eax
    out %eax, $0xe0
    mov %ecx, %eax
    out %eax, $0xe0
    mov %edx, %eax
    out %eax, $0xe0
    inc %esi
    cmp $0x80000005, %esi
    jne 1b
    out %al, $0xe4
    hlt
