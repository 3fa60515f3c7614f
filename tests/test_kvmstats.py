"""kvmfw.kvmstats: KVM's binary statistics, read from the real kernel and from files whose
layout is wrong in every way the parser bounds (the layout comes from outside kvmfw)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvmtest import needs_kvm

from kvmfw.kvmstats import MAX_DESCRIPTORS, KvmStats, KvmStatsError

NAME = 48


def stats_file(path: Path, descs: list[tuple[str, int, int, int, int]], values: list[int], *,
               count: int | None = None, name_size: int = NAME,
               offsets: tuple[int, int, int] | None = None, cut: int | None = None) -> int:
    """A statistics file laid out as the kernel's (header, id, descriptors, values), opened
    read-only; ``descs`` are (name, flags, exponent, size, offset)."""
    id_off = 24
    desc_off = id_off + name_size
    data_off = desc_off + len(descs) * (16 + name_size)
    if offsets is not None:
        id_off, desc_off, data_off = offsets
    head = struct.pack("<6I", 0, name_size, len(descs) if count is None else count,
                       id_off, desc_off, data_off)
    body = b"kvm-1".ljust(name_size, b"\0")
    for name, flags, exp, size, off in descs:
        body += struct.pack("<IhHII", flags, exp, size, off, 0) + name.encode().ljust(
            name_size, b"\0")
    raw = head + body + b"".join(v.to_bytes(8, "little") for v in values)
    path.write_bytes(raw[:cut])
    return os.open(path, os.O_RDONLY)


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    os.close(fd)
    return False


def test_a_well_formed_file_gives_its_single_values_by_name(tmp_path: Path) -> None:
    fd = stats_file(tmp_path / "s", [("exits", 0, 0, 1, 0), ("wait_hist", 0x24, -9, 4, 8),
                                     ("halt_wait_ns", 0x20, -9, 1, 40)], [7, 1, 2, 3, 4, 99])
    with KvmStats(fd) as s:
        assert s.id == "kvm-1"
        assert s.read() == {"exits": 7, "halt_wait_ns": 99}  # (the histogram left out)
        assert [d.cumulative for d in s.descriptors] == [True, False, True]
        assert [d.nanoseconds for d in s.descriptors] == [False, True, True]
    assert closed(fd)


@pytest.mark.parametrize("case", [
    {"count": MAX_DESCRIPTORS + 1},  # too many statistics
    {"name_size": 0},
    {"name_size": 4096},
    {"offsets": (24, 24, 1 << 30)},  # the values far beyond any real file
    {"offsets": (0, 72, 200)},  # the id inside the header
    {"cut": 30},  # the file ends in the id
    {"cut": 100},  # ... in the descriptors
])
def test_a_malformed_header_is_refused_and_the_descriptor_closed(tmp_path: Path, case) -> None:
    fd = stats_file(tmp_path / "s", [("exits", 0, 0, 1, 0)], [7], **case)
    with pytest.raises(KvmStatsError):
        KvmStats(fd)
    assert closed(fd)


@pytest.mark.parametrize("desc", [("exits", 0, 0, 0, 0),  # no values
                                  ("exits", 0, 0, 1, 4),  # misaligned
                                  ("exits", 0, 0, 0xFFFF, 0x7FFFFFF0)])  # past any bound
def test_a_statistic_out_of_bounds_is_refused(tmp_path: Path, desc) -> None:
    fd = stats_file(tmp_path / "s", [desc], [7])
    with pytest.raises(KvmStatsError):
        KvmStats(fd)
    assert closed(fd)


def test_values_shorter_than_the_descriptors_say_fail_the_read(tmp_path: Path) -> None:
    fd = stats_file(tmp_path / "s", [("exits", 0, 0, 1, 0), ("irq_exits", 0, 0, 1, 8)], [7])
    with KvmStats(fd) as s, pytest.raises(KvmStatsError, match="ended after 8 of 16"):
        s.read()


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=600))
def test_any_file_parses_or_is_refused_with_the_typed_error(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "fuzz"
    path.write_bytes(raw)
    fd = os.open(path, os.O_RDONLY)
    try:
        s = KvmStats(fd)
    except KvmStatsError:
        assert closed(fd)
        return
    with s:
        try:
            s.read()
        except KvmStatsError:
            pass


@needs_kvm
def test_the_kernel_counts_every_exit_kvmfw_saw(make_machine) -> None:
    """A real VM and vCPU: their statistics open and the vCPU's ``exits`` covers at least
    the guest's exits to kvmfw (on a hardware KVM also the ones it handled itself)."""
    from kvmtest import PIO

    from kvmfw.profile import ExitProfile

    m, _arch, _rec = make_machine(PIO)
    probe = KvmStats.open(m.vm.fd, m.vm.kvm)
    if probe is None:
        pytest.skip("this KVM has no binary statistics (KVM_CAP_BINARY_STATS_FD, Linux 5.14)")
    probe.close()
    p = ExitProfile(m)
    p.install()
    m.run(timeout=20)
    p.stop()
    seen = sum(c.stats.vm_exits for c in m.cpus)
    assert seen >= 5
    assert p.kernel["vcpu"]["exits"] >= seen
    assert "pages_4k" in p.kernel["vm"]
    text = p.report()
    assert "KVM's own counters over the run" in text and f"exits {p.kernel['vcpu']['exits']}" \
        in text
