"""``GuestMemory.zero``: a range of guest RAM reads back as zeros and nothing around it
changes, whether its whole pages are discarded (anonymous RAM: ``MADV_DONTNEED``, whole
2 MiB huge pages from 2 MiB up) or written (file-backed RAM, where a discard would bring
back the file's bytes or not free a shared page at all); ranges outside one region refuse."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmfw.errors import GuestMemoryError
from kvmfw.memory import HUGE_PAGE, PAGE_SIZE, GuestMemory, MemoryRegion

FILL = 0xA5


def _rss_kib(region: MemoryRegion) -> int:
    """Resident KiB of the host mapping holding ``region`` (/proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= region.host_addr < hi
        elif inside and head == "Rss:":
            return int(line.split()[1])
    raise AssertionError("the region's mapping is not in /proc/self/smaps")


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory()
    yield m
    m.close()


def _dirtied(mem: GuestMemory, region: MemoryRegion) -> MemoryRegion:
    mem.add(region)
    region.view[:] = bytes([FILL]) * region.size
    return region


@pytest.mark.parametrize(("gpa", "size"), [(0x100000, 16 << 20), (0x20_1000, 8 << 20),
                                           (0x3000, 64 * PAGE_SIZE)])
def test_anonymous_ram_reads_zeros_and_whole_pages_are_given_back(mem: GuestMemory, gpa: int,
                                                                  size: int) -> None:
    r = _dirtied(mem, MemoryRegion.anonymous(gpa, size))
    granule = HUGE_PAGE if size >= HUGE_PAGE else PAGE_SIZE
    assert r.discard == granule
    start, length = 123, size - 123 - 77  # partial pages at both ends, whole ones between
    before = _rss_kib(r)
    mem.zero(gpa + start, length)
    v = r.view
    assert bytes(v[:start]) == bytes([FILL]) * start
    assert bytes(v[start:start + length]) == bytes(length)
    assert bytes(v[start + length:]) == bytes([FILL]) * 77
    # every whole granule inside the range was discarded (not written: it left RAM)
    first = -(-(r.host_addr + start) // granule) * granule
    last = (r.host_addr + start + length) // granule * granule
    assert before - _rss_kib(r) >= (last - first) // 1024 - 8
    v[start + 1] = 7  # a discarded page is ordinary RAM again
    assert v[start + 1] == 7 and v[start] == 0


def test_a_range_inside_one_huge_page_is_written_not_discarded(mem: GuestMemory) -> None:
    r = _dirtied(mem, MemoryRegion.anonymous(0x200000, 4 << 20))
    mem.zero(0x200000 + PAGE_SIZE, 16 * PAGE_SIZE)  # whole 4 KiB pages, no whole 2 MiB one
    assert bytes(r.view[PAGE_SIZE:17 * PAGE_SIZE]) == bytes(16 * PAGE_SIZE)
    assert bytes(r.view[:PAGE_SIZE]) == bytes(r.view[17 * PAGE_SIZE:18 * PAGE_SIZE]) \
        == bytes([FILL]) * PAGE_SIZE


@pytest.mark.parametrize("private", [True, False])
def test_file_backed_ram_is_written(mem: GuestMemory, tmp_path: Path, private: bool) -> None:
    """A private file mapping would read the file again after a discard and a shared one
    would not change: zeros are written (a shared file gets them, a private one does not)."""
    size = 8 << 20
    path = tmp_path / "ram"
    path.write_bytes(bytes([FILL]) * size)
    r = MemoryRegion.from_file(0x400000, path, private=private)
    mem.add(r)
    assert r.discard == 0
    start, length = PAGE_SIZE + 5, (5 << 20) + 3
    mem.zero(r.gpa + start, length)
    want = bytes([FILL]) * start + bytes(length) + bytes([FILL]) * (size - start - length)
    assert bytes(r.view) == want
    r.close()
    assert path.read_bytes() == (bytes([FILL]) * size if private else want)


def test_out_of_range_and_read_only_refuse(mem: GuestMemory, tmp_path: Path) -> None:
    a = _dirtied(mem, MemoryRegion.anonymous(0x10000, 16 * PAGE_SIZE))
    b = _dirtied(mem, MemoryRegion.anonymous(a.end, 16 * PAGE_SIZE))  # adjacent
    for gpa, n in [(a.gpa - 1, 2), (a.end - 1, 2), (b.end, 1), (b.end - 1, 2), (0, 1),
                   (-1, 1), (a.gpa, -1), (1 << 62, 1 << 62), (a.gpa, a.size + b.size)]:
        with pytest.raises(GuestMemoryError):
            mem.zero(gpa, n)
    assert bytes(a.view) + bytes(b.view) == bytes([FILL]) * (a.size + b.size)  # untouched
    mem.zero(a.end, 0)  # empty: nothing
    mem.zero(a.gpa, a.size)  # all of one region
    assert bytes(a.view) == bytes(a.size) and bytes(b.view) == bytes([FILL]) * b.size
    path = tmp_path / "rom"
    path.write_bytes(b"\x01" * PAGE_SIZE)
    rom = MemoryRegion.from_file(0x100000, path, readonly=True)
    mem.add(rom)
    with pytest.raises(GuestMemoryError, match="read-only"):
        mem.zero(rom.gpa, 1)
    assert bytes(rom.view) == b"\x01" * PAGE_SIZE


class _Marks:
    def __init__(self) -> None:
        self.marked: list[tuple[MemoryRegion, int, int]] = []

    def mark(self, region: MemoryRegion, offset: int, length: int) -> None:
        self.marked.append((region, offset, length))


def test_the_range_is_marked_dirty_discarded_pages_too(mem: GuestMemory) -> None:
    """KVM's dirty log never sees a discard: the whole range goes to the trackers."""
    r = _dirtied(mem, MemoryRegion.anonymous(0, 8 << 20))
    marks = _Marks()
    mem.dirty = marks  # type: ignore[assignment]
    mem.zero(0x1234, 5 << 20)
    mem.zero(0x1000, 0)
    assert marks.marked == [(r, 0x1234, 5 << 20)]


REGIONS = [(0x2000, 24 * PAGE_SIZE), (0x200000, 3 * HUGE_PAGE), (0x1000, 3 * HUGE_PAGE)]


@given(st.sampled_from(REGIONS), st.data())
@settings(max_examples=150, deadline=None)
def test_zero_matches_a_reference(where: tuple[int, int], data: st.DataObject) -> None:
    gpa, size = where
    mem = GuestMemory()
    try:
        r = MemoryRegion.anonymous(gpa, size)
        mem.add(r)
        pattern = data.draw(st.binary(min_size=1, max_size=64))
        ref = bytearray((pattern * (size // len(pattern) + 1))[:size])
        r.view[:] = ref
        for _ in range(data.draw(st.integers(1, 3))):
            off = data.draw(st.integers(0, size))
            n = data.draw(st.integers(0, size - off))
            mem.zero(gpa + off, n)
            ref[off:off + n] = bytes(n)
            assert bytes(r.view) == ref
        with pytest.raises(GuestMemoryError):
            mem.zero(gpa + data.draw(st.integers(0, size)), size + 1)
        assert bytes(r.view) == ref
    finally:
        mem.close()


def test_the_host_page_size_is_what_the_kernel_discards() -> None:
    assert PAGE_SIZE == os.sysconf("SC_PAGESIZE")
