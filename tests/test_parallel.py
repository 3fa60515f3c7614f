"""Parallel mode: with several vCPUs, each runs KVM on its own host thread."""

from __future__ import annotations

import threading

import pytest
from kvmtest import COUNT, HALT, PIO, TRIPLE, needs_kvm

from kvmfw.cpu import CpuStatus
from kvmfw.errors import TripleFaultError
from kvmfw.eventq import TICKS_PER_MS, Event

pytestmark = needs_kvm


def test_two_vcpus_run_at_once_on_their_own_threads(make_machine) -> None:
    m, arch, rec = make_machine(COUNT, cpus=2)
    m.cpus[1].start_active = True
    idents: list[int | None] = []

    def sample() -> None:
        idents.extend(c.vcpu.thread_ident for c in m.cpus)

    m.eventq.schedule(Event(sample, "sample"), 10 * TICKS_PER_MS)
    # simulated time follows host time: a slow (nested) host may end a run before a thread
    # entered KVM, so runs are repeated until both vCPUs have counted
    for _ in range(100):
        result = m.run(max_ticks=100 * TICKS_PER_MS, timeout=20)
        assert result.reason == "simulated tick limit reached"
        counts = [c.get_context().regs["rsi"] for c in m.cpus]
        if all(n > 0 for n in counts):
            break
    assert all(n > 0 for n in counts), counts  # both guests made progress
    assert len(set(idents)) == 2 and threading.get_ident() not in idents
    assert all(c.status is CpuStatus.RUNNING for c in m.cpus)


def test_secondary_cpus_wait_until_started(make_machine) -> None:
    """A vCPU that was not started stays out of KVM while the others run. No time budget:
    vCPU 0 runs its guest to a halt and the run ends then (it ran 5 ms slices until vCPU 0
    had counted, and a slow nested host ended every slice before vCPU 0 entered KVM)."""
    m, arch, rec = make_machine(HALT, cpus=2)  # cpu1 not start_active
    result = m.run(timeout=60)
    assert result.reason == "all vCPUs halted and no event is pending"
    c0, c1 = m.cpus
    c0.fold_stats()
    c1.fold_stats()
    assert c0.halted and c0.stats.vm_exits > 0
    assert not c1.halted and c1.stats.vm_exits == 0 and c1.status is CpuStatus.IDLE


def test_a_device_stop_from_a_vcpu_thread_ends_the_parallel_run(make_machine) -> None:
    m, arch, rec = make_machine(PIO, cpus=2)
    result = m.run(timeout=20)
    assert result.reason == "guest wrote the exit port"
    assert rec.writes[:3] == [(0, b"O"), (0, b"K"), (0, b"B")]


def test_all_vcpus_halted_ends_the_parallel_run(make_machine) -> None:
    m, arch, rec = make_machine(HALT, cpus=2)
    m.cpus[1].start_active = True
    result = m.run(timeout=20)
    assert result.reason == "all vCPUs halted and no event is pending"
    assert all(c.halted for c in m.cpus)


def test_an_error_on_a_vcpu_thread_reaches_the_caller(make_machine) -> None:
    m, arch, rec = make_machine(TRIPLE, cpus=2)
    with pytest.raises(TripleFaultError):
        m.run(timeout=20)


def test_a_vcpu_stuck_in_a_device_is_reported_not_waited_for(make_machine) -> None:
    import time

    from kvmfw.errors import KvmfwError

    m, arch, rec = make_machine(PIO, cpus=2)
    release = threading.Event()

    def stuck_write(offset: int, data: bytes) -> None:
        release.wait(30)  # a host call that never returns (e.g. a console pipe nobody reads)

    rec.write = stuck_write  # type: ignore[method-assign]
    t0 = time.monotonic()
    with pytest.raises(KvmfwError, match=r"vcpu0 did not stop within 5 s \(.*stuck_write"):
        m.run(timeout=0.5)
    assert time.monotonic() - t0 < 15
    release.set()


def test_the_shared_coalesced_ring_is_replayed_once_under_the_lock(make_machine) -> None:
    from kvmtest import MMIOLOOP

    m, arch, rec = make_machine(MMIOLOOP, cpus=2, use_coalesced_mmio=True)
    m.vm.register_coalesced_mmio(0x20000, 0x100)
    m.cpus[1].start_active = True
    n = 3000
    for cpu in m.cpus:
        cpu.get_context().regs["rcx"] = n
        cpu.mark_context_dirty()
    unlocked: list[str] = []
    done: list[int] = []
    record = rec.write

    def write(offset: int, data: bytes) -> None:
        if not m.lock._is_owned():  # type: ignore[attr-defined]
            unlocked.append(threading.current_thread().name)
        if offset == 3:
            done.append(1)
            if len(done) == 2:
                m.request_exit(0, "both done")
            return
        record(offset, data)

    rec.write = write  # type: ignore[method-assign]
    result = m.run(timeout=60)
    assert result.reason in ("both done", "all vCPUs halted and no event is pending")
    assert unlocked == []  # every device call from a vCPU thread held the machine lock
    # each store replayed exactly once: no entry twice, none lost
    assert [w for w in rec.writes if w[0] == 0x10] == [(0x10, b"\x09")] * (2 * n)
    total = sum(c.stats.coalesced_mmio + c.stats.mmio for c in m.cpus)
    assert total == 2 * n and sum(c.stats.coalesced_mmio for c in m.cpus) > 0
