#!/bin/sh
# Rebuild the committed x86 test guests from source (GNU as/ld from binutils).
set -eu
cd "$(dirname "$0")"
flat() { as --32 -o "$1.o" "$1.S"; ld -m elf_i386 -Ttext=0x7c00 --oformat binary -o "$1.bin" "$1.o"; rm -f "$1.o"; }
elf32() { as --32 -o "$1.o" "$1.S"; ld -m elf_i386 -T ../../kvmfw_x86/guests/guest.ld -nostdlib --build-id=none --no-warn-rwx-segments -o "$1.elf" "$1.o"; rm -f "$1.o"; }
elf64() { as --64 -o "$1.o" "$1.S"; ld -m elf_x86_64 -T ../../kvmfw_x86/guests/guest.ld -nostdlib --build-id=none --no-warn-rwx-segments -o "$1.elf" "$1.o"; rm -f "$1.o"; }
low32() { as --32 -o "$1.o" "$1.S"; ld -m elf_i386 -T low.ld -nostdlib --build-id=none --no-warn-rwx-segments -o "$1.elf" "$1.o"; rm -f "$1.o"; }
for g in real irq strio clihlt pit handover16 idle16; do flat $g; done
for g in bigreal; do low32 $g; done
for g in prot32 multiboot smp reset s3 reboot_k pit_ioapic handover32; do elf32 $g; done
for g in long64 sys64 user64 triple cpuid64 hw64 gdb64 ckpt64 handover64 insts64; do elf64 $g; done

