"""Threads, kicks and time (issue 10, items 3 and 7): a machine runs from any thread, no
kick is lost, and simulated time follows host time within the documented bound."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
from kvmtest import COUNT, HALT, PIOLOOP, SPIN, Recorder, needs_kvm
from realmode_arch import RealModeArch

from kvmfw import hookimpl
from kvmfw.abi import Cap
from kvmfw.cpu import CpuStatus
from kvmfw.device import Range
from kvmfw.errors import KvmUnavailableError
from kvmfw.eventq import TICKS_PER_MS, TICKS_PER_SECOND, Event
from kvmfw.kvm import Kvm
from kvmfw.machine import Machine, MachineConfig
from kvmfw.vcpu import KICK_SIGNAL

pytestmark = needs_kvm


def _in_thread(fn: Any, limit: float = 30.0) -> Any:
    """Call ``fn`` on a new thread; fail (not hang) if it does not return within ``limit``."""
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"{fn} did not return within {limit} s (hung)"
    if "error" in out:
        raise out["error"]
    return out["value"]


# --- item 3: threads and kicks -----------------------------------------------------------

def test_a_run_from_a_second_thread_honours_its_tick_limit(make_machine) -> None:
    m, arch, rec = make_machine(SPIN)
    r = m.run(max_ticks=2 * TICKS_PER_MS, timeout=10)
    assert r.reason == "simulated tick limit reached"
    # the same machine, run again from another thread: the run timer must follow it
    r = _in_thread(lambda: m.run(max_ticks=2 * TICKS_PER_MS, timeout=10))
    assert r.reason == "simulated tick limit reached" and r.ticks == 4 * TICKS_PER_MS
    # and back on this thread, after the other one has ended
    r = m.run(max_ticks=2 * TICKS_PER_MS, timeout=10)
    assert r.reason == "simulated tick limit reached" and r.ticks == 6 * TICKS_PER_MS


class _DrainingArch(RealModeArch):
    """Says "not drained" until KVM has run three drain slices of the vCPU (as x86 does
    while an event is pending), so drain() must enter KVM with bounded slices."""

    def __init__(self, program: int) -> None:
        super().__init__(program)
        self.drain_slices: dict[int, int] = {}

    @hookimpl
    def arch_is_drained(self, cpu: Any) -> bool:
        return self.drain_slices.get(cpu.id, 0) >= 3

    @hookimpl
    def kvm_run_drain(self, cpu: Any) -> bool:
        n = self.drain_slices[cpu.id] = self.drain_slices.get(cpu.id, 0) + 1
        if n == 1:
            # a kick that lands just before the entry (as a timer signal may) must mark
            # this vCPU's kvm_run: then this unbounded entry returns at once
            signal.pthread_kill(threading.get_ident(), KICK_SIGNAL)
            cpu.run_slice(None)
        else:
            cpu.run_slice(TICKS_PER_MS // 5)
        return True


def test_drain_after_a_parallel_run_returns() -> None:
    """Both vCPUs drain on one thread that never ran them: each slice needs that thread's
    run timer, and its kick slot pointing at the vCPU being entered."""
    arch = _DrainingArch(COUNT)
    with Machine(MachineConfig(memory=0x10000, cpus=2), arch_plugin=arch) as m:
        m.cpus[1].start_active = True
        for _ in range(5):
            m.run(max_ticks=TICKS_PER_MS, timeout=10)
            before = [c.get_context().regs["rsi"] for c in m.cpus]
            arch.drain_slices.clear()
            for c in m.cpus:
                c.vcpu.run.immediate_exit = 0  # (a kick left from the run's end)
            _in_thread(m.drain)  # the vCPU threads are gone: the slices need a timer here
            assert arch.drain_slices == {0: 3, 1: 3}
            assert all(c.is_drained() for c in m.cpus)
            after = [c.get_context().regs["rsi"] for c in m.cpus]
            assert after[0] >= before[0] and after[1] >= before[1]


def test_closing_one_vms_vcpu_keeps_another_vms_kick_slot() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm_a, kvm.create_vm() as vm_b:
        a, b = vm_a.create_vcpu(), vm_b.create_vcpu()
        a.bind_thread()
        b.bind_thread()  # this thread now runs b (a's VM is done with it)
        a.close()
        b.run.immediate_exit = 0
        signal.pthread_kill(threading.get_ident(), KICK_SIGNAL)
        assert b.run.immediate_exit == 1  # the kick still reaches b
        b.unbind_thread()
        b.run.immediate_exit = 0
        signal.pthread_kill(threading.get_ident(), KICK_SIGNAL)
        assert b.run.immediate_exit == 0  # unbound: the handler touches nothing


def test_a_kick_pending_at_a_half_entry_survives_it(make_machine) -> None:
    m, arch, rec = make_machine(PIOLOOP)
    cpu = m.cpus[0]
    cpu.get_context().regs["rcx"] = 5
    cpu.mark_context_dirty()
    m.run(max_ticks=1, timeout=10)  # binds and unbinds; now bind here by hand
    # that run's one-tick timer may fire after its last exit (on a hardware KVM the OUT
    # exits first): its kick then stays in immediate_exit, and the first entry below would
    # return for it. Its signal was handled before run() returned, so clearing is safe.
    cpu.vcpu.run.immediate_exit = 0
    cpu.bind_thread(*m._cycle_source(cpu))
    try:
        cpu.status = CpuStatus.RUNNING
        cpu._run_slice(None)
        cpu._dispatch_exit()
        assert cpu.status is CpuStatus.RUNNING_SERVICE_COMPLETION
        signal.pthread_kill(threading.get_ident(), KICK_SIGNAL)  # a kick lands now
        cpu.half_entry()
        assert cpu.vcpu.run.immediate_exit == 1  # still pending
        signals = cpu.stats.exit_signal
        cpu._run_slice(None)  # so the next entry returns at once for it
        assert cpu.stats.exit_signal == signals + 1 and cpu.status is CpuStatus.RUNNING
        assert cpu.vcpu.run.immediate_exit == 0
    finally:
        cpu.unbind_thread()


def test_a_kvm_without_immediate_exit_is_refused_at_open(monkeypatch) -> None:
    real = Kvm.check_extension

    def no_immediate_exit(self: Kvm, cap: int) -> int:
        return 0 if cap == Cap.IMMEDIATE_EXIT else real(self, cap)

    monkeypatch.setattr(Kvm, "check_extension", no_immediate_exit)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(KvmUnavailableError, match="KVM_CAP_IMMEDIATE_EXIT.*4.11"):
        Kvm()
    assert set(os.listdir("/proc/self/fd")) == before


# --- item 7: time -------------------------------------------------------------------------

class _Stamps(Recorder):
    """Records, at each write, simulated time and host time on entry and on return; every
    tenth write takes a while (service time the guest's clocks see pass)."""

    def __init__(self, machine: Machine) -> None:
        super().__init__(machine)
        self.samples: list[tuple[int, int, int]] = []

    def write(self, offset: int, data: bytes) -> None:
        start = time.monotonic_ns()
        if offset == 3:
            self.machine.request_exit(0, "done")
        elif len(self.samples) % 10 == 9:
            time.sleep(0.001)
        self.samples.append((self.machine.eventq.cur_tick, start, time.monotonic_ns()))


# (0.5005: 500.5 ticks a ns, not whole: Python computes the time instead of the C entry)
@pytest.mark.parametrize("factor", [1.0, 2.0, 0.5005])
def test_simulated_time_follows_host_time_and_includes_service_time(factor) -> None:
    arch = RealModeArch(PIOLOOP)
    with Machine(MachineConfig(memory=0x10000, host_factor=factor), arch_plugin=arch) as m:
        dev = _Stamps(m)
        m.map_device(Range("pio", 0x10, 4, "stamps"), dev)
        m.cpus[0].get_context().regs["rcx"] = 200
        m.cpus[0].mark_context_dirty()
        tick_start, host_start = m.eventq.cur_tick, time.monotonic_ns()
        m.run(max_ticks=1000 * TICKS_PER_SECOND, timeout=60)
    per_ns = 1000 * factor
    s = dev.samples
    assert len(s) == 201
    sim0, start0, _ = s[0]
    for i, (sim, start, _) in enumerate(s):
        # never ahead of host time (what the guest's TSC and in-kernel timers follow)
        assert sim - tick_start <= (start - host_start) * per_ns
        if i:
            # and every host nanosecond up to the previous exit's service is simulated
            assert sim - sim0 >= (s[i - 1][2] - start0) * per_ns - per_ns
    assert s[-1][0] - sim0 >= 19 * 1_000_000 * per_ns  # the 19 slow services are in it


def test_a_halted_guest_waits_for_its_event_in_host_time(make_machine) -> None:
    m, arch, rec = make_machine(HALT)
    m.eventq.schedule(Event(lambda: m.request_exit(0, "event"), "wake"), 30 * TICKS_PER_MS)
    t0 = time.monotonic()
    r = m.run(timeout=10)
    assert r.reason == "event" and r.ticks == 30 * TICKS_PER_MS
    assert time.monotonic() - t0 >= 0.030  # simulated time did not run ahead of the guest's


def test_the_run_timer_is_armed_once_per_bounding_event(make_machine) -> None:
    m, arch, rec = make_machine(PIOLOOP)
    cpu = m.cpus[0]
    cpu.get_context().regs["rcx"] = 3000
    cpu.mark_context_dirty()
    m.run(max_ticks=1000 * TICKS_PER_SECOND, timeout=60)  # one bounding event: the limit
    assert cpu.stats.vm_exits == 3001
    assert 1 <= cpu.stats.timer_settime <= 2


def test_an_expired_slice_timer_is_never_lost(make_machine) -> None:
    """Events bound many slices of a spinning guest: each ends on time, none overruns
    (a lost expiry would let the guest spin to the host timeout)."""
    m, arch, rec = make_machine(SPIN)
    seen: list[int] = []

    def fire() -> None:
        seen.append(m.eventq.cur_tick)
        if len(seen) < 50:
            m.eventq.schedule_in(ev, TICKS_PER_MS // 10)

    ev = Event(fire, "every-100us")
    m.eventq.schedule(ev, TICKS_PER_MS // 10)
    r = m.run(max_ticks=10 * TICKS_PER_MS, timeout=30)
    assert r.reason == "simulated tick limit reached"
    assert seen == [(i + 1) * TICKS_PER_MS // 10 for i in range(50)]


def test_a_drain_inside_a_run_leaves_the_run_bound(make_machine) -> None:
    """A device may drain mid-run (a checkpoint request): the run keeps its timer."""
    m, arch, rec = make_machine(SPIN)
    m.eventq.schedule(Event(m.drain, "drain"), TICKS_PER_MS)
    r = m.run(max_ticks=3 * TICKS_PER_MS, timeout=10)
    assert r.reason == "simulated tick limit reached" and r.ticks == 3 * TICKS_PER_MS
    assert not m.cpus[0].bound_here  # and the run released it at its end


def test_host_time_between_a_run_and_a_drain_is_not_simulated() -> None:
    arch = _DrainingArch(COUNT)
    with Machine(MachineConfig(memory=0x10000), arch_plugin=arch) as m:
        m.run(max_ticks=TICKS_PER_MS, timeout=10)
        time.sleep(0.3)  # host time outside any run
        t0 = time.monotonic_ns()
        m.drain()  # three slices (the first ends at once for the self-kick)
        spent = time.monotonic_ns() - t0
        assert arch.drain_slices == {0: 3}
        # the drain's own host time at most, none of the 300 ms before it
        assert m.eventq.cur_tick - TICKS_PER_MS <= spent * 1000
