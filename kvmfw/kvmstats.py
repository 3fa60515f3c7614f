"""KVM's own counters: the binary statistics of a VM or vCPU (``KVM_GET_STATS_FD``).

The kernel counts every exit, including the ones it handles itself (HLT, interrupt
windows, page faults, in-kernel devices, instruction emulation), which a VMM's own exit
counts never see; ``kvmfw run --profile`` shows them beside its own. The file descriptor
``KVM_GET_STATS_FD`` returns reads as: a header, an id string, one descriptor per
statistic, then the values (``Documentation/virt/kvm/api.rst``, "KVM_GET_STATS_FD").
The layout comes from the kernel and is checked before use: every offset and size is
bounded and must lie inside what the file holds, so a malformed answer raises
:class:`KvmStatsError` instead of sizing a buffer.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING

from kvmfw.abi import IOCTLS, Cap, ioctl
from kvmfw.errors import KvmError, KvmfwError
from kvmfw.record import Frozen

if TYPE_CHECKING:
    from kvmfw.kvm import Kvm

_HEADER = struct.Struct("<6I")  # flags, name_size, num_desc, id_offset, desc_offset, data_offset
_DESC = struct.Struct("<IhHII")  # flags, exponent, size, offset, bucket_size; name follows

MAX_NAME = 256
"""Longest statistic name accepted (the kernel's is 48 bytes, NUL included)."""
MAX_DESCRIPTORS = 4096
MAX_VALUES = 1 << 16
"""Most 64-bit values read in one snapshot (the kernel's vCPU set has a few hundred)."""
MAX_OFFSET = 1 << 24
"""Farthest offset of the id, the descriptors or the values accepted (16 MiB)."""

# the descriptor's flags: type (bits 0-3), unit (4-7), base (8-11)
TYPE_MASK = 0xF
TYPE_CUMULATIVE, TYPE_INSTANT, TYPE_PEAK = 0, 1, 2
UNIT_MASK = 0xF0
UNIT_SECONDS = 0x2 << 4
BASE_MASK = 0xF00
BASE_POW10 = 0


class KvmStatsError(KvmfwError):
    """The statistics file was malformed or could not be read."""


class StatDesc(Frozen):
    """One statistic: its name, kind (``flags``: type, unit, base), the power its value
    is scaled by (``exponent``), how many 64-bit values it has and where they are."""

    name: str
    flags: int
    exponent: int
    size: int
    offset: int

    @property
    def cumulative(self) -> bool:
        return self.flags & TYPE_MASK == TYPE_CUMULATIVE

    @property
    def nanoseconds(self) -> bool:
        """A time in nanoseconds (unit seconds, base 10, exponent -9)."""
        return (self.flags & UNIT_MASK == UNIT_SECONDS and self.flags & BASE_MASK == BASE_POW10
                and self.exponent == -9)


class KvmStats:
    """The statistics behind one ``KVM_GET_STATS_FD`` descriptor (owned: :meth:`close`)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:
            self.id, self.descriptors, self._data_offset, self._data_len = _parse(fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open(cls, fd: int, kvm: Kvm) -> KvmStats | None:
        """The statistics of the VM or vCPU whose descriptor is ``fd``, or None when this
        KVM (``kvm``) has no binary statistics. For a vCPU, call it while the vCPU is not
        in ``KVM_RUN``: the ioctl takes the vCPU's lock."""
        if not kvm.check_extension(Cap.BINARY_STATS_FD):
            return None
        try:
            return cls(ioctl(fd, IOCTLS.KVM_GET_STATS_FD))
        except KvmError:
            return None

    def read(self) -> dict[str, int]:
        """Each single-valued statistic's current value, by name (histograms are left out)."""
        try:
            raw = os.pread(self.fd, self._data_len, self._data_offset)
        except OSError as exc:
            raise KvmStatsError(f"cannot read KVM's statistics: {exc.strerror}") from None
        if len(raw) < self._data_len:
            raise KvmStatsError(f"KVM's statistics ended after {len(raw)} of "
                                f"{self._data_len} bytes")
        return {d.name: int.from_bytes(raw[d.offset:d.offset + 8], "little")
                for d in self.descriptors if d.size == 1}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> KvmStats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pread(fd: int, n: int, at: int, what: str) -> bytes:
    try:
        raw = os.pread(fd, n, at)
    except OSError as exc:
        raise KvmStatsError(f"cannot read KVM's statistics ({what}): {exc.strerror}") from None
    if len(raw) != n:
        raise KvmStatsError(f"KVM's statistics file is shorter than its {what}")
    return raw


def _parse(fd: int) -> tuple[str, tuple[StatDesc, ...], int, int]:
    """The id, the descriptors, and the offset and length of the values block."""
    _flags, name_size, count, id_off, desc_off, data_off = _HEADER.unpack(
        _pread(fd, _HEADER.size, 0, "header"))
    if not 0 < name_size <= MAX_NAME or count > MAX_DESCRIPTORS or any(
            not _HEADER.size <= off <= MAX_OFFSET for off in (id_off, desc_off, data_off)):
        raise KvmStatsError(f"KVM's statistics header is out of bounds (name size "
                            f"{name_size}, {count} statistics, offsets {id_off:#x} "
                            f"{desc_off:#x} {data_off:#x})")
    ident = _pread(fd, name_size, id_off, "id").split(b"\0", 1)[0].decode(errors="replace")
    step = _DESC.size + name_size
    table = _pread(fd, step * count, desc_off, "descriptors") if count else b""
    out = []
    end = 0
    for i in range(count):
        flags, exponent, size, offset, _bucket = _DESC.unpack_from(table, i * step)
        name = table[i * step + _DESC.size:(i + 1) * step].split(b"\0", 1)[0]
        if not 0 < size <= MAX_VALUES or offset % 8 or offset + 8 * size > 8 * MAX_VALUES:
            raise KvmStatsError(f"KVM's statistic {name.decode(errors='replace')!r} lies "
                                f"out of bounds ({size} values at {offset:#x})")
        out.append(StatDesc(name.decode(errors="replace"), flags, exponent, size, offset))
        end = max(end, offset + 8 * size)
    return ident, tuple(out), data_off, end
