#!/bin/sh
# Rebuild the sweep example guest (GNU as and ld, from binutils); square.elf is committed,
# so running the example needs neither.
set -eu
cd "$(dirname "$0")"
as --32 -I ../guests -o square.o square.S
ld -m elf_i386 -T ../guests/guest.ld -nostdlib --build-id=none -o square.elf square.o
rm -f square.o
