"""Test helpers: whether this host has a real arm64 ``/dev/kvm`` (KVM tests skip otherwise)."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from typing import Any

ENV_HINT = "run plugins/armv8/env/run-arm64-kvm.sh to run them in an emulated arm64 host"


def arm64_kvm_unavailable_reason() -> str | None:
    """None if this host has a usable arm64 ``/dev/kvm``, else a one-line reason."""
    machine = platform.machine()
    if machine not in ("aarch64", "arm64"):
        return f"needs an arm64 /dev/kvm, this host is {machine} ({ENV_HINT})"
    if not os.path.exists("/dev/kvm"):
        return f"no /dev/kvm on this arm64 host ({ENV_HINT})"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


class TestDevice:
    """The MMIO device the test guest reports to (offsets documented in testguest.S)."""

    def __init__(self, machine: Any, on_ready: Callable[[], None] | None = None,
                 host_value: int = 0x1234) -> None:
        self.machine = machine
        self.on_ready = on_ready
        self.on_irq: Callable[[int], None] | None = None
        """Called with the INTID the guest's handler reports (before its EOI)."""
        self.host_value = host_value
        self.writes: list[tuple[int, int]] = []
        self.results: list[int] = []
        self.irqs: list[int] = []

    def value(self, offset: int) -> int | None:
        """The last value written at ``offset``."""
        for off, val in reversed(self.writes):
            if off == offset:
                return val
        return None

    def read(self, offset: int, size: int) -> bytes:
        val = self.host_value if offset == 0x10 else 0
        return val.to_bytes(8, "little")[:size]

    def write(self, offset: int, data: bytes) -> None:
        val = int.from_bytes(data, "little")
        self.writes.append((offset, val))
        if offset == 0x00:
            self.results.append(val)
        elif offset in (0x08, 0x110):
            self.machine.request_exit(0, "test guest done")
        elif offset == 0x18 and self.on_ready is not None:
            self.on_ready()
        elif offset == 0x20:
            self.irqs.append(val)
            if self.on_irq is not None:
                self.on_irq(val)
        elif offset == 0x50:
            self.machine.request_exit(99, f"unexpected guest exception, ESR {val:#x}")
