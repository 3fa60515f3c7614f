"""Dirty-page tracking (kvmfw.dirty) on real guests: KVM's log for the guest's stores,
``mark_dirty`` for kvmfw's own writes, independent trackers, bounds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import snap_arch as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from kvmtest import needs_kvm

from kvmfw.dirty import DirtyTracker, bitmap_pages, bitmap_runs
from kvmfw.errors import GuestMemoryError, StateError
from kvmfw.machine import Machine
from kvmfw.memory import PAGE_SIZE, MemoryRegion

pytestmark = needs_kvm


@pytest.fixture
def machines() -> Iterator[list[Machine]]:
    made: list[Machine] = []
    yield made
    for m in made:
        m.close()


def _make(machines: list[Machine], pages: int = 1, first: int = 1) -> tuple[Machine, sa.Ports]:
    m, ports = sa.make(pages, first)
    machines.append(m)
    return m, ports


def _ram(m: Machine) -> MemoryRegion:
    return next(r for r in m.memory if r.name == "ram")


def _pages(t: DirtyTracker, region: MemoryRegion) -> list[int]:
    return bitmap_pages(t.collect_bits().get(region, 0))


def _run(m: Machine) -> None:
    r = m.run(timeout=20)
    assert r.reason == "guest wrote the exit port", r


def test_guest_stores_are_logged_exactly(machines: list[Machine]) -> None:
    m, _ = _make(machines, pages=16, first=3)
    ram = _ram(m)
    with m.dirty_tracker() as t:
        _run(m)
        got = t.collect()
        assert len(got[ram]) == ram.size // PAGE_SIZE // 8  # sized by the region
        assert bitmap_pages(int.from_bytes(got[ram], "little")) == list(range(3, 19))
        assert _pages(t, ram) == []  # collecting reset it


def test_no_logging_without_trackers(machines: list[Machine]) -> None:
    m, _ = _make(machines)
    assert m.memory.dirty is None
    m.memory.mark_dirty(0, PAGE_SIZE)  # costs one test, records nothing
    t = m.dirty_tracker()
    assert m.memory.dirty is not None
    t.close()
    t.close()  # idempotent
    assert m.memory.dirty is None
    with pytest.raises(StateError):
        t.collect()
    # a tracker made afterwards starts clean: earlier stores are not reported
    _run(m)
    with m.dirty_tracker() as t2:
        assert all(not b for b in t2.collect_bits().values())


def test_kvmfw_writes_are_marked(machines: list[Machine]) -> None:
    m, ports = _make(machines, pages=0)
    ram = _ram(m)
    ports.dma = [(0x20000 + 5, b"x" * (2 * PAGE_SIZE))]  # device "DMA": 3 pages touched
    with m.dirty_tracker() as t:
        m.memory.write(0x8000, b"hello")
        m.memory.write_u(0x9FFE, 4, 0xAABBCCDD)  # straddles pages 9 and 10
        assert _pages(t, ram) == [8, 9, 10]
        _run(m)
        assert ports.count == 1
        assert _pages(t, ram) == [0x20, 0x21, 0x22]


def test_trackers_are_independent(machines: list[Machine]) -> None:
    m, _ = _make(machines, pages=2, first=1)
    ram = _ram(m)
    a = m.dirty_tracker()
    _run(m)
    m.memory.write(0x40000, b"a")
    b = m.dirty_tracker()
    m.memory.write(0x50000, b"b")
    assert _pages(b, ram) == [0x50]
    assert _pages(a, ram) == [1, 2, 0x40, 0x50]
    m.memory.write(0x60000, b"c")
    assert _pages(a, ram) == [0x60]
    c = m.dirty_tracker()
    b.close()
    m.memory.write(0x70000, b"d")
    assert _pages(a, ram) == [0x70]
    assert _pages(c, ram) == [0x70]
    assert m.memory.dirty is not None
    a.close()
    c.close()
    assert m.memory.dirty is None


def test_many_trackers(machines: list[Machine]) -> None:
    m, _ = _make(machines, pages=4, first=10)
    ram = _ram(m)
    trackers = [m.dirty_tracker() for _ in range(50)]
    _run(m)
    for i in range(len(trackers)):
        m.memory.write(0x80000 + i * PAGE_SIZE, b"z")
    for t in trackers:
        assert _pages(t, ram) == [10, 11, 12, 13] + [0x80 + k for k in range(50)]
    for t in trackers:
        t.close()
    assert m.memory.dirty is None


def test_mark_dirty_bounds(machines: list[Machine]) -> None:
    m, _ = _make(machines)
    ram = _ram(m)
    mem = m.memory
    with m.dirty_tracker() as t:
        for gpa, n in [(-1, 1), (0, -1), (ram.end - 1, 2), (ram.end, 1), (1 << 62, 1 << 62),
                       (0x10000000, 1)]:
            with pytest.raises(GuestMemoryError):
                mem.mark_dirty(gpa, n)
        mem.mark_dirty(0x3000, 0)  # empty: nothing
        assert _pages(t, ram) == []
        mem.mark_dirty(ram.gpa, ram.size)  # all of it, in slices not one bit at a time
        assert _pages(t, ram) == list(range(ram.size // PAGE_SIZE))
        mem.mark_dirty(0x1FFF, 2)
        mem.mark_dirty(0x10000 + 1, 40 * PAGE_SIZE)  # head bits, whole bytes, tail bits
        assert _pages(t, ram) == [1, 2] + list(range(0x10, 0x10 + 41))


def test_regions_added_and_removed_while_tracking(machines: list[Machine]) -> None:
    m, _ = _make(machines)
    assert m.vm is not None
    with m.dirty_tracker() as t:
        extra = m.vm.add_ram(0x200000, 0x10000, "extra")
        m.memory.write(0x200000 + 3 * PAGE_SIZE, b"e")
        assert _pages(t, extra) == [3]
        m.vm.remove_memory(extra)
        assert extra not in t.collect_bits()
        assert t.lost_regions


def test_readonly_rom_is_tracked_in_software(machines: list[Machine]) -> None:
    m, _ = _make(machines)
    assert m.vm is not None
    rom = MemoryRegion.anonymous(0x300000, 0x2000, "ro")
    rom.readonly = True
    m.vm.add_memory(rom)
    with m.dirty_tracker() as t:
        m.memory.mark_dirty(0x301000, 1)
        assert _pages(t, rom) == [1]


@given(st.sets(st.integers(0, 4095), max_size=300))
@settings(max_examples=200, deadline=None)
def test_bitmap_runs_match_a_naive_scan(pages: set[int]) -> None:
    bits = sum(1 << p for p in pages)
    runs = bitmap_runs(bits)
    assert bitmap_pages(bits) == sorted(pages)
    assert all(n > 0 for _, n in runs)
    assert all(a + n < b for (a, n), (b, _) in zip(runs, runs[1:], strict=False))
