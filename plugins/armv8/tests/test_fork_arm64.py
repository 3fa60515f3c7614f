"""Machine.fork on a real arm64 KVM (run by plugins/armv8/env/run-arm64-kvm.sh): the test
guest's ``ckpt`` program is forked at its pause, with an SPI pending (line held high) and
the virtual timer armed behind masked IRQs. The child rebuilds the board on its own VM
(the ``fork_child`` hook: a new vGIC, initialised again; the secondaries waiting for
CPU_ON listed once); parent and child each unmask, take both interrupts and finish."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from test_kvm_arm64 import run, start_at
from test_state_arm64 import needs_gicv3

pytestmark = pytest.mark.arm64_kvm


@pytest.mark.parametrize("cpus", [1, 2])
def test_fork_at_a_pause_parent_and_child_take_the_spi_and_the_timer(
        build: Any, tmp_path: Path, cpus: int) -> None:
    needs_gicv3()
    from kvmfw_armv8 import guests
    from kvmfw_armv8.plugin import board_of

    m, dev = build(cpus=cpus)
    line = m.irq(guests.TEST_SPI)
    dev.on_ready = line.raise_
    dev.on_irq = lambda intid: line.lower() if intid == 32 + guests.TEST_SPI else None
    start_at(m, "ckpt")
    res = run(m, dev)
    assert res.reason == "test guest paused" and dev.irqs == []
    b = board_of(m)
    waiting0 = [c.id for c in b.waiting]
    assert waiting0 == list(range(1, cpus))
    pid = m.fork()
    if pid == 0:
        status = 99
        try:
            b = board_of(m)
            out: dict[str, Any] = {
                "vgic": b.vgic is not None and b.vgic_ready
                and b.vgic in (m.vm.devices if m.vm else []),
                "waiting": [c.id for c in b.waiting]}
            r = run(m, dev, timeout=120)
            out.update(reason=r.reason, irqs=sorted(dev.irqs), line=line.level)
            (tmp_path / "child.json").write_text(json.dumps(out))
            status = 0
        finally:
            os._exit(status)
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0, "the child failed (its stderr says why)"
    res = run(m, dev, timeout=120)
    assert res.reason == "test guest done"
    assert sorted(dev.irqs) == [27, 32 + guests.TEST_SPI] and line.level == 0
    child = json.loads((tmp_path / "child.json").read_text())
    assert child == {"vgic": True, "waiting": waiting0, "reason": "test guest done",
                     "irqs": [27, 32 + guests.TEST_SPI], "line": 0}
