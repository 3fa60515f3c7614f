#!/usr/bin/env python3
"""Soak: many exits with 2 vCPUs in parallel mode; open fds, mappings, threads and RSS
must stay flat.

    python benchmarks/soak.py [--exits 1000000] [--runs 20]

Both vCPUs run tests/guests/realmode.bin's port-IO loop (``out %al,%dx`` per iteration,
effectively forever); a counting device ends each run after ``exits / runs`` writes, and
the next run continues the same guests on fresh vCPU threads (each run rebinds the run
timer, the kick slot and the cycle source). Resources are read after a short warm-up run
(imports and first-use allocations) and after the last run.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def _settle(limit: float = 2.0) -> None:
    """Let threads that were joined or cancelled (vCPU threads, the run's watchdog timer)
    finish leaving the kernel's task list, so the count is not a race."""
    end = time.monotonic() + limit
    last = -1
    while time.monotonic() < end:
        busy = any(t.name.startswith("vcpu") or isinstance(t, threading.Timer)
                   for t in threading.enumerate())
        n = len(os.listdir("/proc/self/task"))
        if not busy and n == last:
            return
        last = n
        time.sleep(0.01)


def resources() -> dict[str, int]:
    """Open fds, mappings, threads and resident KiB of this process."""
    _settle()
    status = Path("/proc/self/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines()
               if line.startswith("VmRSS"))
    return {"fds": len(os.listdir("/proc/self/fd")),
            "maps": len(Path("/proc/self/maps").read_text().splitlines()),
            "threads": len(os.listdir("/proc/self/task")),
            "rss_kib": rss}


class Counter:
    """Counts the guests' port writes; ends the run after ``limit`` of them."""

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self.limit = 0
        self.count = 0

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        self.count += 1  # (called under the machine lock from the vCPU threads)
        if self.count >= self.limit:
            self.machine.request_exit(0, "soak run done")


def soak(exits: int, runs: int, cpus: int = 2, warmup: int = 1000,
         on_run: Any = None) -> dict[str, Any]:
    """Run ``exits`` exits in ``runs`` runs; return resources before and after, and
    ``per_run`` (resources after each run) for flatness checks."""
    from realmode_arch import RealModeArch

    from kvmfw.device import Range
    from kvmfw.machine import Machine, MachineConfig

    pioloop = 8
    with Machine(MachineConfig(memory=0x10000, cpus=cpus),
                 arch_plugin=RealModeArch(pioloop)) as m:
        dev = Counter(m)
        m.map_device(Range("pio", 0x10, 4, "counter"), dev)
        for cpu in m.cpus:
            cpu.start_active = True
            cpu.get_context().regs["rcx"] = 0xFFFFFFFF  # loops far longer than any soak
            cpu.mark_context_dirty()
        dev.limit = warmup
        m.run(timeout=600)
        start = resources()
        first = sum(c.stats.vm_exits for c in m.cpus)
        per_run = []
        host = 0.0
        for i in range(runs):
            dev.limit = dev.count + exits // runs
            t0 = time.monotonic()
            result = m.run(timeout=3600)
            host += time.monotonic() - t0
            if result.reason != "soak run done":
                raise RuntimeError(f"run {i} ended early: {result.reason}")
            per_run.append(resources())
            if on_run is not None:
                on_run(i, per_run[-1])
        done = sum(c.stats.vm_exits for c in m.cpus) - first
        stats = [c.stats.as_dict() for c in m.cpus]
    return {"start": start, "end": per_run[-1], "per_run": per_run, "exits": done,
            "host_seconds": host, "cpu_stats": stats}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exits", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    if args.exits < args.runs or args.runs < 1 or args.cpus < 2:
        ap.error("need --runs >= 1, --exits >= --runs and --cpus >= 2 (parallel mode)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("soak needs a readable and writable /dev/kvm", file=sys.stderr)
        return 1

    def progress(i: int, res: dict[str, int]) -> None:
        print(f"  run {i + 1:3}/{args.runs}: " + " ".join(f"{k} {v}" for k, v in res.items()),
              flush=True)

    print(f"soak: {args.exits} exits, {args.cpus} vCPUs in parallel mode, {args.runs} runs")
    r = soak(args.exits, args.runs, args.cpus, on_run=progress)
    print(f"{r['exits']} exits in {r['host_seconds']:.1f} s "
          f"({r['host_seconds'] * 1e6 / max(r['exits'], 1):.1f} us per exit, both vCPUs)")
    print(f"{'':10}{'start':>10}{'end':>10}{'change':>10}")
    for k in r["start"]:
        a, b = r["start"][k], r["end"][k]
        print(f"{k:10}{a:10}{b:10}{b - a:+10}")
    sums = {k: sum(s[k] for s in r["cpu_stats"]) for k in ("vm_exits", "io", "exit_signal",
                                                          "timer_settime")}
    print("vCPU stats (both): " + " ".join(f"{k} {v}" for k, v in sums.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
