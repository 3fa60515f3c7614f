"""MMIO-exit cost with kvmfw's per-group lazy sync vs gem5's all-or-nothing pull.

A CPL3 guest (native on kvm_pvm) loops on an MMIO write; the device reads RIP on every
exit, as an exit handler that reports the faulting PC would. ``lazy`` fetches only the
``regs`` group; ``eager`` (option ``x86_sync=eager``, gem5's behaviour) pulls every group
(regs, sregs, XSAVE, XCRs, all MSRs, debug regs, events). Prints µs/exit and the ratio.

    python plugins/x86/benchmarks/mmio_sync.py [exits]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from kvmfw.device import Range
from kvmfw.hookspecs import SyncLevel
from kvmfw.machine import Machine, MachineConfig

from kvmfw_x86 import loaders
from kvmfw_x86.context import Segment
from kvmfw_x86.plugin import X86Plugin

GUEST = Path(__file__).parents[1] / "tests" / "guests" / "user64.elf"


class Probe:
    def __init__(self, m: Machine, n: int) -> None:
        self.m, self.n, self.count = m, n, 0

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.count += 1
        assert self.m.cpus[0].get_context(SyncLevel.FULL).rip  # the handler needs RIP
        if self.count >= self.n:
            self.m.request_exit(0, "done")


def run(mode: str, n: int) -> float:
    from elftools.elf.elffile import ELFFile

    with open(GUEST, "rb") as f:
        symtab: Any = ELFFile(f).get_section_by_name(".symtab")
        done = symtab.get_symbol_by_name("done")[0]
    cfg = MachineConfig(arch="x86", memory=16 << 20, default_devices=False,
                        options={"irqchip": "userspace", "x86_sync": mode})
    with Machine(cfg, arch_plugin=X86Plugin(), arch_name="x86") as m:
        probe = Probe(m, n)
        m.map_device(Range("mmio", 0xD0000000, 0x10), probe)
        loaders.load(m, str(GUEST), {})
        ctx = m.cpus[0].get_context()
        ctx.cs = Segment(limit=0xFFFFFFFF, selector=0x2B, type=11, dpl=3, l=1, g=1)
        for s in ("ds", "es", "ss"):
            setattr(ctx, s, Segment(limit=0xFFFFFFFF, selector=0x33, type=3, dpl=3, db=1, g=1))
        ctx.rip = done["st_value"]
        ctx.r11 = 0xD0000008
        t = time.perf_counter()
        m.run(timeout=120)
        return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    run("lazy", 1000)  # warm-up
    lazy = min(run("lazy", n) for _ in range(3))
    eager = min(run("eager", n) for _ in range(3))
    print(f"MMIO exit, handler reads RIP: lazy per-group {lazy:.2f} us/exit, "
          f"gem5-style eager {eager:.2f} us/exit, eager/lazy = {eager / lazy:.1f}x")


if __name__ == "__main__":
    main()
