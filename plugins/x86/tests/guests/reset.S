/* Reboot test (ELF32). A boot counter at 0x7000 lives in RAM outside the image, so it
 * survives a reset (the image is loaded again). Every boot reports: the boot number, then
 * MSR IA32_SYSENTER_CS (0 at power-on; boot 1 sets it to 0x1234 before it resets). Boot 1
 * then resets the machine the way 0x7004 selects: 1 i8042 (0xfe to port 0x64, Linux's
 * reboot=k), 2 the reset control register (6 to 0xcf9), 3 the ACPI reset register (found
 * from the RSDP through the RSDT's FADT), 4 a triple fault. Boot 2 ends the run (0xe4).
 * If a reset does not happen, 0xbad is reported and the run ends. */
    .set COUNTER, 0x7000
    .set METHOD, 0x7004
    .code32
    .globl _start
_start:
    mov COUNTER, %eax
    inc %eax
    mov %eax, COUNTER
    out %eax, $0xe0
    mov $0x174, %ecx            /* IA32_SYSENTER_CS */
    rdmsr
    out %eax, $0xe0
    cmpl $1, COUNTER
    jne done
    mov $0x1234, %eax
    xor %edx, %edx
    wrmsr
    mov METHOD, %ecx
    cmp $1, %ecx
    je kbd
    cmp $2, %ecx
    je rcr
    cmp $3, %ecx
    je acpi
    cmp $4, %ecx
    je triple
    jmp fail
kbd:
    mov $0xfe, %al
    out %al, $0x64
    jmp fail
rcr:
    mov $0x06, %al
    mov $0xcf9, %dx
    out %al, %dx
    jmp fail
acpi:
    mov $0xe0000, %esi          /* the RSDP: "RSD PTR " on a 16-byte boundary */
1:  cmpl $0x20445352, (%esi)
    jne 2f
    cmpl $0x20525450, 4(%esi)
    je 3f
2:  add $16, %esi
    cmp $0x100000, %esi
    jb 1b
    jmp fail
3:  mov 16(%esi), %esi          /* RSDT */
    mov 4(%esi), %ecx           /* length */
    lea (%esi,%ecx), %edi
    add $36, %esi
4:  cmp %edi, %esi
    jae fail
    mov (%esi), %ebx
    cmpl $0x50434146, (%ebx)    /* "FACP" */
    je 5f
    add $4, %esi
    jmp 4b
5:  mov 120(%ebx), %edx         /* RESET_REG.address (system IO) */
    movb 128(%ebx), %al         /* RESET_VALUE */
    out %al, %dx
    jmp fail
triple:
    lidt null_idt
    xor %ecx, %ecx
    div %ecx                    /* #DE with an empty IDT: a triple fault */
fail:
    mov $0xbad, %eax
    out %eax, $0xe0
done:
    out %al, $0xe4
    hlt
null_idt:
    .word 0
    .long 0
