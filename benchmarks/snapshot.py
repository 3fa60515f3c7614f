#!/usr/bin/env python3
"""``Machine.reset_to`` per second for a guest that dirties 1, 16 and 256 pages per
iteration, and where the time of a reset goes.

    python benchmarks/snapshot.py [--iterations 2000] [--reps 3] [--memory-mib 1]

Each iteration is what a fuzzing harness does: run the guest (tests/guests/dirty.S, real
mode, through the core's test arch: no plugin needed) until it writes its exit port after
incrementing one byte in each of N pages, then ``reset_to`` the snapshot taken before its
first instruction. Columns (medians over ``--reps``):

* ``iter/s``: whole iterations (guest run + reset) per second;
* ``reset/s``: ``reset_to`` calls per second (the time inside ``reset_to`` only);
* the split of one reset in microseconds: ``settle`` (completing the pending port IO with
  a half entry), ``harvest`` (KVM_GET_DIRTY_LOG per slot, merged with kvmfw's own marks),
  ``copy`` (the dirtied pages back from the baseline), ``state`` (CPU, VM, device and time
  state through ``kvmfw.checkpoint.state.apply``).

Extra rows: the same 16-page guest with ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` (the log
read, then only the dirty pages re-protected with KVM_CLEAR_DIRTY_LOG), and in a 256 MiB
guest (reset cost must not grow with RAM size); and the time ``snapshot()`` takes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import snap_arch as sa  # noqa: E402

from kvmfw.eventq import TICKS_PER_SECOND  # noqa: E402

MiB = 1 << 20
BOUND = 30 * TICKS_PER_SECOND
"""A hung guest ends its run after 30 s of simulated (= host) time. Not ``timeout=``: that
starts a watchdog thread per run, which would cost more than the reset measured here."""


def one(pages: int, iterations: int, memory: int, manual: bool) -> dict[str, float]:
    m, _ = sa.make(pages, 0 if pages == 256 else 1, memory=memory)
    try:
        assert m.vm is not None
        m.vm.dirty_manual_protect = manual
        t0 = time.perf_counter()
        snap = m.snapshot()
        snap_ms = (time.perf_counter() - t0) * 1e3
        for _ in range(20):  # warm-up
            m.run(max_ticks=BOUND)
            m.reset_to(snap)
        for k in snap.timing:
            snap.timing[k] = 0.0
        t0 = time.perf_counter()
        for _ in range(iterations):
            m.run(max_ticks=BOUND)
            m.reset_to(snap)
        total = time.perf_counter() - t0
        if m.memory.dirty is not None:
            manual = m.memory.dirty.manual_protect
        reset = sum(snap.timing.values())
        out = {"iter/s": iterations / total, "reset/s": iterations / reset,
               "snapshot ms": snap_ms, "manual": float(manual)}
        for k in ("drain", "harvest", "copy", "state"):
            out[k] = snap.timing[k] / iterations * 1e6
        snap.close()
        return out
    finally:
        m.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--memory-mib", type=int, default=1, help="guest RAM of the main rows")
    a = ap.parse_args()
    if not 1 <= a.memory_mib <= 4096 or not 1 <= a.iterations <= 10**7 or a.reps < 1:
        ap.error("--memory-mib 1..4096, --iterations 1..10^7, --reps >= 1")
    rows = [(f"{p} page{'s' if p > 1 else ''}", p, a.memory_mib * MiB, False)
            for p in (1, 16, 256)]
    rows += [("16 pages, manual protect", 16, a.memory_mib * MiB, True),
             ("16 pages, 256 MiB RAM", 16, 256 * MiB, False)]
    cols = ["iter/s", "reset/s", "drain", "harvest", "copy", "state", "snapshot ms"]
    heads = ["iter/s", "reset/s", "settle us", "harvest us", "copy us", "state us",
             "snapshot ms"]
    print(f"{'guest dirties':<26}" + "".join(f"{h:>12}" for h in heads))
    for label, pages, mem, manual in rows:
        runs = [one(pages, a.iterations, mem, manual) for _ in range(a.reps)]
        med = {c: statistics.median(r[c] for r in runs) for c in cols}
        if manual and not runs[0]["manual"]:
            label += " (n/a: plain)"
        print(f"{label:<26}" + "".join(
            f"{med[c]:>12.0f}" if c in ("iter/s", "reset/s") else f"{med[c]:>12.1f}"
            for c in cols))
    print("(medians of", a.reps, "runs of", a.iterations, "iterations; guest RAM",
          f"{a.memory_mib} MiB unless stated)")


if __name__ == "__main__":
    main()
