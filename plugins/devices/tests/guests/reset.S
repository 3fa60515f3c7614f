/* Reset the machine the way Linux does with reboot=k: i8042 command 0xfe. */
    .code32
    .globl _start
_start:
1:  in $0x64, %al               /* wait for the input buffer to drain */
    test $0x02, %al
    jnz 1b
    mov $0xfe, %al
    out %al, $0x64
2:  hlt
    jmp 2b
