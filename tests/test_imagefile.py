"""Image files mapped read-only (kvmfw.imagefile) and loaded into guest RAM from their file
(GuestMemory.load): the same bytes as a copy through the mapping, no descriptor leaked, and a
file that ends early or a range outside RAM refused."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmfw.errors import GuestMemoryError
from kvmfw.imagefile import FileMapping, map_file
from kvmfw.memory import GuestMemory, MemoryRegion


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def ram() -> Iterator[GuestMemory]:
    mem = GuestMemory()
    mem.add(MemoryRegion.anonymous(0x100000, 8 << 20))
    yield mem
    mem.close()


def test_a_mapping_reads_as_the_file_and_closes_its_descriptor(tmp_path: Path) -> None:
    f = tmp_path / "image"
    data = os.urandom(3 * 4096 + 17)
    f.write_bytes(data)
    m = map_file(f)
    assert isinstance(m, FileMapping) and bytes(m) == data and len(m) == len(data)
    fd = m.fd
    assert _fd_open(fd) and os.pread(fd, 8, 100) == data[100:108]
    m.close()
    assert not _fd_open(fd)
    m = map_file(f)
    fd = m.fd
    del m
    gc.collect()
    assert not _fd_open(fd)  # collected without close(): the descriptor goes with it


def test_empty_missing_and_directory_files(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    assert map_file(tmp_path / "empty") == b""
    with pytest.raises(FileNotFoundError):
        map_file(tmp_path / "missing")
    with pytest.raises(IsADirectoryError):
        map_file(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):  # at once: no writer awaited
        map_file(fifo)
    before = len(os.listdir("/proc/self/fd"))
    for name in ("empty", "missing", ".", "fifo"):
        try:
            map_file(tmp_path / name)
        except OSError:
            pass
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize(("offset", "length"), [(0, 5 << 20), (4096, 1), (123, 70000)])
def test_load_puts_the_files_bytes_in_ram_as_a_copy_would(
        tmp_path: Path, ram: GuestMemory, offset: int, length: int) -> None:
    data = os.urandom((5 << 20) + 4096)
    f = tmp_path / "image"
    f.write_bytes(data)
    m = map_file(f)
    assert isinstance(m, FileMapping)
    try:
        ram.load(0x200000 + 3, m.fd, offset, length)
        assert ram.read(0x200000 + 3, length) == data[offset:offset + length]
        assert ram.read(0x200000 + 3 + length, 1) == b"\0"  # and nothing past it
    finally:
        m.close()


def test_load_marks_the_pages_dirty(tmp_path: Path, ram: GuestMemory) -> None:
    f = tmp_path / "image"
    f.write_bytes(b"\x5a" * 8192)
    marked: list[tuple[int, int]] = []

    class Log:
        def mark(self, region: MemoryRegion, off: int, n: int) -> None:
            marked.append((region.gpa + off, n))

    ram.dirty = Log()  # type: ignore[assignment]  # (a dirty log's one method used here)
    with open(f, "rb") as fh:
        ram.load(0x300000, fh.fileno(), 0, 8192)
        assert marked == [(0x300000, 8192)]
        with pytest.raises(EOFError):  # what a short read wrote before it failed is dirty
            ram.load(0x400000, fh.fileno(), 4096, 8192)
    assert marked[1:] == [(0x400000, 4096)]


def test_a_file_that_ends_early_or_a_range_outside_ram_is_refused(
        tmp_path: Path, ram: GuestMemory) -> None:
    f = tmp_path / "image"
    f.write_bytes(b"x" * 1000)
    with open(f, "rb") as fh:
        with pytest.raises(EOFError, match="short"):
            ram.load(0x200000, fh.fileno(), 0, 2000)
        with pytest.raises(GuestMemoryError, match="not in guest RAM"):
            ram.load(0x100000 + (8 << 20) - 10, fh.fileno(), 0, 100)
        with pytest.raises(GuestMemoryError):
            ram.load(0x1000, fh.fileno(), 0, 10)
        ram.load(0x200000, fh.fileno(), 0, 0)  # nothing to do
