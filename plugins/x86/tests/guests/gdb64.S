/* ELF64 guest with symbols for the GDB stub tests (long mode, identity-mapped 4 GiB).
 * Maps an alias of the first 2 MiB at HIGH (a virtual address that is not physical),
 * calls add(3, 4) (arguments in rdi/rsi), increments `counter` five times (watchpoints),
 * spins while `spin` is non-zero (a debugger sets it to test Ctrl-C), then writes
 * counter + add's result (12) to the debug-exit device: the run's status is 25. */
    .set HIGH_PML4_INDEX, 256              /* 0xffff800000000000 */
    .set PDPT, 0x20000
    .set PD, 0x21000
    .text
    .code64
    .globl _start, add, spin_loop, counter, spin, result
    .type _start, @function
_start:
    mov $0x80000, %rsp
    movq $(PD | 3), PDPT
    movq $0x83, PD                         /* 2 MiB page at physical 0 */
    mov %cr3, %rax
    movq $(PDPT | 3), HIGH_PML4_INDEX * 8(%rax)
    mov $3, %edi
    mov $4, %esi
    call add
    mov %rax, result
    mov $5, %ecx
1:  incq counter
    dec %ecx
    jnz 1b
    .type spin_loop, @function
spin_loop:
    cmpq $0, spin
    jne spin_loop
    mov counter, %rax
    add result, %rax
    out %eax, $0xf4
    hlt
    .size _start, . - _start

    .type add, @function
add:
    lea (%rdi,%rsi), %rax
    ret
    .size add, . - add

    .data
    .align 8
    .type counter, @object
counter: .quad 0
    .size counter, 8
    .type spin, @object
spin:    .quad 0
    .size spin, 8
    .type result, @object
result:  .quad 0
    .size result, 8
    .quad 0x1122334455667788
