#!/bin/sh
# Rebuild the example guests from source (GNU as and ld, from binutils) and the disk the
# virtio-blk example reads. The built files are committed, so running them needs neither.
set -eu
cd "$(dirname "$0")"
for g in hello debug-exit pseudo-ops virtio-blk smp; do
    as --32 -o "$g.o" "$g.S"
    ld -m elf_i386 -T guest.ld -nostdlib --build-id=none -o "$g.elf" "$g.o"
    rm -f "$g.o"
done
as --32 -o hello16.o hello16.S
ld -m elf_i386 -Ttext=0x7c00 --oformat binary -o hello16.bin hello16.o
rm -f hello16.o
# disk.img: one 4 KiB raw disk; sector 0 holds a NUL-terminated greeting
python3 - <<'PY'
text = b"Hello from sector 0 of disk.img!\n\0"
open("disk.img", "wb").write(text.ljust(4096, b"\0"))
PY
