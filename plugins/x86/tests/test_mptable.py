"""MP tables: checksums, one processor entry per vCPU, the IO-APIC."""

import struct

import pytest

from kvmfw_x86 import mptable


def test_mp_tables_for_four_cpus() -> None:
    data = mptable.build(4)
    fp = data[:16]
    assert fp[:4] == b"_MP_" and sum(fp) & 0xFF == 0
    assert struct.unpack_from("<I", fp, 4)[0] == mptable.MP_TABLE_ADDR + 16
    table = data[16:]
    length, count = struct.unpack_from("<H", table, 4)[0], struct.unpack_from("<H", table, 34)[0]
    assert table[:4] == b"PCMP" and sum(table[:length]) & 0xFF == 0
    procs = [table[44 + 20 * i:64 + 20 * i] for i in range(4)]
    assert [p[1] for p in procs] == [0, 1, 2, 3] and procs[0][3] == 3 and procs[1][3] == 1
    assert count == 4 + 1 + 1 + 15 + 2


class _Cfg:
    memory = 256 << 20


class _Machine:
    config = _Cfg()


def test_floating_pointer_is_where_linux_scans_and_e820_reserves_it() -> None:
    from kvmfw_x86 import loaders

    blob = mptable.build(8)
    base = mptable.MP_TABLE_ADDR
    # Linux's default_find_smp_config: the first KiB, 639-640 KiB, 0xF0000-0xFFFFF (and
    # the EBDA); on a 16-byte boundary
    assert 0xF0000 <= base and base + len(blob) <= 0x100000 and base % 16 == 0
    reserved = [(b, b + n) for b, n, t in loaders.e820_map(_Machine())
                if t == loaders.E820_RESERVED]
    assert any(lo <= base and base + len(blob) <= hi for lo, hi in reserved)
    # and so are the ACPI tables
    from kvmfw_x86 import acpi
    assert any(lo <= acpi.ACPI_BASE and acpi.ACPI_BASE + acpi.ACPI_SIZE <= hi
               for lo, hi in reserved)


@pytest.mark.parametrize("ncpus", [255, 256, 1024, 0])
def test_tables_refuse_cpu_counts_they_cannot_describe(ncpus: int) -> None:
    """8-bit APIC ids: 255 or more vCPUs used to end in a struct.error (an internal error);
    now a one-line ConfigError from both table builders."""
    from kvmfw.errors import ConfigError

    from kvmfw_x86 import acpi

    with pytest.raises(ConfigError, match="254"):
        mptable.build(ncpus)
    with pytest.raises(ConfigError, match="254"):
        acpi.build(ncpus)


def test_254_cpus_fit_in_the_firmware_area() -> None:
    from kvmfw_x86 import acpi

    assert len(mptable.build(254)) < 0x10000
    assert len(acpi.build(254)) <= acpi.ACPI_SIZE
