#!/bin/sh
# Rebuild the hand-over test guest (needs binutils-aarch64-linux-gnu).
set -eu
cd "$(dirname "$0")"
aarch64-linux-gnu-as -o handover.o handover.S
aarch64-linux-gnu-ld -N -Ttext=0x40000000 -e _start -o handover.elf handover.o
aarch64-linux-gnu-objcopy -O binary handover.elf handover.bin
rm -f handover.o handover.elf
