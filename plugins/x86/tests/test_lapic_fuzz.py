"""Stateful fuzz of the userspace local APICs and interrupt controller (issue 10): any
access of any size at any offset of every CPU's APIC page, IPIs of every kind, IRQ lines
and NMIs. Properties: a read answers exactly the bytes asked; nothing raises; what is kept
is bounded (a vector pending at most once, at most two NMIs, the records capped)."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import make_machine, requires_kvm
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvmfw_x86.interrupts import MAX_PENDING_NMIS, RECORD_LIMIT
from kvmfw_x86.lapic import LAPIC_SIZE
from kvmfw_x86.plugin import X86Plugin

pytestmark = [requires_kvm, pytest.mark.kvm]
CPUS = 3
SIZES = st.sampled_from([1, 2, 3, 4, 8, 16])


class LapicMachine(RuleBasedStateMachine):
    machine: Any = None

    def __init__(self) -> None:
        super().__init__()
        m = type(self).machine
        self.st = X86Plugin.state(m.hooks.pm.get_plugin("arch:x86"), m)  # type: ignore[arg-type]
        self.lapics = self.st.lapics
        self.irq = self.st.interrupts

    @rule(cpu=st.integers(0, CPUS), offset=st.integers(0, LAPIC_SIZE - 1), size=SIZES)
    def read(self, cpu: int, offset: int, size: int) -> None:
        data = self.lapics.read(cpu * LAPIC_SIZE + offset, size)
        assert isinstance(data, bytes) and len(data) == size

    @rule(cpu=st.integers(0, CPUS), offset=st.integers(0, LAPIC_SIZE - 1),
          data=st.binary(min_size=1, max_size=16))
    def write(self, cpu: int, offset: int, data: bytes) -> None:
        self.lapics.write(cpu * LAPIC_SIZE + offset, data)

    @rule(sender=st.integers(0, CPUS - 1), low=st.integers(0, 0xFFFFFFFF),
          high=st.integers(0, 0xFFFFFFFF))
    def ipi(self, sender: int, low: int, high: int) -> None:
        # INIT/SIPI reset real vCPUs (context writes through KVM): allowed too
        self.lapics.write(sender * LAPIC_SIZE + 0x310, high.to_bytes(4, "little"))
        self.lapics.write(sender * LAPIC_SIZE + 0x300, low.to_bytes(4, "little"))

    @rule(cpu=st.integers(0, CPUS - 1), vector=st.integers(0, 255))
    def post(self, cpu: int, vector: int) -> None:
        self.irq.post(cpu, vector)

    @rule(cpu=st.integers(0, CPUS - 1))
    def nmi(self, cpu: int) -> None:
        self.irq.nmi(cpu)

    @rule(number=st.integers(0, 0xDF))
    def pulse(self, number: int) -> None:
        self.irq.line(number).pulse()

    @invariant()
    def bounded(self) -> None:
        for q in self.irq.pending.values():
            assert len(q) == len(set(q)) <= 256
        assert all(0 <= n <= MAX_PENDING_NMIS for n in self.irq.nmis.values())
        assert len(self.lapics.ipis) <= RECORD_LIMIT
        assert len(self.irq.delivered) <= RECORD_LIMIT
        assert all(len(r) <= 256 for r in self.lapics.regs)


def test_lapics_and_interrupts_fuzz() -> None:
    m, _ = make_machine(cpus=CPUS, irqchip="userspace")
    try:
        LapicMachine.machine = m
        LapicMachine.TestCase.settings = settings(
            max_examples=150, stateful_step_count=40, deadline=None,
            suppress_health_check=list(HealthCheck))
        LapicMachine.TestCase().runTest()
    finally:
        LapicMachine.machine = None
        m.close()
