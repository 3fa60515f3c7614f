"""SMP checkpoint: a 2-vCPU machine checkpointed while its APs still wait for INIT/SIPI
(MP state UNINITIALIZED with the in-kernel irqchip; never started, with the userspace one)
is restored into a new machine, whose boot CPU then starts the APs through the
restored local APICs and finishes as an uninterrupted run does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import GUESTS, Reporter, make_machine, requires_kvm
from kvmfw.device import Range
from kvmfw.machine import Machine

from kvmfw_x86 import loaders
from kvmfw_x86.plugin import X86Plugin

pytestmark = [requires_kvm, pytest.mark.kvm]
CPUS = 2


def attach(m: Any) -> Reporter:
    rep = Reporter()
    rep.machine = m
    m.map_device(Range("pio", 0xE0, 8, "reporter"), rep)
    return rep


@pytest.mark.parametrize("irqchip", ["kernel", "userspace"])
def test_aps_waiting_for_sipi_start_after_restore(tmp_path: Path, irqchip: str) -> None:
    m, rep = make_machine(cpus=CPUS, irqchip=irqchip)
    try:
        loaders.load(m, str(GUESTS / "smp.elf"), {})
        saved = [m.hooks.pm.hook.save_arch_state(cpu=c) for c in m.cpus]
        if irqchip == "kernel":
            assert saved[1]["mp_state"] == 1  # KVM_MP_STATE_UNINITIALIZED: waits for INIT
        m.checkpoint(tmp_path / "cpt")
    finally:
        m.close()
    reps: list[Reporter] = []
    r = Machine.restore(tmp_path / "cpt", arch_plugin=X86Plugin(),
                        setup=lambda mm: reps.append(attach(mm)))
    try:
        if irqchip == "kernel":
            assert r.hooks.pm.hook.save_arch_state(cpu=r.cpus[1])["mp_state"] == 1
        res = r.run(timeout=60)
        assert res.reason == "reporter: guest done", reps[0].values
        v = reps[0].values
        assert v[0] == CPUS and v[1] == 0  # CPUs in the MP table, the BSP's APIC id
        assert 0xA01 in v  # the AP started and reported its APIC id
        assert v[-2:] == [CPUS, (1 << CPUS) - 2]  # every CPU online, the AP's bit
    finally:
        r.close()
