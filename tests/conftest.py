"""Shared fixtures: real machines on /dev/kvm running the real-mode test guest."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from kvmtest import Recorder  # noqa: E402
from realmode_arch import RealModeArch  # noqa: E402

from kvmfw.device import Range  # noqa: E402
from kvmfw.machine import Machine, MachineConfig  # noqa: E402


@pytest.fixture
def make_machine() -> Iterator[Callable[..., tuple[Machine, RealModeArch, Recorder]]]:
    made: list[Machine] = []

    def make(program: int, **cfg: Any) -> tuple[Machine, RealModeArch, Recorder]:
        arch = RealModeArch(program)
        cfg.setdefault("memory", 0x10000)
        m = Machine(MachineConfig(**cfg), arch_plugin=arch)
        made.append(m)
        rec = Recorder(m)
        m.map_device(Range("pio", 0x10, 4, "recorder"), rec)
        m.map_device(Range("mmio", 0x20000, 0x100, "recorder-mmio"), rec)
        return m, arch, rec

    yield make
    for m in made:
        m.close()
