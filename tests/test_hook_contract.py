"""The run loop's contract with plugins on real guests: which hooks a device may implement
and when they run, wrapped hook errors, counted sync ioctls, pending (timing-mode) MMIO and
coalesced zones that are never lost."""

from __future__ import annotations

from typing import Any

import pytest
from kvmtest import MMIO, MMIOLOOP, PIO, TRIPLE, needs_kvm

from kvmfw.bus import PendingAccess
from kvmfw.cpu import CpuStatus
from kvmfw.device import Device, Range
from kvmfw.errors import DeviceError, PluginError, PluginHookError, TripleFaultError
from kvmfw.eventq import TICKS_PER_MS, Event
from kvmfw.hookspecs import SyncLevel, hookimpl

pytestmark = needs_kvm


class Observer(Device):
    """A device that watches every entry and exit, and adds a section to dumps."""

    name = "observer"

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.entries = 0
        self.exits: list[int] = []

    @hookimpl
    def pre_run(self, cpu: Any) -> None:
        self.entries += 1

    @hookimpl
    def post_run(self, cpu: Any, exit_reason: int) -> None:
        self.exits.append(exit_reason)

    @hookimpl
    def dump_state(self, cpu: Any) -> str:
        return f"observer saw {len(self.exits)} exits"


def test_a_device_added_after_start_up_sees_every_entry_and_exit(make_machine) -> None:
    m, arch, rec = make_machine(PIO)
    obs = m.add_device(Observer(m.device_context()))  # the vCPU's hooks were bound before
    assert isinstance(obs, Observer)
    m.run(timeout=10)
    stats = m.cpus[0].stats
    assert obs.entries == stats.vm_exits + stats.vm_half_entries == 6
    assert obs.exits == [2] * 6  # KVM_EXIT_IO


def test_device_dump_sections_follow_the_arch_register_dump(make_machine) -> None:
    m, arch, rec = make_machine(TRIPLE)
    m.add_device(Observer(m.device_context()))
    with pytest.raises(TripleFaultError) as info:
        m.run(timeout=10)
    dump = info.value.dump
    assert dump.index("rip=") < dump.index("--- dev:observer:1 ---")
    assert "observer saw 1 exits" in dump


def test_a_device_implementing_an_arch_hook_is_refused_and_leaves_no_trace(
        make_machine) -> None:
    class Thief(Device):
        name = "thief"

        def ranges(self) -> list[Range]:
            return [Range("pio", 0x80, 1)]

        @hookimpl
        def handle_exit_io(self, cpu: Any, io: Any) -> bool:
            return True

    m, arch, rec = make_machine(PIO)
    with pytest.raises(PluginError, match="implements handle_exit_io"):
        m.add_device(Thief(m.device_context()))
    assert m.bus.pio.lookup(0x80) is None and not m.devices
    m.run(timeout=10)
    assert rec.writes[:2] == [(0, b"O"), (0, b"K")]  # the arch still handles port IO


@pytest.mark.parametrize("hook", ["pre_run", "post_run"])
def test_an_exception_in_pre_or_post_run_is_a_typed_error_naming_the_hook(
        make_machine, hook: str) -> None:
    m, arch, rec = make_machine(PIO)

    class Broken(Device):
        name = "broken"

        @hookimpl(specname=hook)
        def fail(self, cpu: Any, exit_reason: int = 0) -> None:
            raise ValueError("observer state corrupt")

    m.add_device(Broken(m.device_context()))
    with pytest.raises(PluginHookError, match="observer state corrupt") as info:
        m.run(timeout=10)
    assert info.value.hook == hook


class CountingArch:
    """Wraps the real-mode test arch: its syncs report the ioctls they made."""

    def __init__(self, arch: Any, pull_ioctls: int) -> None:
        self.arch = arch
        self.pull_ioctls = pull_ioctls

    def update_thread_context(self, cpu: Any, context: Any, level: SyncLevel) -> int:
        if self.pull_ioctls:
            self.arch.update_thread_context(cpu, context, level)
        return self.pull_ioctls

    def update_kvm_state(self, cpu: Any, context: Any, level: SyncLevel) -> int:
        self.arch.update_kvm_state(cpu, context, level)
        return 1


@pytest.mark.parametrize("pull_ioctls", [0, 1])
def test_syncs_count_the_ioctls_the_arch_reports(make_machine, pull_ioctls: int) -> None:
    m, arch, rec = make_machine(PIO)
    cpu = m.cpus[0]
    counting = CountingArch(arch, pull_ioctls)
    cpu._update_thread_context = counting.update_thread_context
    cpu._update_kvm_state = counting.update_kvm_state
    m.run(timeout=10)
    cpu.get_context(SyncLevel.RUNTIME)
    s = cpu.stats
    assert s.sync_ioctls_to_kvm == s.syncs_to_kvm == 1  # the entry state, once
    assert s.sync_ioctls_from_kvm == pull_ioctls
    assert s.syncs_from_kvm == pull_ioctls  # a pull that read nothing is not a sync


class SlowMemory:
    """An MMIO device in timing mode: reads are answered 1 ms of simulated time later."""

    def __init__(self, machine: Any, value: int) -> None:
        self.machine = machine
        self.value = value
        self.pending: list[PendingAccess] = []

    def read(self, offset: int, size: int) -> PendingAccess:
        p = PendingAccess(size)
        self.pending.append(p)
        eq = self.machine.eventq
        eq.schedule(Event(lambda: p.complete(bytes([self.value]) * size), "slow-read"),
                    eq.cur_tick + TICKS_PER_MS)
        return p

    def write(self, offset: int, data: bytes) -> None:
        pass


def _slow_machine(make_machine: Any) -> tuple[Any, Any, SlowMemory]:
    m, arch, rec = make_machine(MMIO)
    m.bus.mmio.unregister(0x20000)
    slow = SlowMemory(m, 0x77)
    m.map_device(Range("mmio", 0x20020, 1, "slow"), slow)
    m.map_device(Range("mmio", 0x20000, 0x20, "recorder-low"), rec)
    m.map_device(Range("mmio", 0x20030, 0x10, "recorder-high"), rec)
    return m, rec, slow


def test_a_device_can_answer_an_mmio_read_later(make_machine) -> None:
    m, rec, slow = _slow_machine(make_machine)
    result = m.run(timeout=10)
    assert result.status == 0 and len(slow.pending) == 1 and slow.pending[0].done
    assert (0, b"\x77") in rec.writes  # the guest got the late answer in AL
    assert m.cpus[0].stats.mmio_pending == 1
    assert result.ticks >= TICKS_PER_MS  # the vCPU waited in simulated time


def test_the_vcpu_waits_in_running_mmio_pending_and_drain_completes_the_access(
        make_machine) -> None:
    m, rec, slow = _slow_machine(make_machine)
    cpu = m.cpus[0]
    cpu.activate()
    for _ in range(10):
        cpu.run_slice(None)
        cpu._dispatch_exit()
        if cpu.status is CpuStatus.RUNNING_MMIO_PENDING:
            break
    assert cpu.status is CpuStatus.RUNNING_MMIO_PENDING and not cpu.is_drained()
    cpu.tick()  # a pending vCPU does not enter KVM
    assert cpu.status is CpuStatus.RUNNING_MMIO_PENDING
    m.drain()  # runs the device's event, then the half entry that hands AL to the guest
    assert cpu.is_drained() and slow.pending[0].done
    assert cpu.get_context().regs["rax"] & 0xFF == 0x77
    result = m.run(timeout=10)  # and the run goes on to the end
    assert result.status == 0 and (0, b"\x77") in rec.writes


def test_a_pending_access_completed_badly_is_a_device_error() -> None:
    p = PendingAccess(4)
    with pytest.raises(DeviceError, match="completed with 2 bytes"):
        p.complete(b"ab")
    p.complete(b"abcd")
    with pytest.raises(DeviceError, match="twice"):
        p.complete(b"abcd")


def test_a_coalesced_zone_is_drained_even_without_use_coalesced_mmio(make_machine) -> None:
    m, arch, rec = make_machine(MMIOLOOP)  # use_coalesced_mmio left False
    m.vm.register_coalesced_mmio(0x20000, 0x100)
    cpu = m.cpus[0]
    cpu.get_context().regs["rcx"] = 200
    cpu.mark_context_dirty()
    m.run(timeout=20)
    assert [w for w in rec.writes if w[0] == 0x10] == [(0x10, b"\x09")] * 200
    assert cpu.stats.coalesced_mmio > 0  # replayed from the ring, none lost
