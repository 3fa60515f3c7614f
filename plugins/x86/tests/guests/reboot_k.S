/* `kvmfw run` reboot test (ELF32) for the default PC board plus `--device debug-exit`:
 * counts boots in RAM at 0x7000 (outside the image: it survives a reboot), resets through
 * the i8042 (0xfe to port 0x64, Linux's reboot=k) on the first boot, and on the second
 * writes the count to debug-exit (0xf4): exit status (2 << 1) | 1 = 5. */
    .code32
    .globl _start
_start:
    mov 0x7000, %eax
    inc %eax
    mov %eax, 0x7000
    cmp $1, %eax
    jne 1f
    mov $0xfe, %al
    out %al, $0x64
    mov $0xbad, %eax            /* not reset: status (0xbad << 1) | 1 */
1:  out %eax, $0xf4
    hlt
