"""Local APICs in userspace (``irqchip=userspace``): enough of the xAPIC for SMP bring-up
and IPIs, as gem5's X86KvmCPU does it without an in-kernel irqchip.

Guest accesses to the APIC page (``0xFEE00000``) exit as MMIO; ``finalize_mmio_address``
moves them to a per-CPU page at :data:`PERCPU_BASE` (gem5's ``x86LocalAPICAddress``), so
one :class:`UserspaceLapics` device knows which CPU touched it. Registers: ID, version,
TPR, LDR/DFR, SVR, ESR, LVTs and ICR are stored; EOI is accepted. A write of the ICR's low
half sends an IPI: fixed/lowest-priority vectors and NMIs go to
:class:`~kvmfw_x86.interrupts.UserspaceInterrupts`, INIT and STARTUP (SIPI) to its
``init``/``sipi`` (gem5's rule: INIT suspends the CPU and resets it to its INIT state,
SIPI starts it in real mode at ``vector << 8 : 0``). No APIC timer is modelled.

Access sizes follow KVM's in-kernel xAPIC: a read of 1, 2 or 4 bytes inside one 32-bit
register is answered; any other read (8 bytes, one crossing a register) reads as zeros; a
write that is not 4 bytes at a register's start is ignored. Both are logged, never fatal.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from kvmfw.debug import get_logger

from kvmfw_x86.interrupts import RECORD_LIMIT

log = get_logger("kvmfw.x86.lapic")

LAPIC_ADDR = 0xFEE00000
LAPIC_SIZE = 0x1000
PERCPU_BASE = 0x2000_0000_0000_0000
"""Where CPU ``n``'s APIC page appears on the bus: ``PERCPU_BASE + n * 0x1000``."""

APIC_ID, APIC_VERSION, APIC_LDR, APIC_DFR, APIC_SVR = 0x20, 0x30, 0xD0, 0xE0, 0xF0
APIC_ICR_LO, APIC_ICR_HI = 0x300, 0x310
APIC_ESR = 0x280
ESR_SEND_ILLEGAL = 1 << 5
DM_FIXED, DM_LOWEST, DM_SMI, DM_NMI, DM_INIT, DM_STARTUP = 0, 1, 2, 4, 5, 6
VERSION = 0x00050014
"""An integrated APIC (version 0x14) with 6 LVT entries, as KVM's."""


def per_cpu_address(cpu_id: int, gpa: int) -> int | None:
    """The bus address for CPU ``cpu_id``'s access to ``gpa``, or None outside the page."""
    off = gpa - LAPIC_ADDR
    if 0 <= off < LAPIC_SIZE:
        return PERCPU_BASE + cpu_id * LAPIC_SIZE + off
    return None


class UserspaceLapics:
    """The APIC pages of every CPU (a bus device at :data:`PERCPU_BASE`)."""

    name = "lapic"

    def __init__(self, machine: Any, interrupts: Any, ncpus: int) -> None:
        self.machine = machine
        self.interrupts = interrupts
        self.regs: list[dict[int, int]] = [self._reset_regs(i) for i in range(ncpus)]
        self.ipis: deque[tuple[int, int, int, int]] = deque(maxlen=RECORD_LIMIT)
        """``(sender, target, delivery mode, vector)`` of the latest IPIs, for tests."""
        self.ipis_sent = 0
        """IPIs sent so far (one per target)."""
        self.odd_accesses = 0
        """Accesses of a size or alignment the xAPIC does not take (ignored)."""

    @staticmethod
    def _reset_regs(cpu_id: int) -> dict[int, int]:
        regs = {APIC_ID: cpu_id << 24, APIC_VERSION: VERSION, APIC_DFR: 0xFFFFFFFF,
                APIC_SVR: 0xFF}
        for lvt in (0x320, 0x330, 0x340, 0x350, 0x360, 0x370):
            regs[lvt] = 0x10000  # masked
        return regs

    @property
    def size(self) -> int:
        return len(self.regs) * LAPIC_SIZE

    def read(self, offset: int, size: int) -> bytes:
        cpu, reg = divmod(offset, LAPIC_SIZE)
        align = reg & 0xF
        if cpu >= len(self.regs) or size not in (1, 2, 4) or align + size > 4:
            self._odd("read", offset, size)
            return bytes(size)
        val = self.regs[cpu].get(reg & 0xFF0, 0)
        return (val >> 8 * align).to_bytes(4, "little")[:size]

    def write(self, offset: int, data: bytes) -> None:
        cpu, reg = divmod(offset, LAPIC_SIZE)
        if cpu >= len(self.regs) or len(data) != 4 or reg & 0xF:
            self._odd("write", offset, len(data))  # as KVM: not a 32-bit register write
            return
        val = int.from_bytes(data, "little")
        if reg in (APIC_VERSION, 0xB0):  # read-only; EOI has nothing to retire here
            return
        if reg == APIC_ICR_LO:
            val &= ~(1 << 12)  # delivery status: always idle
        self.regs[cpu][reg] = val
        if reg == APIC_ICR_LO:
            self.send_ipi(cpu, val, self.regs[cpu].get(APIC_ICR_HI, 0))

    def _odd(self, kind: str, offset: int, size: int) -> None:
        self.odd_accesses += 1
        cpu, reg = divmod(offset, LAPIC_SIZE)
        # the first one is news; a guest repeating it must not flood the log
        (log.warning if self.odd_accesses == 1 else log.debug)(
            "cpu%d: %d-byte local APIC %s at offset %#x ignored (the xAPIC takes aligned "
            "32-bit accesses)", cpu, size, kind, reg)

    def apic_id(self, cpu: int) -> int:
        return self.regs[cpu][APIC_ID] >> 24

    def destinations(self, sender: int, low: int, high: int) -> list[int]:
        """The CPUs an ICR value addresses (shorthand, physical or flat logical mode)."""
        shorthand = low >> 18 & 3
        everyone = range(len(self.regs))
        if shorthand == 1:
            return [sender]
        if shorthand == 2:
            return list(everyone)
        if shorthand == 3:
            return [c for c in everyone if c != sender]
        dest = high >> 24
        if low & (1 << 11):  # logical, flat model: a bit per CPU in the LDR
            return [c for c in everyone if (self.regs[c].get(APIC_LDR, 0) >> 24) & dest]
        return [c for c in everyone if dest == 0xFF or self.apic_id(c) == dest]

    def send_ipi(self, sender: int, low: int, high: int) -> None:
        mode, vector = low >> 8 & 7, low & 0xFF
        if mode == DM_INIT and not low & (1 << 14) and low & (1 << 15):
            return  # INIT level de-assert: nothing to do (as KVM)
        irq = self.interrupts
        if mode in (DM_FIXED, DM_LOWEST) and vector < 16:
            # vectors 0-15 are illegal: the sending APIC flags "send illegal vector" in
            # its ESR and delivers nothing (SDM 11.5.3)
            self.regs[sender][APIC_ESR] = self.regs[sender].get(APIC_ESR, 0) | ESR_SEND_ILLEGAL
            return
        for target in self.destinations(sender, low, high):
            self.ipis.append((sender, target, mode, vector))
            self.ipis_sent += 1
            if mode in (DM_FIXED, DM_LOWEST):
                irq.post(target, vector)
            elif mode == DM_NMI:
                irq.nmi(target)
            elif mode == DM_INIT:
                irq.init(target)
                self.regs[target] = self._reset_regs(target) | {
                    APIC_ID: self.regs[target][APIC_ID]}
            elif mode == DM_STARTUP:
                irq.sipi(target, vector)
            # SMI and reserved modes are dropped
