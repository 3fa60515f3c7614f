#!/usr/bin/env python3
"""Loading a vmlinux's segments into guest RAM with and without its zero tails trimmed
(:func:`kvmfw_x86.vmlinux.trim_zero_tails`): the file bytes copied, then the rest of each
segment zeroed (:meth:`kvmfw.memory.GuestMemory.zero`, which discards whole pages of
anonymous RAM) against the file images copied whole and the rest written with zeros (what
the loader did before).

    python benchmarks/bss.py [--image VMLINUX] [--reps 7]

The image defaults to the newest decompressed kernel in kvmfw's cache (an untrimmed
``vmlinux-1-*`` entry is preferred; a trimmed one is measured as it is). Each repetition
loads into fresh anonymous RAM (huge-page advised, as a machine's) and into RAM written
all over first (a machine reused: every page present), alternating. Printed: medians, and
the bytes the trim leaves out. Timing only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import tempfile
import time
from typing import Any

from kvmfw_x86 import loaders, vmlinux

from kvmfw.imagefile import FileMapping, copy_into, map_file
from kvmfw.memory import GuestMemory, MemoryRegion


def default_image() -> str | None:
    from kvmfw.cache import base_dir

    base = base_dir()
    for pattern in ("vmlinux-1-*", "vmlinux-*"):
        found = glob.glob(os.path.join(base, "vmlinux", pattern)) if base else []
        if found:
            return max(found, key=os.path.getmtime)
    return None


_ZEROS = bytes(1 << 20)


def ram(size: int, dirty: bool) -> GuestMemory:
    mem = GuestMemory()
    r = MemoryRegion.anonymous(0, size)
    mem.add(r)
    if dirty:
        r.view[:] = b"\xa5" * size  # (one host buffer, here only)
    return mem


def load(mem: GuestMemory, image: Any, segs: list[Any], trimmed: bool) -> tuple[float, float]:
    """Seconds copying and zeroing ``segs`` of ``image`` into ``mem``."""
    copy = zero = 0.0
    for s in segs:
        t = time.perf_counter()
        copy_into(mem, s.paddr, image, s.offset, s.filesz)
        t1 = time.perf_counter()
        if trimmed:
            mem.zero(s.paddr + s.filesz, s.memsz - s.filesz)
        else:  # the loader before: zeros written through a view
            size = s.memsz - s.filesz
            view = mem.view(s.paddr + s.filesz, size)
            for i in range(0, size, len(_ZEROS)):
                n = min(len(_ZEROS), size - i)
                view[i:i + n] = _ZEROS[:n]
        zero += time.perf_counter() - t1
        copy += t1 - t
    return copy, zero


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", help="a vmlinux ELF (default: the newest cached one)")
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    path = a.image or default_image()
    if path is None:
        raise SystemExit("bss.py: no cached kernel; give --image VMLINUX")
    with open(path, "rb") as f:
        data = f.read()
    trimmed = vmlinux.trim_zero_tails(data)
    _, _, before = loaders.parse_elf(data)
    _, _, after = loaders.parse_elf(trimmed)
    fd, trimmed_path = tempfile.mkstemp(suffix=".elf")
    with os.fdopen(fd, "wb") as f:
        f.write(trimmed)
    try:
        size = (max(s.paddr + s.memsz for s in before) + (4 << 20)) & ~((2 << 20) - 1)
        results: dict[tuple[str, bool], list[tuple[float, float]]] = {}
        for _ in range(a.reps):
            for dirty in (False, True):
                for name, file, segs, trim in (("whole file images + zeros written", path,
                                                before, False),
                                               ("zero tails trimmed + GuestMemory.zero",
                                                trimmed_path, after, True)):
                    mem = ram(size, dirty)
                    image = map_file(file)
                    try:
                        results.setdefault((name, dirty), []).append(
                            load(mem, image, segs, trim))
                    finally:
                        if isinstance(image, FileMapping):
                            image.close()
                        mem.close()
    finally:
        os.unlink(trimmed_path)
    fb, fa = sum(s.filesz for s in before), sum(s.filesz for s in after)
    print(f"{path}: {len(before)} segments, file bytes loaded {fb:,} -> {fa:,} "
          f"({fb - fa:,} trimmed); medians of {a.reps}")
    for (name, dirty), runs in results.items():
        c = statistics.median(r[0] for r in runs)
        z = statistics.median(r[1] for r in runs)
        print(f"  {'dirty RAM' if dirty else 'fresh RAM'}  {name:40} copy {c * 1e3:7.2f} ms  "
              f"zero {z * 1e3:7.2f} ms  total {(c + z) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
