#!/bin/sh
# Rebuild the embedded guest(s) from source (GNU as/ld from binutils).
set -eu
cd "$(dirname "$0")"
as --32 -o default.o default.S
ld -m elf_i386 -T guest.ld -nostdlib --build-id=none -o default.elf default.o
rm -f default.o
