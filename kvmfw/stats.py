"""Statistics: counters grouped by owner, dumped as text or JSON, and reset.

The vCPU counters are gem5's KVM set (exits, half entries, exits by signal, MMIO, coalesced
MMIO, IO, halts, interrupts, hypercalls) plus cycles, instructions (when a counter can
measure them), simulated and host seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class KvmCpuStats:
    """Counters of one vCPU; plain attributes so the run loop pays one add per event."""

    __slots__ = ("vm_exits", "vm_half_entries", "exit_signal", "mmio", "coalesced_mmio", "io",
                 "halt", "interrupts", "hypercalls", "system_events", "cycles", "instructions",
                 "host_ns_in_kvm", "ticks_in_kvm", "syncs_to_kvm", "syncs_from_kvm",
                 "sync_ioctls_to_kvm", "sync_ioctls_from_kvm", "mmio_pending",
                 "timer_settime", "fast_exits")

    DESCRIPTIONS = {
        "vm_exits": "exits from KVM_RUN",
        "vm_half_entries": "entries that only completed a pending IO/MMIO",
        "exit_signal": "exits caused by a kick or the run timer (KVM_EXIT_INTR)",
        "mmio": "MMIO exits",
        "coalesced_mmio": "coalesced MMIO writes replayed",
        "io": "port IO exits",
        "halt": "HLT exits",
        "interrupts": "interrupts injected from userspace",
        "hypercalls": "hypercall exits",
        "system_events": "system events (shutdown, reset, crash)",
        "cycles": "host cycles spent in KVM_RUN (per the cycle source)",
        "instructions": "guest instructions (0 without a working perf counter)",
        "host_ns_in_kvm": "host nanoseconds inside KVM_RUN",
        "ticks_in_kvm": "simulated ticks accounted to KVM_RUN",
        "syncs_to_kvm": "thread-context pushes that wrote to KVM (update_kvm_state)",
        "syncs_from_kvm": "thread-context pulls that read from KVM (update_thread_context)",
        "sync_ioctls_to_kvm": "KVM ioctls issued by pushes (as the arch reports them)",
        "sync_ioctls_from_kvm": "KVM ioctls issued by pulls (as the arch reports them)",
        "mmio_pending": "MMIO accesses a device completed later (RunningMMIOPending)",
        "timer_settime": "run-timer timer_settime calls (arm or disarm)",
        "fast_exits": "exits answered by the compiled path without Python (kvmfw.fastpath)",
    }

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.vm_exits = 0
        self.vm_half_entries = 0
        self.exit_signal = 0
        self.mmio = 0
        self.coalesced_mmio = 0
        self.io = 0
        self.halt = 0
        self.interrupts = 0
        self.hypercalls = 0
        self.system_events = 0
        self.cycles = 0
        self.instructions = 0
        self.host_ns_in_kvm = 0
        self.ticks_in_kvm = 0
        self.syncs_to_kvm = 0
        self.syncs_from_kvm = 0
        self.sync_ioctls_to_kvm = 0
        self.sync_ioctls_from_kvm = 0
        self.mmio_pending = 0
        self.timer_settime = 0
        self.fast_exits = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class StatsRegistry:
    """Named groups of statistics, each read through a callable returning a dict."""

    def __init__(self) -> None:
        self._groups: dict[str, tuple[Callable[[], dict[str, Any]], Callable[[], None] | None]] = {}
        self.dumps = 0

    def add(self, name: str, read: Callable[[], dict[str, Any]],
            reset: Callable[[], None] | None = None) -> None:
        self._groups[name] = (read, reset)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: dict(read()) for name, (read, _) in self._groups.items()}

    def reset(self) -> None:
        for _, reset in self._groups.values():
            if reset is not None:
                reset()

    def dump(self, fmt: str = "text") -> str:
        """All groups as ``text`` (gem5-style ``group.name value``) or ``json``."""
        self.dumps += 1
        return self.format(self.snapshot(), fmt)

    @staticmethod
    def format(snap: dict[str, dict[str, Any]], fmt: str = "text") -> str:
        """One snapshot as text or JSON."""
        if fmt == "json":
            import json  # here: only a JSON dump needs it (a run imports it no more)

            return json.dumps(snap, indent=2, sort_keys=True)
        lines = ["---------- Begin Simulation Statistics ----------"]
        for group, values in snap.items():
            for key, value in values.items():
                v = f"{value:.6f}" if isinstance(value, float) else str(value)
                lines.append(f"{group}.{key:<32} {v}")
        lines.append("---------- End Simulation Statistics   ----------")
        return "\n".join(lines) + "\n"
