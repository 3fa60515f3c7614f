"""String IO: the guest-driven element count is bounded by KVM's data page (issue 10)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import requires_kvm
from kvmfw.cpu import IoExit
from kvmfw.device import Range
from kvmfw.errors import InternalKvmError

from kvmfw_x86.pio import PortIo

pytestmark = [requires_kvm, pytest.mark.kvm]


class Fifo:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.reads = 0

    def read(self, offset: int, size: int) -> bytes:
        self.reads += 1
        return b"\xA5" * size

    def write(self, offset: int, data: bytes) -> None:
        self.written.append(data)


@pytest.mark.parametrize("size, count, off", [(1, 100_000, 16), (4, 1025, 0), (2, 40, 32),
                                              (3, 2, 0), (4, 0, 0), (1, 2, -8)])
def test_string_io_count_is_bounded_by_the_data_page(machine_factory, size: int, count: int,
                                                     off: int) -> None:
    """A string-IO exit whose elements reach outside the data page (or past the mapping)
    is a typed error before any device sees an element: never a loop over a guest-sized
    count, never a slice assignment past the mapping."""
    m, _ = machine_factory()
    fifo = Fifo()
    m.map_device(Range("pio", 0xE8, 4, "fifo"), fifo)
    view = memoryview(bytearray(64))
    cpu = SimpleNamespace(vcpu=SimpleNamespace(run_map=view))
    pio = PortIo(m)
    for direction in (0, 1):
        for port in (0xE8, 0xCFC):
            with pytest.raises(InternalKvmError, match="outside KVM's"):
                pio.handle(cpu, IoExit((direction, size, port, count, off)))
    assert fifo.written == [] and fifo.reads == 0


def test_string_io_up_to_a_full_page_is_served(machine_factory) -> None:
    m, _ = machine_factory()
    fifo = Fifo()
    m.map_device(Range("pio", 0xE8, 4, "fifo"), fifo)
    view = memoryview(bytearray(8192))
    cpu = SimpleNamespace(vcpu=SimpleNamespace(run_map=view))
    pio = PortIo(m)
    assert pio.handle(cpu, IoExit((0, 4, 0xE8, 1024, 4096)))
    assert bytes(view[4096:]) == b"\xA5" * 4096 and fifo.reads == 1024
