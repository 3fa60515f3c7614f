"""In-process snapshots (kvmfw.snapshot) on real guests: reset_to puts back registers,
device state, time and exactly the pages the guest or kvmfw dirtied."""

from __future__ import annotations

import gc
import os
import resource
from collections.abc import Iterator
from typing import Any

import pytest
import snap_arch as sa
from kvmtest import needs_kvm

from kvmfw.device import Device
from kvmfw.dirty import bitmap_pages
from kvmfw.errors import CheckpointError, KvmfwError
from kvmfw.machine import Machine
from kvmfw.memory import PAGE_SIZE

pytestmark = needs_kvm
MEM = 1 << 20


@pytest.fixture
def machines() -> Iterator[list[Machine]]:
    made: list[Machine] = []
    yield made
    for m in made:
        m.close()


def _make(machines: list[Machine], pages: int = 16, first: int = 1) -> tuple[Machine, sa.Ports]:
    m, ports = sa.make(pages, first, memory=MEM)
    machines.append(m)
    return m, ports


def _copied(n: int, written: int) -> bool:
    """``reset_to`` copied back the pages the guest and kvmfw wrote. A hardware KVM (the
    nested environment's kvm_amd) logs one more page than kvm_pvm does (seen: 17 -> 18),
    so allow a page or two; the RAM comparisons are the exact check."""
    return written <= n <= written + 2


def _ram(m: Machine) -> bytes:
    return m.memory.read(0, MEM)


def _run(m: Machine) -> None:
    r = m.run(timeout=20)
    assert r.reason == "guest wrote the exit port", r


def test_reset_to_restores_pages_registers_and_time(machines: list[Machine]) -> None:
    m, _ = _make(machines, pages=16, first=2)
    snap = m.snapshot()
    ram, regs, sregs, tick = _ram(m), sa.regs_of(m), sa.sregs_of(m), m.eventq.cur_tick
    for _ in range(3):
        _run(m)
        m.memory.write(0x30000, b"kvmfw write")  # kvmfw's own writes are reset too
        assert _ram(m) != ram
        assert sa.regs_of(m) != regs
        assert _copied(m.reset_to(snap), 17)
        assert _ram(m) == ram
        assert sa.regs_of(m) == regs
        assert sa.sregs_of(m) == sregs
        assert m.eventq.cur_tick == tick
    assert m.reset_to(snap) == 0  # nothing dirtied since: nothing copied
    snap.close()


def test_zeroed_pages_are_reset_discarded_ones_too(machines: list[Machine]) -> None:
    """``GuestMemory.zero`` discards whole pages (KVM's dirty log never sees that) and
    writes the partial ones: both are reset."""
    m, _ = _make(machines, pages=0)
    m.memory.write(0x40000, b"\x5a" * 0x20000)
    snap = m.snapshot()
    ram = _ram(m)
    m.memory.zero(0x40000 + 9, 0x1E000)  # partial pages 0x40 and 0x5e, whole ones between
    assert m.memory.read(0x40000, 0x20000) == b"\x5a" * 9 + bytes(0x1E000) + \
        b"\x5a" * (0x20000 - 0x1E009)
    assert m.reset_to(snap) == 0x1F
    assert _ram(m) == ram
    snap.close()


def test_each_run_after_reset_is_the_same_run(machines: list[Machine]) -> None:
    m, _ = _make(machines, pages=8, first=1)
    snap = m.snapshot()  # before the first instruction
    ram0 = _ram(m)
    results = []
    for _ in range(5):
        _run(m)
        after = _ram(m)
        results.append((sa.regs_of(m)["rdi"], sa.regs_of(m)["rsi"], after))
        assert _copied(m.reset_to(snap), 8)
        assert _ram(m) == ram0
    assert all(r == results[0] for r in results)
    assert results[0][0] == 1 and results[0][1] == 0x5151
    assert all(results[0][2][p * PAGE_SIZE] == 1 for p in range(1, 9))


def test_device_dma_and_device_state_are_reset(machines: list[Machine]) -> None:
    m, ports = _make(machines, pages=0)
    ports.dma = [(0x40000 + 3, b"D" * (3 * PAGE_SIZE))]  # 4 pages, only kvmfw writes them
    snap = m.snapshot()
    ram0 = _ram(m)
    _run(m)
    assert ports.count == 1
    assert m.memory.read(0x40003, 1) == b"D"
    assert _copied(m.reset_to(snap), 4)
    assert ports.count == 0
    assert _ram(m) == ram0


def test_other_trackers_see_the_pages_a_reset_restores(machines: list[Machine]) -> None:
    m, _ = _make(machines, pages=4, first=5)
    snap = m.snapshot()
    ram = next(r for r in m.memory if r.name == "ram")
    _run(m)
    chain = m.dirty_tracker()  # e.g. an incremental checkpoint chain, made after the run
    m.reset_to(snap)  # pages 5..8 change back: the chain must store them again
    assert bitmap_pages(chain.collect_bits()[ram]) == [5, 6, 7, 8]
    chain.close()


def test_two_snapshots(machines: list[Machine]) -> None:
    m, _ = _make(machines, pages=3, first=1)
    a = m.snapshot()
    ram_a = _ram(m)
    _run(m)
    m.memory.write(0x50000, b"between")
    b = m.snapshot()
    ram_b, regs_b = _ram(m), sa.regs_of(m)
    m.reset_to(a)
    assert _ram(m) == ram_a
    m.reset_to(b)  # pages restored for a count as dirtied for b
    assert _ram(m) == ram_b
    assert sa.regs_of(m) == regs_b
    m.reset_to(a)
    _run(m)
    m.reset_to(b)
    assert _ram(m) == ram_b
    a.close()
    b.close()
    assert m.memory.dirty is None  # the last tracker switched KVM's logging off


def test_refusals(machines: list[Machine]) -> None:
    m, _ = _make(machines)
    other, _ = _make(machines)
    snap = m.snapshot()
    with pytest.raises(KvmfwError, match="another machine"):
        other.reset_to(snap)
    assert m.vm is not None
    extra = m.vm.add_ram(0x200000, 0x10000, "extra")
    with pytest.raises(CheckpointError, match="regions changed"):
        m.reset_to(snap)
    m.vm.remove_memory(extra)
    with pytest.raises(CheckpointError, match="regions changed"):
        m.reset_to(snap)  # the tracker lost a region: what it held is gone
    snap.close()
    with pytest.raises(KvmfwError, match="closed"):
        m.reset_to(snap)


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def test_1000_resets_leak_no_fds_or_memory(machines: list[Machine]) -> None:
    m, ports = _make(machines, pages=16)
    ports.dma = [(0x60000, b"x" * 100)]
    with m.snapshot() as snap:
        for _ in range(100):  # warm up allocators and caches
            _run(m)
            m.reset_to(snap)
        gc.collect()
        fds, rss = len(os.listdir("/proc/self/fd")), _rss_kib()
        for _ in range(1000):
            _run(m)
            m.reset_to(snap)
        gc.collect()
        assert len(os.listdir("/proc/self/fd")) == fds
        assert _rss_kib() - rss < 8 * 1024, "more than 8 MiB grown over 1000 resets"
        assert snap.resets == 1100 and _copied(snap.pages_restored // 1100, 17)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


def test_many_snapshots_close_cleanly(machines: list[Machine]) -> None:
    m, _ = _make(machines)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with m.snapshot():
            pass
    assert len(os.listdir("/proc/self/fd")) == fds
    assert m.memory.dirty is None


def test_reset_to_with_parallel_vcpus(machines: list[Machine]) -> None:
    m, _ = sa.make(8, 1, memory=MEM, cpus=2)  # 2 vCPUs: each runs on its own host thread
    machines.append(m)
    snap = m.snapshot()
    ram0 = _ram(m)
    for _ in range(3):
        _run(m)
        assert _copied(m.reset_to(snap), 8)
        assert _ram(m) == ram0
    snap.close()


class _HostState(Device):
    """A device with host state behind it (as a disk's overlay): a list the "guest"
    appends to, which the snapshot hooks put back."""

    name = "host-state"

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.items: list[int] = []
        self.calls: list[str] = []

    def snapshot_take(self) -> Any:
        self.calls.append("take")
        return list(self.items)

    def snapshot_reset(self, handle: Any) -> None:
        self.calls.append("reset")
        self.items[:] = handle

    def snapshot_release(self, handle: Any) -> None:
        self.calls.append("release")


def test_device_host_state_is_put_back_by_its_snapshot_hooks(
        machines: list[Machine]) -> None:
    m, _ = _make(machines, pages=2)
    dev = _HostState(m.device_context())
    m.add_device(dev)
    dev.items.append(1)
    with m.snapshot() as snap:
        for i in range(3):
            _run(m)
            dev.items.append(10 + i)
            m.reset_to(snap)
            assert dev.items == [1]
    assert dev.calls == ["take", "reset", "reset", "reset", "release"]
    snap.close()  # (idempotent: released once)
    assert dev.calls.count("release") == 1
