/* Guest-side device fuzz (issue 10): a multiboot ELF that hits every register of the default
 * x86 board, plus debug-exit and two virtio-mmio windows, with pseudo-random accesses.
 *
 * Command line (after the image name): SEED COUNT [MODE], in decimal (defaults 1 and 3000). A
 * xorshift32 generator (a linear-feedback shift register) seeded with SEED picks, COUNT
 * times: a target range, an offset in it, a width (1, 2 or 4 bytes, or a 1-8 element
 * string read for port IO), read or write, and a value. Offsets are aligned to the width
 * three times in four and any byte of the range otherwise, so accesses may be misaligned
 * or straddle a range's end. Writes that would end the run
 * by design are defused, so the fuzz reaches its end: i8042 commands 0xd1 and 0xf0-0xff
 * (output port / CPU reset), RST_CPU in the reset control register (0xcf9), ACPI PM1a_CNT.SLP_EN (bit 13: sleep or power-off), and the
 * pseudo-op window's operation pages except rpns and sum. Debug-exit (port 0xf4) is
 * written last: status (0x10 << 1) | 1 = 33 means the fuzz ran to its end. MODE 1 (wild)
 * defuses nothing and adds the whole pseudo-op window to the targets: the run then ends
 * wherever the guest happens to end it (i8042 reset, ACPI S5, pseudo-op exit or fail). */
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00000003
    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

    .set KIND_PIO, 0
    .set KIND_MMIO, 1
    .set DONE, 0x10

    .data
    .align 4
/* base, size, kind */
targets:
    .long 0x3f8, 8, KIND_PIO                /* 16550 COM1 */
    .long 0x70, 2, KIND_PIO                 /* CMOS RTC index/data */
    .long 0x60, 5, KIND_PIO                 /* i8042 (0x61: in-kernel PIT speaker port) */
    .long 0x600, 12, KIND_PIO               /* ACPI PM1a_STS/EN/CNT, PM timer */
    .long 0xcf8, 8, KIND_PIO                /* PCI configuration mechanism #1 */
    .long 0xcf8, 4, KIND_PIO                /* CONFIG_ADDRESS again: more enabled cycles */
    .long 0x510, 12, KIND_PIO               /* fw_cfg selector, data, DMA */
    .long 0xc0000000, 0x10000000, KIND_MMIO /* PCI BAR aperture */
    .long 0xd0000000, 0x200, KIND_MMIO      /* virtio-mmio window 0 (virtio-blk) */
    .long 0xd0000200, 0x200, KIND_MMIO      /* virtio-mmio window 1 (virtio-console) */
    .long 0xd0000000, 0x80, KIND_MMIO       /* virtio queue/status registers, more often */
    .long 0xffff0000, 0x40, KIND_MMIO       /* pseudo-op ARG0-5, RESULT, MAGIC */
    .long 0xffff0700, 8, KIND_MMIO          /* pseudo-op rpns */
    .long 0xffff2300, 8, KIND_MMIO          /* pseudo-op sum */
    .long 0xffff8000, 0x8000, KIND_MMIO     /* pseudo-op buffer */
targets_end:
    .set NTARGETS, (targets_end - targets) / 12
/* wild mode only: where a write can end the run */
    .long 0xffff0000, 0x10000, KIND_MMIO    /* the whole pseudo-op window: exit, fail, ... */
wild_end:
    .set NWILD, (wild_end - targets) / 12

state:  .long 1
count:  .long 3000
ntargets: .long NTARGETS
wild:   .long 0
addr:   .long 0
size:   .long 0
kind:   .long 0
ctl:    .long 0
value:  .long 0

    .bss
    .align 16
scratch: .space 64

    .text
    .code32
    .globl _start
_start:
    mov $0x90000, %esp
    cmp $0x2BADB002, %eax
    jne 5f
    mov 16(%ebx), %esi              /* multiboot command line: "IMAGE SEED COUNT" */
1:  lodsb
    test %al, %al
    jz 5f
    cmp $' ', %al
    jne 1b
    call parse_dec
    test %eax, %eax
    jz 2f
    mov %eax, state
2:  call parse_dec
    test %eax, %eax
    jz 5f
    mov %eax, count
    call parse_dec
    test %eax, %eax
    jz 5f
    movl $1, wild                   /* MODE != 0: wild, nothing defused */
    movl $NWILD, ntargets
5:
fuzz_loop:
    cmpl $0, count
    je finish
    decl count
    call rand
    mov %eax, ctl
    xor %edx, %edx
    mov ntargets, %ecx
    div %ecx
    imul $12, %edx, %edx
    lea targets(%edx), %ebp
    mov 4(%ebp), %ecx
    mov 8(%ebp), %eax
    mov %eax, kind
    call rand
    xor %edx, %edx
    div %ecx                        /* offset = rand % size */
    mov ctl, %eax                   /* bits 28-29 != 0 (3 in 4): align it to the width */
    test $0x30000000, %eax
    jz 1f
    shr $20, %eax
    and $3, %eax
    jz 1f
    and $~1, %edx
    cmp $1, %eax
    je 1f
    and $~3, %edx
1:  add (%ebp), %edx
    mov %edx, addr
    call rand
    mov %eax, value

    mov ctl, %ecx                   /* bits 20-21: width; 24-25: 3 = read */
    shr $20, %ecx
    and $3, %ecx
    mov ctl, %eax
    shr $24, %eax
    and $3, %eax
    cmp $3, %eax
    je do_read
    cmpl $KIND_MMIO, kind
    je mmio_write

/* --- port IO writes: defuse the run-ending ones ------------------------------------------ */
    mov addr, %edx
    mov value, %eax
    cmpl $0, wild
    jne 3f
    cmp $0x64, %edx
    jne 2f
    cmp $0, %ecx                    /* a byte to the i8042 command port */
    jne 2f
    cmp $0xf0, %al
    jae 1f
    cmp $0xd1, %al
    jne 2f
1:  mov $0x20, %al                  /* read command byte instead */
2:  cmp $0xcf9, %edx                /* a byte to the PIIX reset control register */
    jne 4f
    cmp $0, %ecx
    jne 4f
    and $0xfb, %al                  /* clear RST_CPU (bit 2) */
4:  mov $0x605, %ebx                /* PM1a_CNT high byte: clear SLP_EN (bit 5) in it */
    sub %edx, %ebx                  /* byte index of 0x605 in this access */
    cmp $3, %ebx
    ja 3f
    push %ecx
    lea (,%ebx,8), %ecx
    mov $0x20, %ebx
    shl %cl, %ebx
    not %ebx
    and %ebx, %eax
    pop %ecx
3:  cmp $1, %ecx
    jb pio_w1
    je pio_w2
    out %eax, %dx
    jmp fuzz_loop
pio_w1:
    out %al, %dx
    jmp fuzz_loop
pio_w2:
    out %ax, %dx
    jmp fuzz_loop

mmio_write:
    mov addr, %edx
    mov value, %eax
    cmp $1, %ecx
    jb 1f
    je 2f
    mov %eax, (%edx)
    jmp fuzz_loop
1:  mov %al, (%edx)
    jmp fuzz_loop
2:  mov %ax, (%edx)
    jmp fuzz_loop

do_read:
    mov addr, %edx
    cmpl $KIND_MMIO, kind
    je mmio_read
    cmp $1, %ecx
    jb 1f
    je 2f
    cmp $2, %ecx
    je 3f
    mov value, %ecx                 /* string read: 1-8 elements of 1, 2 or 4 bytes */
    and $7, %ecx
    inc %ecx
    mov $scratch, %edi
    cld
    mov value, %eax
    shr $8, %eax
    and $3, %eax
    jz 4f
    cmp $1, %eax
    je 6f
    rep insl
    jmp fuzz_loop
4:  rep insb
    jmp fuzz_loop
6:  rep insw
    jmp fuzz_loop
1:  in %dx, %al
    jmp fuzz_loop
2:  in %dx, %ax
    jmp fuzz_loop
3:  in %dx, %eax
    jmp fuzz_loop

mmio_read:
    cmp $1, %ecx
    jb 1f
    je 2f
    mov (%edx), %eax
    jmp fuzz_loop
1:  movb (%edx), %al
    jmp fuzz_loop
2:  movw (%edx), %ax
    jmp fuzz_loop

finish:
    mov $DONE, %eax
    out %eax, $0xf4
1:  hlt
    jmp 1b

/* xorshift32 of state -> eax (and state) */
rand:
    mov state, %eax
    mov %eax, %edx
    shl $13, %edx
    xor %edx, %eax
    mov %eax, %edx
    shr $17, %edx
    xor %edx, %eax
    mov %eax, %edx
    shl $5, %edx
    xor %edx, %eax
    mov %eax, state
    ret

/* the decimal number at esi (leading spaces skipped) -> eax; esi after it */
parse_dec:
    xor %eax, %eax
1:  cmpb $' ', (%esi)
    jne 2f
    inc %esi
    jmp 1b
2:  movzbl (%esi), %edx
    sub $'0', %edx
    cmp $9, %edx
    ja 3f
    imul $10, %eax, %eax
    add %edx, %eax
    inc %esi
    jmp 2b
3:  ret
