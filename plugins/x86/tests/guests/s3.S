/* ACPI S3 test (ELF32). Finds the FADT (RSDP -> RSDT), and from it the FACS and PM1a
 * blocks; copies a real-mode wake stub to 0x8000 and sets the FACS firmware waking vector
 * to it; writes a marker at 0x7000, enables PWRBTN_EN (device state that must survive);
 * reports 1, then enters S3 (SLP_TYP=1 | SLP_EN to PM1a_CNT). The stub reports 0x5353,
 * the marker, PM1a_STS (WAK_STS set) and PM1a_EN, CR0, then ends the run (port 0xe4). If
 * the machine does not sleep, 0xbad is reported and the run ends. */
    .code32
    .globl _start
_start:
    mov $0xe0000, %esi
1:  cmpl $0x20445352, (%esi)
    jne 2f
    cmpl $0x20525450, 4(%esi)
    je 3f
2:  add $16, %esi
    cmp $0x100000, %esi
    jb 1b
    jmp fail
3:  mov 16(%esi), %esi          /* RSDT */
    mov 4(%esi), %ecx
    lea (%esi,%ecx), %edi
    add $36, %esi
4:  cmp %edi, %esi
    jae fail
    mov (%esi), %ebx
    cmpl $0x50434146, (%ebx)    /* "FACP" */
    je 5f
    add $4, %esi
    jmp 4b
5:  mov 36(%ebx), %eax          /* FIRMWARE_CTRL: the FACS */
    movl $0x8000, 12(%eax)      /* firmware waking vector */
    mov $stub, %esi             /* copy the wake stub to 0x8000 */
    mov $0x8000, %edi
    mov $(stub_end - stub), %ecx
    rep movsb
    mov 56(%ebx), %edx          /* PM1a_EVT_BLK */
    mov %edx, 0x7008            /* for the stub */
    movl $0x5eed, 0x7000        /* RAM marker */
    add $2, %edx                /* PM1a_EN */
    mov $0x100, %ax             /* PWRBTN_EN */
    out %ax, %dx
    mov $1, %eax
    out %eax, $0xe0
    mov 64(%ebx), %edx          /* PM1a_CNT_BLK */
    mov $((1 << 10) | (1 << 13)), %ax   /* SLP_TYP 1 (S3), SLP_EN */
    out %ax, %dx
    nop
    nop
fail:
    mov $0xbad, %eax
    out %eax, $0xe0
    out %al, $0xe4
    hlt

    .code16
stub:                           /* real mode, CS = 0x800, IP = 0 */
    xor %ax, %ax
    mov %ax, %ds
    mov $0x5353, %eax
    outl %eax, $0xe0
    movl 0x7000, %eax
    outl %eax, $0xe0
    movw 0x7008, %dx
    xor %eax, %eax
    inw %dx, %ax                /* PM1a_STS */
    outl %eax, $0xe0
    add $2, %dx
    inw %dx, %ax                /* PM1a_EN */
    outl %eax, $0xe0
    mov %cr0, %eax
    outl %eax, $0xe0
    outb %al, $0xe4
    hlt
stub_end:
