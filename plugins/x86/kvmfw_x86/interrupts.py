"""Userspace interrupt delivery (gem5's model, ``irqchip=userspace``).

A tiny controller per machine: IRQ line ``n`` raises vector ``base + n`` (the PC's 8259
convention, base 0x20) on the boot CPU; :meth:`UserspaceInterrupts.post` and
:meth:`~UserspaceInterrupts.nmi` target any CPU. Delivery happens before an entry
(``deliver_interrupts``): NMIs with ``KVM_NMI``, vectors with ``KVM_INTERRUPT`` when KVM
says the guest can take one, otherwise an interrupt window is requested and delivery
happens on ``KVM_EXIT_IRQ_WINDOW_OPEN``. A halted CPU is woken by the post.

INIT and SIPI (from the userspace local APICs, :mod:`kvmfw_x86.lapic`) follow gem5: INIT
suspends the CPU and resets it to the INIT state, where it waits for a SIPI and takes no
interrupt; SIPI starts it in real mode at ``vector << 8 : 0``. Both are applied at once
when the target is not inside KVM (not started, or halted); a running target is kicked
and applies them itself before its next entry. A CPU INITed while running cannot skip
that entry (the core always enters after ``deliver_interrupts``), so it is parked on a
``hlt`` loop at :data:`PARK_ADDR` (the PC reset vector's real-mode alias) and halts there.

A CPU that halted with interrupts disabled (``cli; hlt``) stays halted until an NMI, INIT
or SIPI, as hardware and QEMU (``x86_cpu_has_work``) do: a maskable interrupt only queues
(the core may wake the CPU; delivery sees the completed ``hlt`` with IF=0 and halts it
again). Pending vectors are held at most once each, as the APIC's IRR holds them, and at
most two NMIs, as KVM holds them; the records of what was delivered are bounded.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from kvmfw.abi import ExitReason
from kvmfw.device import CallbackIrqLine
from kvmfw.errors import ConfigError

from kvmfw_x86.abi import X, addr, ffi
from kvmfw_x86.context import Segment

PARK_ADDR = 0xFFFF0
PARK_CODE = b"\xf4\xeb\xfd"  # 1: hlt; jmp 1b
RECORD_LIMIT = 1024
"""How many recent deliveries (and IPIs) are kept for tests and debugging."""
MAX_PENDING_NMIS = 2
RFLAGS_IF = 1 << 9
_EXIT_HLT = int(ExitReason.HLT)


def reset_to_init(ctx: Any, cs: int = 0xF000, ip: int = 0xFFF0) -> None:
    """The architectural INIT state (real mode at ``cs:ip``, caches on, paging off;
    general registers, MSRs and the APIC base are left as they were)."""
    ctx.cs = Segment(base=cs << 4, limit=0xFFFF, selector=cs, type=11)
    for s in ("ds", "es", "fs", "gs", "ss"):
        setattr(ctx, s, Segment(base=0, limit=0xFFFF, selector=0, type=3))
    ctx.tr = Segment(base=0, limit=0xFFFF, selector=0, type=11, s=0)
    ctx.ldt = Segment(base=0, limit=0xFFFF, selector=0, type=2, s=0)
    ctx.gdt = (0, 0xFFFF)
    ctx.idt = (0, 0xFFFF)
    ctx.cr0 = 0x10  # ET (caches enabled: kvmfw does not model CD/NW)
    ctx.cr3 = 0
    ctx.cr4 = 0
    ctx.efer = 0
    ctx.rflags = 2
    ctx.rip = ip


class UserspaceInterrupts:
    """Pending vectors and NMIs per vCPU, injected through the KVM API."""

    def __init__(self, machine: Any, base: int = 0x20) -> None:
        self.machine = machine
        self.base = base
        self.pending: dict[int, deque[int]] = {}
        self.nmis: dict[int, int] = {}
        self.delivered: deque[tuple[int, int]] = deque(maxlen=RECORD_LIMIT)
        """``(cpu id, vector)`` of the latest injections (2 for NMI), for tests."""
        self.delivered_total = 0
        """Injections so far (vectors and NMIs)."""
        self._irq = ffi.new("struct kvm_interrupt *")
        self.waiting_for_sipi: set[int] = set()
        """CPUs in the INIT state (suspended until a SIPI)."""
        self._init_pending: set[int] = set()
        self._sipi_pending: dict[int, int] = {}
        self._reset_at: dict[int, int] = {}
        """CPU -> its ``runs`` when INIT/SIPI last reset it (its last exit is then moot)."""

    def line(self, number: int, cpu: int = 0) -> CallbackIrqLine:
        """An IRQ line: a rising edge posts ``base + number`` to ``cpu``."""
        if not 0 <= number <= 0xFF - self.base or not 0 <= cpu < len(self.machine.cpus):
            raise ConfigError(f"no userspace IRQ line {number} to cpu {cpu} (lines 0 to "
                              f"{0xFF - self.base}, {len(self.machine.cpus)} CPUs)")

        def set_level(level: int) -> None:
            if level:
                self.post(cpu, self.base + number)
        return CallbackIrqLine(set_level)

    def post(self, cpu_id: int, vector: int) -> None:
        """Queue ``vector`` for ``cpu_id`` (once: a vector already pending is not queued
        again, as in the APIC's IRR) and wake it."""
        q = self.pending.setdefault(cpu_id, deque())
        if vector not in q:
            q.append(vector)
        self.machine.cpus[cpu_id].post_interrupt()

    def nmi(self, cpu_id: int) -> None:
        self.nmis[cpu_id] = min(self.nmis.get(cpu_id, 0) + 1, MAX_PENDING_NMIS)
        self.machine.cpus[cpu_id].post_interrupt()

    # --- INIT / SIPI ---------------------------------------------------------------

    def init(self, cpu_id: int) -> None:
        """INIT: suspend ``cpu_id`` in the INIT state until a SIPI (pending vectors go)."""
        self.waiting_for_sipi.add(cpu_id)
        self.pending.pop(cpu_id, None)
        self._sipi_pending.pop(cpu_id, None)
        cpu = self.machine.cpus[cpu_id]
        if cpu.status.value == "Idle":
            self._apply_init(cpu, parked=False)
        else:
            self._init_pending.add(cpu_id)
            cpu.post_interrupt()

    def sipi(self, cpu_id: int, vector: int) -> None:
        """STARTUP: a CPU waiting in the INIT state starts at ``vector << 8 : 0``."""
        if cpu_id not in self.waiting_for_sipi:
            return  # a running CPU ignores SIPIs (the second SIPI of the MP sequence)
        self.waiting_for_sipi.discard(cpu_id)
        cpu = self.machine.cpus[cpu_id]
        if cpu.status.value == "Idle" and cpu_id not in self._init_pending:
            self._apply_sipi(cpu, vector)
        else:
            self._sipi_pending[cpu_id] = vector
            cpu.post_interrupt()

    def _apply_init(self, cpu: Any, *, parked: bool) -> None:
        self._reset_at[cpu.id] = cpu.runs
        ctx = cpu.get_context()
        if parked:
            self.machine.memory.write(PARK_ADDR, PARK_CODE)
        reset_to_init(ctx)
        if ctx.info.has_events:
            ctx.set_event("nmi", pending=0, injected=0)
        cpu.interrupt_pending = False
        if not parked:
            cpu.suspend()
            cpu.halted = False  # only a SIPI starts it

    def _apply_sipi(self, cpu: Any, vector: int) -> None:
        self._reset_at[cpu.id] = cpu.runs
        ctx = cpu.get_context()
        reset_to_init(ctx, cs=vector << 8, ip=0)
        cpu.halted = False
        cpu.activate()

    def _record(self, cpu: Any, vector: int) -> None:
        self.delivered.append((cpu.id, vector))
        self.delivered_total += 1
        cpu.count_interrupt()

    def _halted_with_if_clear(self, cpu: Any) -> bool:
        """Whether the vCPU's last exit was a ``hlt`` executed with interrupts disabled
        (``kvm_run.if_flag`` at that exit) and the host has not restarted it since (INIT,
        SIPI, or RFLAGS.IF set through the context)."""
        # the core's last exit, not kvm_run's: an entry cut short by a kick (EINTR with
        # immediate_exit) leaves kvm_run.exit_reason as it was
        if cpu.last_exit != _EXIT_HLT or cpu.vcpu.run.if_flag \
                or self._reset_at.get(cpu.id) == cpu.runs:
            return False
        return not cpu.get_context().rflags & RFLAGS_IF

    def deliver(self, cpu: Any) -> bool:
        run = cpu.vcpu.run
        if cpu.id in self._init_pending:  # we are about to enter KVM: park on hlt
            self._init_pending.discard(cpu.id)
            self._apply_init(cpu, parked=True)
        if cpu.id in self._sipi_pending:
            self._apply_sipi(cpu, self._sipi_pending.pop(cpu.id))
        if self._reset_at.get(cpu.id) == cpu.runs:
            cpu.sync_kvm_state()  # the core pushed before calling us: push the new state
        if cpu.id in self.waiting_for_sipi:
            self.nmis.pop(cpu.id, None)
            self.pending.pop(cpu.id, None)
            run.request_interrupt_window = 0
            cpu.interrupt_pending = False
            return True
        if not self.nmis.get(cpu.id) and self._halted_with_if_clear(cpu):
            # `cli; hlt`: only an NMI, INIT or SIPI ends it (vectors stay queued)
            run.request_interrupt_window = 0
            cpu.interrupt_pending = False
            cpu.halt()
            return True
        if self.nmis.get(cpu.id):
            self.nmis[cpu.id] -= 1
            cpu.vcpu.nmi()
            self._record(cpu, 2)
        q = self.pending.get(cpu.id)
        if q and run.ready_for_interrupt_injection and run.if_flag:
            self._irq.irq = q.popleft()
            cpu.vcpu.ioctl(X.KVM_INTERRUPT, addr(self._irq))
            self._record(cpu, int(self._irq.irq))
        more = bool(q) or bool(self.nmis.get(cpu.id))
        run.request_interrupt_window = 1 if q else 0
        cpu.interrupt_pending = more
        return True
