/* Long mode at CPL3, run natively (ELF64; the host enters at a symbol with CS=0x2b).
 * Every entry point changes registers, then ends the run with an MMIO write to
 * 0xd0000008 (port IO is not usable at CPL3 here). */
    .code64
    .globl gpr_test, sse_test, x87_test, avx_test, avx512_test, cpuid_test
gpr_test:
    add $0x2222, %rax
    add $0x2222, %rbx
    add $0x2222, %rcx
    add $0x2222, %rdx
    add $0x2222, %rsi
    add $0x2222, %rdi
    add $0x2222, %rbp
    add $0x2222, %r8
    add $0x2222, %r15
    jmp done
sse_test:
    paddq %xmm1, %xmm0          /* xmm0 += xmm1 */
    movdqa %xmm0, %xmm2
    pxor %xmm15, %xmm14
    jmp done
x87_test:
    fld1
    fldpi                       /* st0 = pi, st1 = 1.0 */
    jmp done
avx_test:
    vpaddq %ymm1, %ymm0, %ymm3  /* ymm3 = ymm0 + ymm1 */
    jmp done
avx512_test:
    vpaddq %zmm1, %zmm0, %zmm4
    vpaddq %zmm17, %zmm16, %zmm18
    kmovq %k1, %k2
    korq %k1, %k3, %k4
    jmp done
cpuid_test:
    xor %eax, %eax
    cpuid                       /* vendor in ebx, edx, ecx */
    mov %rbx, %r8
    mov %rdx, %r9
    mov %rcx, %r10
    mov $1, %eax
    cpuid                       /* family/model in eax, features in ecx/edx */
    mov %rax, %rsi
    mov %rcx, %r12
    mov %rdx, %r13
    mov $7, %eax
    xor %ecx, %ecx
    cpuid
    mov %rbx, %r14
    jmp done
done:
    mov $0xd0000008, %r11d
    movq $1, (%r11)
    jmp done
