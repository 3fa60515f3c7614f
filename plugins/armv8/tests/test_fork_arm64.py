"""Machine.fork on a real arm64 KVM (run by plugins/armv8/env/run-arm64-kvm.sh): the test
guest's ``ckpt`` program is forked at its pause, with an SPI pending (line held high) and
the virtual timer armed behind masked IRQs. The child rebuilds the board on its own VM
(the ``fork_child`` hook: a new vGIC, initialised again; the secondaries waiting for
CPU_ON listed once); parent and child each unmask, take both interrupts and finish. A
fork after PSCI CPU_ON brought a secondary up leaves it running in the child, not waiting
for a CPU_ON again. The last test is plain logic and runs on any host."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_kvm_arm64 import run, start_at
from test_state_arm64 import needs_gicv3


def _fork_and_wait(m: Any, in_child: Callable[[], dict[str, Any]],
                   tmp_path: Path) -> dict[str, Any]:
    """Fork ``m``; the child runs ``in_child`` and leaves its result in a file, never
    returning into pytest; the parent waits for it and returns that result."""
    out = tmp_path / "child.json"
    pid = m.fork()
    if pid == 0:
        status = 99
        try:
            out.write_text(json.dumps(in_child()))
            status = 0
        finally:
            os._exit(status)
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0, "the child failed (its stderr says why)"
    return dict(json.loads(out.read_text()))


@pytest.mark.arm64_kvm
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
    def in_child() -> dict[str, Any]:
        b = board_of(m)
        out: dict[str, Any] = {
            "vgic": b.vgic is not None and b.vgic_ready
            and b.vgic in (m.vm.devices if m.vm else []),
            "waiting": [c.id for c in b.waiting]}
        r = run(m, dev, timeout=120)
        out.update(reason=r.reason, irqs=sorted(dev.irqs), line=line.level)
        return out

    child = _fork_and_wait(m, in_child, tmp_path)
    res = run(m, dev, timeout=120)
    assert res.reason == "test guest done"
    assert sorted(dev.irqs) == [27, 32 + guests.TEST_SPI] and line.level == 0
    assert child == {"vgic": True, "waiting": waiting0, "reason": "test guest done",
                     "irqs": [27, 32 + guests.TEST_SPI], "line": 0}


@pytest.mark.arm64_kvm
def test_fork_after_cpu_on_keeps_the_secondary_running_in_the_child(
        build: Any, tmp_path: Path) -> None:
    """Paused once the secondary reports (it is running, spinning until the primary's
    go-ahead): in the child it is not waiting for a CPU_ON (``vcpu_init`` powered it off
    again; the restored MP state runs it), and both processes end at its SYSTEM_OFF."""
    from kvmfw_armv8.plugin import board_of

    m, dev = build(cpus=2)
    write = dev.write

    def pause_at_the_report(offset: int, data: bytes) -> None:
        write(offset, data)
        if offset == 0x40:
            m.request_exit(0, "secondary reported")

    dev.write = pause_at_the_report  # type: ignore[method-assign]
    start_at(m, "psci")
    res = run(m, dev)
    assert res.reason == "secondary reported" and board_of(m).waiting == []
    def in_child() -> dict[str, Any]:
        out: dict[str, Any] = {"waiting": [c.id for c in board_of(m).waiting]}
        r = run(m, dev, timeout=120)
        out.update(reason=r.reason, psci=dev.value(0x30), ctx=dev.value(0x48))
        return out

    child = _fork_and_wait(m, in_child, tmp_path)
    res = run(m, dev, timeout=120)
    assert "powered off" in res.reason and dev.value(0x30) == 0
    assert child["waiting"] == [] and "powered off" in child["reason"], child
    assert (child["psci"], child["ctx"]) == (0, 0xBEEF)


def test_fork_child_hook_resets_the_board_and_keeps_the_waiting_list() -> None:
    """``fork_child`` then the set-up hooks as the child runs them (``vcpu_init`` lists
    every secondary again): the vGIC is forgotten for a new ``CTRL_INIT``, and the waiting
    list is the fork's, each vCPU once. Stand-ins, as in test_bring_up.py."""
    from kvmfw_armv8 import plugin
    from test_bring_up import FakeMachine

    m = FakeMachine(cpus=4)
    b = plugin.board_of(m)  # type: ignore[arg-type]
    b.waiting.remove(m.cpus[2])  # brought up by CPU_ON before the fork
    b.vgic, b.vgic_ready = object(), True  # type: ignore[assignment]
    closed: list[int] = []
    b.inst_stops = {0: type("Stop", (), {"close": lambda self: closed.append(0)})()}
    plugin.fork_child(m)  # type: ignore[arg-type]
    assert (b.vgic, b.vgic_ready, b.cpus, b.inst_stops, closed) == (None, False, {}, {}, [0])
    b.waiting.extend(m.cpus[1:])  # what vcpu_init does for each secondary
    plugin.machine_created(m)  # type: ignore[arg-type]
    assert b.waiting == [m.cpus[1], m.cpus[3]] and b.forked_waiting is None
