"""Userspace interrupt delivery (gem5's model, ``irqchip=userspace``).

A tiny controller per machine: IRQ line ``n`` raises vector ``base + n`` (the PC's 8259
convention, base 0x20) on the boot CPU; :meth:`UserspaceInterrupts.post` and
:meth:`~UserspaceInterrupts.nmi` target any CPU. Delivery happens before an entry
(``deliver_interrupts``): NMIs with ``KVM_NMI``, vectors with ``KVM_INTERRUPT`` when KVM
says the guest can take one, otherwise an interrupt window is requested and delivery
happens on ``KVM_EXIT_IRQ_WINDOW_OPEN``. A halted CPU is woken by the post.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from kvmfw.device import CallbackIrqLine

from kvmfw_x86.abi import X, addr, ffi


class UserspaceInterrupts:
    """Pending vectors and NMIs per vCPU, injected through the KVM API."""

    def __init__(self, machine: Any, base: int = 0x20) -> None:
        self.machine = machine
        self.base = base
        self.pending: dict[int, deque[int]] = {}
        self.nmis: dict[int, int] = {}
        self.delivered: list[tuple[int, int]] = []
        """``(cpu id, vector)`` of every injection (2 for NMI), for tests and stats."""
        self._irq = ffi.new("struct kvm_interrupt *")

    def line(self, number: int, cpu: int = 0) -> CallbackIrqLine:
        """An IRQ line: a rising edge posts ``base + number`` to ``cpu``."""
        def set_level(level: int) -> None:
            if level:
                self.post(cpu, self.base + number)
        return CallbackIrqLine(set_level)

    def post(self, cpu_id: int, vector: int) -> None:
        """Queue ``vector`` for ``cpu_id`` and wake it."""
        self.pending.setdefault(cpu_id, deque()).append(vector)
        self.machine.cpus[cpu_id].post_interrupt()

    def nmi(self, cpu_id: int) -> None:
        self.nmis[cpu_id] = self.nmis.get(cpu_id, 0) + 1
        self.machine.cpus[cpu_id].post_interrupt()

    def deliver(self, cpu: Any) -> bool:
        run = cpu.vcpu.run
        if self.nmis.get(cpu.id):
            self.nmis[cpu.id] -= 1
            cpu.vcpu.nmi()
            self.delivered.append((cpu.id, 2))
        q = self.pending.get(cpu.id)
        if q and run.ready_for_interrupt_injection and run.if_flag:
            self._irq.irq = q.popleft()
            cpu.vcpu.ioctl(X.KVM_INTERRUPT, addr(self._irq))
            self.delivered.append((cpu.id, int(self._irq.irq)))
        more = bool(q) or bool(self.nmis.get(cpu.id))
        run.request_interrupt_window = 1 if q else 0
        cpu.interrupt_pending = more
        return True
