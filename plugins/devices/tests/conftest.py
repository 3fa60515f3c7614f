"""Test fixtures: a DeviceContext with recording IRQ lines, real guest RAM and a recorded exit."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import pytest
from kvmfw.device import DeviceContext
from kvmfw.eventq import EventQueue
from kvmfw.memory import GuestMemory, MemoryRegion
from kvmfw.testing import RecordingIrq

RAM_SIZE = 1 << 20


@dataclass
class Harness:
    ctx: DeviceContext
    irqs: dict[int, RecordingIrq]
    exits: list[tuple[int, str]]
    output: io.BytesIO
    services_called: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    def irq(self, n: int) -> RecordingIrq:
        return self.irqs.setdefault(n, RecordingIrq())


def make_harness(**options: Any) -> Harness:
    irqs: dict[int, RecordingIrq] = {}
    exits: list[tuple[int, str]] = []
    mem = GuestMemory()
    mem.add(MemoryRegion.anonymous(0, RAM_SIZE))
    out = io.BytesIO()
    calls: list[tuple[str, tuple[Any, ...]]] = []

    def service(name: str) -> Any:
        def call(*args: Any) -> Any:
            calls.append((name, args))
            return None
        return call

    ctx = DeviceContext(
        eventq=EventQueue(),
        irq=lambda n: irqs.setdefault(n, RecordingIrq()),
        memory=mem,
        request_exit=lambda status, reason: exits.append((status, reason)),
        console_output=out,
        options={"memory": RAM_SIZE, "cpus": 2, **options},
        services={n: service(n) for n in ("dump_stats", "reset_stats", "checkpoint",
                                            "work_begin", "work_end")},
    )
    return Harness(ctx, irqs, exits, out, calls)


@pytest.fixture
def h() -> Harness:
    harness = make_harness()
    yield harness
    harness.ctx.memory.close()


class RecordingRing:
    """The machine's coalesced-ring services for a device under test, recorded: zones
    opened and closed (each must be ``zone``: addr, size, pio) and replays."""

    def __init__(self, h: Harness, zone: tuple[int, int, bool], ok: bool = True) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.zone = zone
        self.ok = ok
        h.ctx.services["coalesced"] = self.coalesced
        h.ctx.services["replay_coalesced"] = lambda: self.calls.append(("replay", True))

    def coalesced(self, addr: int, size: int, pio: bool = False,
                  deassign: bool = False) -> bool:
        assert (addr, size, pio) == self.zone
        self.calls.append(("close" if deassign else "open", self.ok))
        return self.ok
