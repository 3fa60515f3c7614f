"""PSCI bring-up bookkeeping and the drain hook of the ARMv8 plugin, as pure logic.

The machine and vCPUs here are stand-ins with the attributes the hooks use (the real ones
need an arm64 /dev/kvm: test_kvm_arm64.py runs a real CPU_ON); ``KVM_GET_MP_STATE`` is
answered by the stand-in vCPU, which records whether the machine lock was held.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from kvmfw_armv8 import abi, plugin

from kvmfw.abi import ffi
from kvmfw.cpu import CpuStatus
from kvmfw.eventq import EventQueue

MS = 1_000_000_000  # ticks


class FakeVcpu:
    def __init__(self, machine: FakeMachine) -> None:
        self.machine = machine
        self.mp_state = abi.KVM_MP_STATE_STOPPED
        self.mp_state_calls = 0
        self.unlocked_calls = 0

    def ioctl(self, request: int, arg: int = 0, detail: str = "") -> int:
        assert request == abi.KVM_GET_MP_STATE
        self.mp_state_calls += 1
        if not self.machine.lock._is_owned():
            self.unlocked_calls += 1
        ffi.cast("uint32_t *", arg)[0] = self.mp_state
        return 0


class FakeCpu:
    def __init__(self, machine: FakeMachine, index: int, status: CpuStatus) -> None:
        self.machine = machine
        self.id = index
        self.status = status
        self.vcpu = FakeVcpu(machine)
        self.activations = 0
        self.slices: list[int | None] = []

    def activate(self) -> None:
        if self.status is CpuStatus.IDLE:
            self.status = CpuStatus.RUNNING
            self.activations += 1

    def run_slice(self, ticks: int | None) -> None:
        self.slices.append(ticks)


class FakeMachine:
    def __init__(self, cpus: int = 2) -> None:
        self.eventq = EventQueue()
        self.lock = self.eventq.lock
        self.config = SimpleNamespace(options={}, cpus=cpus)
        self.cpus = [FakeCpu(self, 0, CpuStatus.RUNNING)] + \
            [FakeCpu(self, i, CpuStatus.IDLE) for i in range(1, cpus)]
        b = plugin.board_of(self)  # type: ignore[arg-type]
        b.waiting.extend(self.cpus[1:])  # powered off at vcpu_init
        plugin.machine_created(self)  # type: ignore[arg-type]


def polls(m: FakeMachine) -> int:
    return sum(c.vcpu.mp_state_calls for c in m.cpus)


def test_exits_issue_no_mp_state_ioctl() -> None:
    """Was: one KVM_GET_MP_STATE per waiting secondary on every exit of every vCPU."""
    m = FakeMachine(cpus=4)
    for _ in range(10_000):
        plugin.post_run(m.cpus[0], 6)  # type: ignore[arg-type]  # KVM_EXIT_MMIO
    assert polls(m) == 0


def test_the_poll_brings_a_runnable_secondary_up_under_the_lock() -> None:
    m = FakeMachine()
    cpu1 = m.cpus[1]
    b = plugin.board_of(m)  # type: ignore[arg-type]
    assert b.bring_up is not None and b.bring_up.scheduled
    m.eventq.service_one()  # 1 ms: still powered off
    assert cpu1.status is CpuStatus.IDLE and b.waiting == [cpu1]
    cpu1.vcpu.mp_state = abi.KVM_MP_STATE_RUNNABLE  # the guest's CPU_ON
    m.eventq.service_one()
    assert cpu1.status is CpuStatus.RUNNING and cpu1.activations == 1
    assert b.waiting == [] and not b.bring_up.scheduled  # nobody waits: no more polls
    assert cpu1.vcpu.mp_state_calls == 2 and cpu1.vcpu.unlocked_calls == 0


def test_the_poll_backs_off_and_its_rate_is_bounded() -> None:
    """A secondary the guest never starts costs at most one poll per 64 ms after the first
    few, not one per exit forever."""
    m = FakeMachine()
    eq = m.eventq
    for _ in range(100_000):  # ten simulated seconds (bounded: the loop needs the poll event)
        if eq.cur_tick >= 10_000 * MS or eq.service_one() is None:
            break
    assert eq.cur_tick >= 10_000 * MS
    b = plugin.board_of(m)  # type: ignore[arg-type]
    assert b.poll_interval == plugin.BRING_UP_POLL_MAX_TICKS
    assert polls(m) <= 7 + 10_000 // 64
    assert b.mp_state_polls == polls(m)


def test_the_poll_stops_while_every_vcpu_is_idle_and_restarts_after_an_exit() -> None:
    """An idle machine must be able to end ("all vCPUs halted and no event is pending")."""
    m = FakeMachine()
    b = plugin.board_of(m)  # type: ignore[arg-type]
    m.cpus[0].status = CpuStatus.IDLE
    m.eventq.service_one()
    assert b.bring_up is not None and not b.bring_up.scheduled and m.eventq.empty()
    m.cpus[0].status = CpuStatus.RUNNING
    plugin.post_run(m.cpus[0], 6)  # type: ignore[arg-type]
    assert b.bring_up.scheduled and b.poll_interval == plugin.BRING_UP_POLL_TICKS


def test_exits_on_many_threads_during_bring_up_never_break_the_bookkeeping() -> None:
    """Parallel mode: every vCPU thread runs post_run unlocked while the main thread
    services the poll (was: unlocked list changes, a ValueError could kill the machine)."""
    m = FakeMachine(cpus=4)
    errors: list[BaseException] = []
    stop = threading.Event()

    def exits(cpu: Any) -> None:
        try:
            while not stop.is_set():
                plugin.post_run(cpu, 6)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=exits, args=(c,)) for c in m.cpus]
    for t in threads:
        t.start()
    try:
        for i, cpu in enumerate(m.cpus[1:]):
            cpu.vcpu.mp_state = abi.KVM_MP_STATE_RUNNABLE
            for _ in range(3 + i):
                with m.lock:
                    m.eventq.service_one()
    finally:
        stop.set()
        for t in threads:
            t.join()
    b = plugin.board_of(m)  # type: ignore[arg-type]
    assert errors == []
    assert b.waiting == [] and all(c.status is CpuStatus.RUNNING for c in m.cpus)
    assert all(c.activations == 1 for c in m.cpus[1:])
    assert sum(c.vcpu.unlocked_calls for c in m.cpus) == 0


def test_kvm_run_drain_runs_one_bounded_slice() -> None:
    """The drain hook (was missing on ARMv8): one slice of at most 1 ms so KVM can deliver
    a pending SError; a powered-off secondary is not entered."""
    m = FakeMachine()
    assert plugin.kvm_run_drain(m.cpus[0]) is True  # type: ignore[arg-type]
    assert m.cpus[0].slices == [plugin.DRAIN_SLICE_TICKS] and plugin.DRAIN_SLICE_TICKS == MS
    assert plugin.kvm_run_drain(m.cpus[1]) is True  # type: ignore[arg-type]
    assert m.cpus[1].slices == []


def test_a_secondary_started_active_is_never_polled_and_leaves_the_list_at_its_first_exit(
        ) -> None:
    """Secondaries start active (``start_active``): their threads sleep inside KVM_RUN until
    the kernel's CPU_ON, as QEMU's do. The poll must not ask KVM about one (the ioctl would
    wait for the vCPU to leave KVM_RUN, holding the machine lock: a deadlock until the next
    kick); a kick is no sign of life, its first other exit is."""
    m = FakeMachine(cpus=2)
    b = plugin.board_of(m)  # type: ignore[arg-type]
    cpu1 = m.cpus[1]
    cpu1.status = CpuStatus.RUNNING  # what Machine.run does for a start_active vCPU
    for _ in range(10):
        if m.eventq.service_one() is None:
            break
    assert polls(m) == 0 and b.mp_state_polls == 0
    assert not b.bring_up.scheduled  # type: ignore[union-attr]  # nobody idle to bring up
    plugin.post_run(cpu1, plugin._EXIT_INTR)  # type: ignore[arg-type]  # a kick
    assert b.waiting == [cpu1]
    plugin.post_run(cpu1, 6)  # type: ignore[arg-type]  # KVM_EXIT_MMIO: it runs guest code
    assert b.waiting == [] and polls(m) == 0 and cpu1.activations == 0
