#!/bin/sh
# Rebuild the committed test guests (needs binutils-aarch64-linux-gnu and, for the AArch32
# guest, binutils-arm-linux-gnueabihf).
set -eu
cd "$(dirname "$0")"
aarch64-linux-gnu-as -o testguest.o testguest.S
aarch64-linux-gnu-ld -N -Ttext=0x40000000 -e _start -o testguest.elf testguest.o
aarch64-linux-gnu-objcopy -O binary testguest.elf testguest.bin
rm -f testguest.o
echo "testguest.bin: $(wc -c < testguest.bin) bytes"
arm-linux-gnueabihf-as -o a32guest.o a32guest.S
arm-linux-gnueabihf-ld -N --no-warn-rwx-segments -Ttext=0x40000000 -e _start -o a32guest.elf a32guest.o
arm-linux-gnueabihf-strip -o a32guest.elf a32guest.elf
arm-linux-gnueabihf-objcopy -O binary a32guest.elf a32guest.bin
rm -f a32guest.o
echo "a32guest.bin: $(wc -c < a32guest.bin) bytes"
aarch64-linux-gnu-as -o perfguest.o perfguest.S
aarch64-linux-gnu-ld -N --no-warn-rwx-segments -Ttext=0x40000000 -e _start -o perfguest.elf perfguest.o
aarch64-linux-gnu-objcopy -O binary perfguest.elf perfguest.bin
rm -f perfguest.o perfguest.elf
echo "perfguest.bin: $(wc -c < perfguest.bin) bytes"
