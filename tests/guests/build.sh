#!/bin/sh
# Rebuild the committed test-guest binaries from source (needs GNU as/ld: binutils).
set -eu
cd "$(dirname "$0")"
for src in *.S; do
    name=${src%.S}
    as --32 -o "$name.o" "$src"
    ld -m elf_i386 -Ttext=0xf000 --oformat binary -o "$name.bin" "$name.o"
    rm -f "$name.o"
done
