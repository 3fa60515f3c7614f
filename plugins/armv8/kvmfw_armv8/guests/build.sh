#!/bin/sh
# Rebuild the committed test guest (needs binutils-aarch64-linux-gnu).
set -eu
cd "$(dirname "$0")"
aarch64-linux-gnu-as -o testguest.o testguest.S
aarch64-linux-gnu-ld -N -Ttext=0x40000000 -e _start -o testguest.elf testguest.o
aarch64-linux-gnu-objcopy -O binary testguest.elf testguest.bin
rm -f testguest.o
echo "testguest.bin: $(wc -c < testguest.bin) bytes"
