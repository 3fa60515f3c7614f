"""CPU hand-over on a real arm64 KVM (tox -e armv8-kvm): guests/handover.bin turns its MMU
on at EL1 and runs a checksum loop with MMIO in each iteration; switched KVM -> Unicorn ->
KVM at several points (MMU on), the result equals the all-KVM run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.arm64_kvm
pytest.importorskip("unicorn", reason="the emulated CPU needs the 'emu' extra (unicorn)")
pytest.importorskip("capstone", reason="the trace needs the 'emu' extra (capstone)")

GUEST = Path(__file__).parent / "guests" / "handover.bin"
DEV = 0x0A000000
TICK_MS = 1_000_000_000


class Device:
    """+0: a sequence (each read the next value); +4: a word the guest reads (times 3) and
    writes; +8, +16: the results (the write to +16 ends the run)."""

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self.n = 0
        self.word = 0
        self.out: dict[int, int] = {}

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0:
            self.n += 1
            v = self.n * 7
        else:
            v = (self.word * 3) & 0xFFFFFFFF
        return v.to_bytes(8, "little")[:size]

    def write(self, offset: int, data: bytes) -> None:
        v = int.from_bytes(data, "little")
        if offset == 4:
            self.word = v
        else:
            self.out[offset] = v
            if offset == 16:
                self.machine.request_exit(0, "handover guest done")


def build() -> tuple[Any, Device]:
    from kvmfw_armv8 import plugin

    from kvmfw.device import Range
    from kvmfw.machine import Machine, MachineConfig

    cfg = MachineConfig(arch="armv8", memory=64 << 20, cpus=1, default_devices=False,
                        use_perf=False)
    m = Machine(cfg, arch_plugin=plugin, arch_name="armv8")
    dev = Device(m)
    m.map_device(Range("mmio", DEV, 0x1000, "handover-dev"), dev)
    m.hooks.call("load_guest", machine=m, image=str(GUEST), options={})
    return m, dev


def run(slices: list[tuple[int, int]]) -> tuple[dict[int, int], list[int]]:
    from kvmfw.emu import Trace

    m, dev = build()
    lines: list[str] = []
    try:
        for ticks, insts in slices:
            if ticks:
                m.run(max_ticks=ticks, timeout=300)
                if m.exit_reason == "handover guest done":
                    break
            m.emulate(insts, trace=Trace(callback=lambda r: lines.append(str(r))))
            ctx = m.cpus[0].get_context()
            if insts > 25:  # past the prologue: the MMU is on
                assert ctx.sysregs.by_name("SCTLR_EL1") & 1
        r = m.run(timeout=300)
        assert r.reason == "handover guest done", r
        assert all("0x" in line for line in lines)
        return dev.out, [len(lines)]
    finally:
        m.close()


def test_arm64_handover_kvm_unicorn_kvm_equals_all_kvm() -> None:
    ref, _ = run([])
    assert ref[16] == 300
    out, n = run([(0, 30), (TICK_MS, 200), (TICK_MS // 2, 1), (TICK_MS, 500)])
    assert out == ref and n[0] > 0
