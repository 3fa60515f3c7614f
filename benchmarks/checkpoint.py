#!/usr/bin/env python3
"""Checkpoint and restore cost for 256 MiB, 1 GiB and 4 GiB guests with a known amount of
touched memory; incremental checkpoint size against full.

    python benchmarks/checkpoint.py [--touched-mib 64] [--sizes-mib 256,1024,4096]
                                    [--reps 3] [--dir DIR]

The guest is the core tests' checkpoint guest (tests/guests/ckpt.S, real mode, the test
arch: no plugin needed), stopped mid-computation; ``--touched-mib`` MiB of its RAM are then
filled with random bytes (resident, non-zero pages: what a checkpoint must store), the rest
never touched. Columns (medians over ``--reps``):

* ``full ms`` / ``full MiB``: ``Machine.checkpoint`` (drain, capture, sparse RAM files,
  fsync, rename) and the space the directory takes on disk;
* ``restore ms``: ``Machine.restore`` with every checksum verified (RAM hashed where the
  files hold data) / with RAM trusted (``verify_ram=False``; sizes and the small files
  still checked);
* ``first entry ms``: from calling ``Machine.restore`` (RAM trusted) to the vCPU's first
  ``KVM_RUN`` (a ``pre_run`` hook): what a user waits before the guest runs again;
* ``incr ms`` / ``incr KiB``: an incremental checkpoint after the guest ran on and kvmfw
  wrote 1 MiB (``GuestMemory.write``): only the changed pages are stored;
* ``1st entry min``: the fastest restore to first entry of the reps. On a busy host the
  median carries the scheduler's delays (a restore is a few ms of work: one preemption
  doubles it); the minimum is the cost of the work itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import ckpt_arch as ca  # noqa: E402

from kvmfw import hookimpl  # noqa: E402
from kvmfw.eventq import TICKS_PER_MS  # noqa: E402
from kvmfw.machine import Machine  # noqa: E402

MiB = 1 << 20


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


class FirstEntry:
    """A hook object that notes the time of the first KVM_RUN and ends the run."""

    def __init__(self) -> None:
        self.at: float | None = None

    @hookimpl
    def pre_run(self, cpu: Any) -> None:
        if self.at is None:
            self.at = time.perf_counter()
            cpu.machine.request_exit(0, "first entry")


def one(size: int, touched: int, work: Path) -> dict[str, float]:
    rig = ca.build(memory=size)
    m = rig.machine
    out: dict[str, float] = {}
    try:
        while rig.ticker.count < 10:
            m.run(max_ticks=TICKS_PER_MS // 4, timeout=60)
        region = next(iter(m.memory))
        off = 16 * MiB
        block = os.urandom(MiB)
        for k in range(touched // MiB):
            region.view[off + k * MiB:off + (k + 1) * MiB] = block
        t0 = time.perf_counter()
        full = m.checkpoint(work / "full", incremental=True)
        out["full_ms"] = (time.perf_counter() - t0) * 1e3
        out["full_mib"] = disk_bytes(full) / MiB
        while rig.ticker.count < 20:
            m.run(max_ticks=TICKS_PER_MS // 4, timeout=60)
        m.memory.write(off + touched + MiB, os.urandom(MiB))
        t0 = time.perf_counter()
        inc = m.checkpoint(work / "inc", incremental=True)
        out["inc_ms"] = (time.perf_counter() - t0) * 1e3
        out["inc_kib"] = disk_bytes(inc) / 1024
    finally:
        m.close()
    for key, verify in (("restore_ms", True), ("trusted_ms", False)):
        t0 = time.perf_counter()
        r = ca.restore(full, verify_ram=verify)
        out[key] = (time.perf_counter() - t0) * 1e3
        r.machine.close()
    probe = FirstEntry()

    def setup(machine: Machine) -> None:
        ca.setup(machine)
        machine.pm.register(probe, name="bench:first-entry")
        for cpu in machine.cpus:
            cpu.bind_hooks()

    t0 = time.perf_counter()
    m2 = Machine.restore(full, arch_plugin=ca.CkptArch(), setup=setup, verify_ram=False)
    try:
        m2.run(timeout=60)
        assert probe.at is not None
        out["first_entry_ms"] = (probe.at - t0) * 1e3
    finally:
        m2.close()
    shutil.rmtree(work / "full")
    shutil.rmtree(work / "inc")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--touched-mib", type=int, default=64)
    ap.add_argument("--sizes-mib", default="256,1024,4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    sizes = [int(s) * MiB for s in args.sizes_mib.split(",")]
    touched = args.touched_mib * MiB
    cols = ("full_ms", "full_mib", "restore_ms", "trusted_ms", "first_entry_ms",
            "inc_ms", "inc_kib")
    head = ("RAM", "touched", "full ms", "full MiB", "restore ms", "trusted ms",
            "1st entry ms", "incr ms", "incr KiB", "1st entry min")
    print(" | ".join(f"{h:>12}" for h in head))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for size in sizes:
            runs = [one(size, touched, Path(tmp)) for _ in range(args.reps)]
            med = {c: statistics.median(r[c] for r in runs) for c in cols}
            row = [f"{size // MiB} MiB", f"{touched // MiB} MiB"] + [
                f"{med[c]:.1f}" for c in cols] + [
                f"{min(r['first_entry_ms'] for r in runs):.1f}"]
            print(" | ".join(f"{v:>12}" for v in row), flush=True)


if __name__ == "__main__":
    main()
