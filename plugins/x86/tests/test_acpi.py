"""ACPI tables (``acpi=on``): found and parsed the way an OS does it, from guest RAM."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from conftest import GUESTS, requires_kvm

from kvmfw_x86 import acpi, loaders, mptable


def find_rsdp(read: Any) -> int | None:
    """Scan 0xE0000-0xFFFFF on 16-byte boundaries for a valid ACPI 1.0 RSDP (as Linux's
    ``acpi_find_root_pointer`` does when there is no EBDA pointer)."""
    area = read(0xE0000, 0x20000)
    for off in range(0, len(area) - 20, 16):
        if area[off:off + 8] == b"RSD PTR " and sum(area[off:off + 20]) & 0xFF == 0:
            return 0xE0000 + off
    return None


def table(read: Any, addr: int) -> bytes:
    length = struct.unpack("<I", read(addr + 4, 4))[0]
    data = read(addr, length)
    assert sum(data) & 0xFF == 0, f"{data[:4]!r} checksum"
    return bytes(data)


def parse_madt(read: Any) -> dict[str, Any]:
    rsdp = find_rsdp(read)
    assert rsdp is not None
    rsdt_addr = struct.unpack("<I", read(rsdp + 16, 4))[0]
    rsdt = table(read, rsdt_addr)
    assert rsdt[:4] == b"RSDT"
    ptrs = struct.unpack(f"<{(len(rsdt) - 36) // 4}I", rsdt[36:])
    madts = [table(read, p) for p in ptrs if read(p, 4) == b"APIC"]
    assert len(madts) == 1
    m = madts[0]
    out: dict[str, Any] = {"lapic_addr": struct.unpack_from("<I", m, 36)[0], "cpus": [],
                           "ioapics": [], "overrides": [], "nmis": 0}
    off = 44
    while off < len(m):
        kind, length = m[off], m[off + 1]
        assert length >= 2 and off + length <= len(m)
        if kind == 0:
            _, apic_id, flags = struct.unpack_from("<BBI", m, off + 2)
            if flags & 1:
                out["cpus"].append(apic_id)
        elif kind == 1:
            out["ioapics"].append(struct.unpack_from("<BxII", m, off + 2))
        elif kind == 2:
            out["overrides"].append(struct.unpack_from("<BBIH", m, off + 2)[1:3])
        elif kind == 4:
            out["nmis"] += 1
        off += length
    return out


@pytest.mark.parametrize("ncpus", [1, 2, 4, 64])
def test_tables_checksum_and_describe_every_cpu(ncpus: int) -> None:
    blob = acpi.build(ncpus)
    mem = bytearray(0x100000)
    mem[acpi.RSDP_ADDR:acpi.RSDP_ADDR + len(blob)] = blob

    def read(a: int, n: int) -> bytes:
        return bytes(mem[a:a + n])

    assert sum(blob[:20]) & 0xFF == 0 and blob[15] == 0  # RSDP, ACPI 1.0
    madt = parse_madt(read)
    assert madt["cpus"] == list(range(ncpus))
    assert madt["lapic_addr"] == mptable.LAPIC_ADDR
    assert madt["ioapics"] == [(ncpus, mptable.IOAPIC_ADDR, 0)]
    assert madt["overrides"] == [(0, 2)] and madt["nmis"] == 1


@requires_kvm
@pytest.mark.kvm
def test_loader_installs_acpi_beside_mp_tables_only_when_asked(machine_factory: Any) -> None:
    for opt, want in (("on", True), ("off", False)):
        m, _ = machine_factory(cpus=4, acpi=opt)
        loaders.load(m, str(GUESTS / "smp.elf"), {})
        read = m.memory.read
        assert read(mptable.MP_TABLE_ADDR, 4) == b"_MP_"
        if want:
            assert parse_madt(read)["cpus"] == [0, 1, 2, 3]
        else:
            assert find_rsdp(read) is None
