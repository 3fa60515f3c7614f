#!/usr/bin/env python3
"""A/B of run-loop versions, for a change to the exit path (the hot path).

    python benchmarks/loop_ab.py [--exits 20000] [--reps 25] [--kinds mmio,pio]
                                 [--stub] [NAME=path/to/other/kvmfw/cpu.py ...]

Runs ``KvmCPU._loop`` of this checkout and of each other ``cpu.py`` given (e.g. a worktree
of the previous commit: ``git worktree add /tmp/base HEAD~1``) in this one process,
interleaved, on the exit_throughput guest (no-op device; port IO with ``direct_port_io``,
the x86 plugin's path). The other loops are compiled against this checkout's module, so
they must use only names it still defines (handlers, constants).

Printed per kind: each loop's per-exit time against the raw Python loop measured in the
same rep, as the ratio of the fastest reps and the median of the per-rep ratios (lower is
better). Small differences need many reps: on a shared host the median moves by about
±0.03 between invocations, and the loop measured first after the raw loop can differ
from the same loop measured last by as much.

``--stub``: the Python cost alone. KVM_RUN is replaced by a counting stub after a few
real exits, so the run page keeps the last real exit and every "exit" is serviced again;
printed: ns per exit net of the stub loop, with warm caches (in a real run each exit
costs about 3x this, as KVM leaves the caches cold). Timing only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import exit_throughput as et  # noqa: E402

import kvmfw.cpu as cpumod  # noqa: E402


def other_loop(name: str, path: str) -> Callable[..., Any]:
    """``KvmCPU._loop`` of another cpu.py, bound to this checkout's module globals."""
    spec = importlib.util.spec_from_file_location(f"_loop_ab_{name}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"loop_ab: cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    f = mod.KvmCPU._loop
    return types.FunctionType(f.__code__, cpumod.__dict__, f.__name__, f.__defaults__,
                              f.__closure__)


def in_situ(loops: dict[str, Callable[..., Any]], kind: str, n: int, reps: int) -> str:
    raw: list[float] = []
    got: dict[str, list[float]] = {k: [] for k in loops}
    for _ in range(reps):
        raw.append(et.python_loop(kind, n))
        for name, fn in loops.items():
            cpumod.KvmCPU._loop = fn  # type: ignore[method-assign]
            got[name].append(et.kvmfw_loop(kind, n, direct=kind == "pio"))
    return "  ".join(
        f"{name} {min(v) / min(raw):.3f} "
        f"(median {statistics.median(b / a for a, b in zip(raw, v, strict=True)):.3f})"
        for name, v in got.items())


def counting_stub(m: Any, left: list[int], real: Callable[[Any], int] | None) -> Callable[..., int]:
    """KVM_RUN's stand-in: counts down ``left[0]`` entries, then stops the machine; calls
    ``real`` (the C entry) if given."""
    def stub(ctx: Any) -> int:
        left[0] -= 1
        if left[0] == 0:
            m.stop_requested = True
        return real(ctx) if real is not None else 0
    return stub


def stubbed(loops: dict[str, Callable[..., Any]], kind: str, n: int, reps: int) -> str:
    from realmode_arch import RealModeArch

    from kvmfw.device import Range
    from kvmfw.machine import Machine, MachineConfig

    real = cpumod._run_ctx
    out = []
    for name, fn in loops.items():
        cpumod.KvmCPU._loop = fn  # type: ignore[method-assign]
        arch = RealModeArch(et.PROGRAM[kind], direct_port_io=kind == "pio")
        with Machine(MachineConfig(memory=0x10000), arch_plugin=arch) as m:
            dev = et.NoOp(m)
            m.map_device(Range("pio", 0x10, 4, "noop"), dev)
            m.map_device(Range("mmio", 0x20000, 0x100, "noop-mmio"), dev)
            m.cpus[0].get_context().regs["rcx"] = 10**6
            m.cpus[0].mark_context_dirty()
            left = [5]
            stub = counting_stub(m, left, None)
            try:
                cpumod._run_ctx = counting_stub(m, left, real)  # a few real exits first
                m.run()
                cpumod._run_ctx = stub
                ctx = m.cpus[0]._ctx
                loop_ns, base_ns = [], []
                for _ in range(reps):
                    left[0], m.stop_requested = n, False
                    t0 = time.perf_counter_ns()
                    while not m.stop_requested:
                        stub(ctx)
                    base_ns.append((time.perf_counter_ns() - t0) / n)
                    left[0], m.stop_requested = n, False
                    t0 = time.perf_counter_ns()
                    m.run()
                    loop_ns.append((time.perf_counter_ns() - t0) / n)
            finally:
                cpumod._run_ctx = real
        out.append(f"{name} {min(loop_ns) - min(base_ns):.0f} ns")
    return "  ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exits", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--kinds", default="mmio,pio")
    ap.add_argument("--stub", action="store_true", help="Python cost alone (KVM_RUN stubbed)")
    ap.add_argument("others", nargs="*", help="NAME=path/to/kvmfw/cpu.py")
    args = ap.parse_args()
    loops: dict[str, Callable[..., Any]] = {"this": cpumod.KvmCPU._loop}
    for spec in args.others:
        name, _, path = spec.partition("=")
        loops[name] = other_loop(name, path)
    for kind in args.kinds.split(","):
        if args.stub:
            print(f"{kind}: Python cost per exit, KVM_RUN stubbed: "
                  f"{stubbed(loops, kind, args.exits * 10, 11)}", flush=True)
        else:
            print(f"{kind}: per exit / the raw Python loop's: "
                  f"{in_situ(loops, kind, args.exits, args.reps)}", flush=True)


if __name__ == "__main__":
    main()
