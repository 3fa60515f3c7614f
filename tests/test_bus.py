"""The bus: dispatch by range, overlap rejection, the unclaimed-access policy."""

from __future__ import annotations

import pytest

from kvmfw.bus import AddressSpace, Bus
from kvmfw.errors import BusError, BusOverlapError, DeviceError, UnclaimedAccessError


class Reg:
    def __init__(self) -> None:
        self.log: list[tuple] = []

    def read(self, offset: int, size: int) -> bytes:
        self.log.append(("r", offset, size))
        return bytes(range(offset, offset + size))

    def write(self, offset: int, data: bytes) -> None:
        self.log.append(("w", offset, data))


def test_accesses_reach_the_device_at_its_offset() -> None:
    space = AddressSpace("mmio")
    a, b = Reg(), Reg()
    space.register(0x1000, 0x100, a, "a")
    space.register(0x2000, 0x10, b, "b")
    assert space.read(0x1004, 2) == b"\x04\x05"
    space.write(0x200F, b"\x01")
    assert a.log == [("r", 4, 2)] and b.log == [("w", 0xF, b"\x01")]


def test_overlapping_ranges_are_rejected_with_both_names() -> None:
    space = AddressSpace("pio")
    space.register(0x3F8, 8, Reg(), "com1")
    with pytest.raises(BusOverlapError, match="uart2.*overlaps com1"):
        space.register(0x3FF, 2, Reg(), "uart2")
    space.register(0x400, 1, Reg(), "adjacent")  # touching is fine


def test_empty_and_out_of_space_ranges_are_rejected() -> None:
    bus = Bus()
    with pytest.raises(BusError, match="empty"):
        bus.pio.register(0x10, 0, Reg())
    with pytest.raises(BusError, match="outside"):
        bus.pio.register(0xFFFF, 2, Reg())
    with pytest.raises(BusError, match="no address space"):
        bus.space("dma")


def test_unclaimed_accesses_are_counted_and_read_all_ones() -> None:
    space = AddressSpace("pio")
    assert space.read(0x80, 4) == b"\xff\xff\xff\xff"
    space.write(0x80, b"\x01")
    assert (space.unclaimed_reads, space.unclaimed_writes) == (1, 1)


def test_access_crossing_the_end_of_a_range_is_unclaimed() -> None:
    space = AddressSpace("mmio")
    dev = Reg()
    space.register(0x1000, 4, dev)
    assert space.read(0x1002, 4) == b"\xff" * 4
    assert dev.log == [] and space.unclaimed_reads == 1


def test_fatal_policy_raises_with_address_and_data() -> None:
    space = AddressSpace("mmio", unclaimed="fatal")
    with pytest.raises(UnclaimedAccessError, match=r"mmio write at 0xfee00000 of 0100"):
        space.write(0xFEE00000, b"\x01\x00")


def test_bad_policy_name() -> None:
    with pytest.raises(BusError, match="policy"):
        AddressSpace("pio", unclaimed="panic")


def test_a_device_that_raises_becomes_a_device_error_naming_it() -> None:
    class Broken:
        def read(self, offset: int, size: int) -> bytes:
            raise RuntimeError("boom")

        def write(self, offset: int, data: bytes) -> None:
            pass

    space = AddressSpace("pio")
    space.register(0x60, 1, Broken(), "i8042")
    with pytest.raises(DeviceError, match="device i8042 raised on a 1-byte read.*boom"):
        space.read(0x60, 1)


def test_a_device_answering_the_wrong_size_is_an_error() -> None:
    class Short:
        def read(self, offset: int, size: int) -> bytes:
            return b"\x00"

        def write(self, offset: int, data: bytes) -> None:
            pass

    space = AddressSpace("pio")
    space.register(0x70, 2, Short(), "rtc")
    with pytest.raises(DeviceError, match="answered a 2-byte read .* with 1 bytes"):
        space.read(0x70, 2)


def test_unregister_frees_the_range_and_the_lookup_cache() -> None:
    space = AddressSpace("pio")
    dev = Reg()
    space.register(0x10, 1, dev)
    space.read(0x10, 1)
    space.unregister(dev)
    assert space.read(0x10, 1) == b"\xff"
    with pytest.raises(BusError):
        space.unregister(dev)


def test_a_device_mapped_after_an_unclaimed_access_is_found() -> None:
    """The lookup cache remembers misses too: a later mapping must replace them."""
    space = AddressSpace("pio")
    assert space.read(0x10, 1) == b"\xff"
    space.write(0x10, b"\x01")
    dev = Reg()
    space.register(0x10, 2, dev)
    assert space.read(0x10, 1) == b"\x00"
    space.write(0x10, b"\x03")
    assert dev.log == [("r", 0, 1), ("w", 0, b"\x03")]
    assert (space.unclaimed_reads, space.unclaimed_writes) == (1, 1)


def test_only_vcpu_mmio_reads_may_be_deferred() -> None:
    """A port read never waits (the port space's read is read_or_pending, which refuses
    a deferred answer outside MMIO); an MMIO read() refuses one too."""
    from kvmfw.bus import PendingAccess

    class Late(Reg):
        def read(self, offset: int, size: int) -> PendingAccess:  # type: ignore[override]
            return PendingAccess(size)

    pio = AddressSpace("pio")
    pio.register(0x10, 1, Late())
    for read in (pio.read, pio.read_or_pending):
        with pytest.raises(DeviceError, match="mismatched pending access"):
            read(0x10, 1)
    mmio = AddressSpace("mmio")
    mmio.register(0x1000, 8, Late())
    with pytest.raises(DeviceError, match="deferred a read"):
        mmio.read(0x1000, 4)
    assert isinstance(mmio.read_or_pending(0x1000, 4), PendingAccess)
