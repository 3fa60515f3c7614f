"""``exit-counter``: a hook plugin that observes every VM exit.

It implements the documented observer hooks a plugin outside the arch may implement
(``post_run``: after every ``KVM_RUN``; ``dump_state``: a section of the error report),
counts exits by reason and shows them in the statistics (``system.exit-counter_N.HLT``).
It maps nothing on the bus. ``--device exit-counter``.
"""

from __future__ import annotations

from typing import Any

from kvmfw import hookimpl
from kvmfw.abi.constants import ExitReason
from kvmfw.device import Device, DeviceContext

_NAMES = {int(r): r.name for r in ExitReason}


class ExitCounter(Device):
    name = "exit-counter"

    def __init__(self, ctx: DeviceContext, **params: Any) -> None:
        super().__init__(ctx, **params)
        self.by_reason: dict[int, int] = {}

    @hookimpl
    def post_run(self, cpu: Any, exit_reason: int) -> None:
        # on every exit: keep it to a dict update (it runs on the vCPU thread)
        self.by_reason[exit_reason] = self.by_reason.get(exit_reason, 0) + 1
        name = _NAMES.get(exit_reason, f"reason{exit_reason}")
        self.stats[name] = self.stats.get(name, 0) + 1

    @hookimpl
    def dump_state(self, cpu: Any) -> str | None:
        counts = ", ".join(f"{_NAMES.get(r, r)}={n}" for r, n in sorted(self.by_reason.items()))
        return f"exit-counter: {counts or 'no exits'}"

    def reset(self) -> None:
        self.by_reason.clear()
