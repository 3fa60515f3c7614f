#!/usr/bin/env python3
"""Sweep throughput: variants per second and per-variant overhead of ``kvmfw sweep``
against running the same variants as sequential ``kvmfw run --restore`` processes.

    python benchmarks/sweep.py [--variants 32] [--workers N] [--dir DIR]

The guest is the sweep example (examples/sweep/square.elf), booted once to its checkpoint;
each variant restores it, reads its N, prints N*N, writes a file and exits. Columns:

* ``sequential``: one ``kvmfw run --restore CK --pseudo-op-dir D`` process per variant,
  one after the other (interpreter start, imports, restore, run, exit: what a shell loop
  around ``kvmfw run`` pays per variant);
* ``sweep``: the same variants through :func:`kvmfw.sweep.run` on a LocalCluster of
  ``--workers`` processes (default: cores), timed from the first submit to the last row
  (cluster start-up, paid once per sweep, is given apart);
* ``task ms``: a variant inside a worker (restore, run, collect), the rows' median
  ``host_seconds``; ``other ms``: what Dask dispatch and CPU contention add per variant
  (wall time times workers over variants, minus the task median).

On a busy or 2-core host the speed-up is bounded by cores: the gain per variant is the
process start-up a sweep pays once per worker instead of once per variant.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GUEST = ROOT / "examples" / "sweep" / "square.elf"


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "kvmfw.cli", *args], check=True,
                   capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", type=int, default=32)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dir", type=str, default=None)
    a = ap.parse_args()
    import kvmfw.sweep
    from kvmfw.sweep.runner import local_client

    work = Path(a.dir or tempfile.mkdtemp(prefix="kvmfw-sweep-bench-"))
    base = work / "base"
    cli("run", "--kernel", str(GUEST), "--memory", "16M", "--console", "none",
          "--checkpoint-dir", str(base), "--exit-after-checkpoint", "--no-summary")
    (ck,) = base.glob("cpt.*")
    ns = list(range(1, a.variants + 1))

    t0 = time.monotonic()
    for n in ns:
        d = work / "seq" / str(n)
        d.mkdir(parents=True, exist_ok=True)
        (d / "n").write_text(str(n))
        cli("run", "--restore", str(ck), "--pseudo-op-dir", str(d), "--console", "none",
              "--no-summary")
    seq = time.monotonic() - t0

    spec: dict[str, Any] = {"base": {"checkpoint": str(ck)}, "grid": {"param.n": ns},
                            "collect": {"console": {"sq": r"square=(\d+)"}}}
    t0 = time.monotonic()
    with local_client(a.workers) as c:
        c.wait_for_workers(a.workers)
        startup = time.monotonic() - t0
        first: list[float] = []
        t1 = time.monotonic()
        df = kvmfw.sweep.run(spec, out=work / "sweep", client=c, progress=False,
                             on_row=lambda r: first.append(time.monotonic()),
                             echo=lambda s: None)
        wall = time.monotonic() - t1
    assert (df["status"] == "ok").all(), df[df["status"] != "ok"]
    task = statistics.median(df["host_seconds"])
    n = len(ns)
    print(f"{n} variants, {a.workers} workers, {os.cpu_count()} cores")
    print(f"{'':12} {'variants/s':>11} {'ms/variant':>11}")
    print(f"{'sequential':12} {n / seq:11.2f} {1000 * seq / n:11.1f}")
    print(f"{'sweep':12} {n / wall:11.2f} {1000 * wall / n:11.1f}")
    print(f"task ms (restore+run+collect in a worker, median): {1000 * task:.1f}; "
          f"other ms per variant (Dask dispatch, CPU contention): "
          f"{1000 * (wall * a.workers / n - task):.1f}; "
          f"cluster start-up: {startup:.1f} s (once per sweep)")


if __name__ == "__main__":
    main()
