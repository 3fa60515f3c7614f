#!/usr/bin/env python3
"""The emulated CPU (kvmfw.emu): emulated instructions per second with and without the
trace, and the cost of one KVM -> Unicorn -> KVM round trip, on real x86 guests.

    python benchmarks/handover.py [--insts 200000] [--trips 200]

- ``straight``: plugins/x86/tests/guests/insts64.elf, 4096 x ``inc %r12`` (long mode,
  paging on), emulated from the start again and again (pure instruction rate);
- ``io loop``: handover64.elf's checksum loop, one port read, one MMIO read and one MMIO
  write per 12 instructions (device dispatch included);
- ``round trip``: ``machine.emulate(1)`` (drain, mode check, map RAM/MMIO, load the
  context into Unicorn, one instruction, store it back) plus the push of the context into
  KVM that the next entry would do, per trip.
Needs /dev/kvm, the x86 plugin and the 'emu' extra (unicorn, capstone).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "plugins" / "x86" / "tests"))


def machine(guest: str):  # type: ignore[no-untyped-def]
    from conftest import GUESTS, make_machine
    from kvmfw_x86 import loaders

    from kvmfw.device import Range

    class Dev:
        def read(self, offset: int, size: int) -> bytes:
            return bytes(size)

        def write(self, offset: int, data: bytes) -> None:
            pass

    m, _ = make_machine()
    m.map_device(Range("pio", 0x100, 4, "dev"), Dev())
    m.map_device(Range("mmio", 0xD0001000, 0x10, "dev-mmio"), Dev())
    loaders.load(m, str(GUESTS / guest), {})
    return m


def rate(guest: str, insts: int, trace: bool, chunk: int) -> float:
    from kvmfw.emu import EmulatedCPU, Trace

    m = machine(guest)
    try:
        ctx = m.cpus[0].get_context()
        start = dict(rip=ctx.rip, rcx=ctx.rcx)
        emu = EmulatedCPU(m, trace=Trace(io.StringIO(), registers=False) if trace else None)
        emu.take_over_from(m.cpus[0])
        done = 0
        t0 = time.perf_counter()
        while done < insts:
            want = min(chunk, insts - done)
            n = emu.run(want)
            done += n
            if n < want:  # the guest ended (its exit port, or hlt): start it again
                if not n and not m.stop_requested:
                    raise SystemExit(f"the emulator made no progress: {emu.stop_reason}")
                emu.switch_out()
                m.stop_requested = False
                ctx.rip, ctx.rcx, ctx.r12 = start["rip"], start["rcx"], 0
                emu.take_over_from(m.cpus[0])
        dt = time.perf_counter() - t0
        emu.switch_out()
        return done / dt
    finally:
        m.close()


def round_trip(trips: int) -> float:
    m = machine("handover64.elf")
    try:
        cpu = m.cpus[0]
        m.emulate(1)  # warm: imports, first Unicorn
        cpu.sync_kvm_state()
        t0 = time.perf_counter()
        for _ in range(trips):
            m.emulate(1)
            cpu.sync_kvm_state()  # what the next KVM entry does with the stored context
        return (time.perf_counter() - t0) / trips
    finally:
        m.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--insts", type=int, default=200_000)
    ap.add_argument("--trips", type=int, default=200)
    a = ap.parse_args()
    for guest, label, chunk in (("insts64.elf", "straight", 4096),
                                ("handover64.elf", "io loop", 4096)):
        plain = rate(guest, a.insts, False, chunk)
        traced = rate(guest, a.insts, True, chunk)
        print(f"{label:<10} emulated: {plain:>10,.0f} inst/s  traced: {traced:>10,.0f} inst/s "
              f"({plain / traced:.1f}x slower)")
    rt = round_trip(a.trips)
    print(f"round trip KVM -> Unicorn -> KVM (1 instruction): {rt * 1e6:,.0f} us")


if __name__ == "__main__":
    main()
