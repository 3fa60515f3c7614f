#!/usr/bin/env python3
"""Loading an image into guest RAM: kvmfw's ``GuestMemory.load`` (``preadv`` from the file)
against the baseline, a copy through a read-only mapping of it (what the loaders did before).

    python benchmarks/image_load.py [--image FILE] [--reps 7]

The image defaults to the newest decompressed kernel in kvmfw's cache (``~/.cache/kvmfw/
vmlinux``; boot a bzImage once to make one), else give any file. Each repetition loads the
whole file into fresh anonymous guest RAM (huge-page advised, as a machine's) both ways,
alternating; printed: medians and the ratio. Timing only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import time

from kvmfw.imagefile import FileMapping, map_file
from kvmfw.memory import GuestMemory, MemoryRegion


def newest_cached_kernel() -> str | None:
    from kvmfw.cache import base_dir

    base = base_dir()
    found = glob.glob(os.path.join(base, "vmlinux", "vmlinux-*")) if base else []
    return max(found, key=os.path.getmtime) if found else None


def fresh_ram(size: int) -> GuestMemory:
    mem = GuestMemory()
    mem.add(MemoryRegion.anonymous(0, size))
    return mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", help="the file to load (default: the newest cached vmlinux)")
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    image = a.image or newest_cached_kernel()
    if image is None:
        raise SystemExit("image_load.py: no cached kernel; give --image FILE")
    size = os.path.getsize(image)
    ram = (size + (4 << 20)) & ~((2 << 20) - 1)
    copy, load = [], []
    for _ in range(a.reps):
        mem = fresh_ram(ram)
        t = time.perf_counter()
        m = map_file(image)
        view = memoryview(m)
        mem.write(0, view)
        view.release()
        if isinstance(m, FileMapping):
            m.close()
        copy.append(time.perf_counter() - t)
        mem.close()
        mem = fresh_ram(ram)
        t = time.perf_counter()
        m = map_file(image)
        if isinstance(m, FileMapping):
            mem.load(0, m.fd, 0, size)
            m.close()
        load.append(time.perf_counter() - t)
        mem.close()
    c, ld = statistics.median(copy), statistics.median(load)
    print(f"{image}: {size >> 20} MiB, medians of {a.reps}")
    print(f"  copy through a mapping (baseline)  {c * 1e3:8.2f} ms")
    print(f"  GuestMemory.load (preadv)          {ld * 1e3:8.2f} ms   {ld / c:.2f}x the baseline")


if __name__ == "__main__":
    main()
