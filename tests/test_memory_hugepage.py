"""Anonymous guest RAM sits where KVM can map it with huge pages: its host address agrees
with its guest-physical address modulo 2 MiB (as QEMU's RAM does). A misaligned region
makes KVM fall back to 4 KiB stage-2/EPT mappings for the whole slot."""

from __future__ import annotations

import pytest

from kvmfw.memory import HUGE_PAGE, PAGE_SIZE, MemoryRegion


@pytest.mark.parametrize("gpa", [0, 0x4000_0000, 0x10_0000, 0x20_1000])
def test_anonymous_ram_is_congruent_to_its_gpa_modulo_2m(gpa: int) -> None:
    regions = [MemoryRegion.anonymous(gpa, 64 << 20) for _ in range(4)]  # not by luck
    try:
        for r in regions:
            assert (r.host_addr - gpa) % HUGE_PAGE == 0
            assert len(r.view) == r.size == 64 << 20
            r.view[0] = 1
            r.view[-1] = 2  # the whole region is usable, and only it
            assert bytes(r.view[:1]) + bytes(r.view[-1:]) == b"\x01\x02"
    finally:
        for r in regions:
            r.close()
    assert all(r._map is None for r in regions)


def test_small_regions_are_mapped_exactly() -> None:
    r = MemoryRegion.anonymous(0x1000, 16 * PAGE_SIZE)
    try:
        assert len(r.view) == r.size == 16 * PAGE_SIZE
        assert r._map is not None and len(r._map) == r.size
    finally:
        r.close()


@pytest.mark.parametrize(("gpa", "size"), [(0x1000, 4 << 20), (0x200000, 2 << 20),
                                           (0x100000000, 64 << 20)])
def test_the_view_is_exactly_the_region_and_closes_twice(gpa: int, size: int) -> None:
    from kvmfw.abi import address_of, ffi

    r = MemoryRegion.anonymous(gpa, size)
    try:
        assert address_of(ffi.from_buffer(r.view)) == r.host_addr and len(r.view) == size
    finally:
        r.close()
    r.close()  # twice: no error
