"""The compiled exit path: exits answered in C without returning to Python.

Some exits need no Python: writes to a sink port (port 0x80, Linux's ``io_delay``),
accesses where no device is mapped under the ``ignore`` policy, reads of a register whose
value never changes, and posted writes to a register where only the last value matters.
A device declares such registers with :meth:`Device.fast_ranges` (or anyone with
:meth:`kvmfw.bus.AddressSpace.add_fast`); the bus builds one table per machine and the
vCPU hands it to ``kvmfw_run_fast`` (``kvmfw/abi/_build.py``), which re-enters KVM at
once for every exit the table covers and returns to Python for anything else, for a kick
or the run timer (``KVM_EXIT_INTR``, as the Python loop sees them) and after at most
:data:`LIMIT` answered exits (so Ctrl-C and stop requests are seen promptly).

What the guest sees is the same either way (``--option fastpath=off`` turns the path
off; tests compare): a sink write is dropped, a constant read returns the declared bytes,
an unclaimed access does what the ``ignore`` policy does, and a coalescible write is
delivered to the device (the last one per register) before Python services the next
exit. Exits answered in C are counted in the vCPU stats (``vm_exits``, ``io``/``mmio``,
``fast_exits``) and the bus's unclaimed counters, but do not call ``pre_run``/``post_run``
hooks, which see only the exits that reach Python.

An architecture that answers some addresses itself before the bus (x86: the PCI
configuration ports, its per-CPU APIC page) reserves them
(:meth:`~kvmfw.bus.AddressSpace.reserve`) so they are never taken for unclaimed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from kvmfw.abi import ffi
from kvmfw.errors import BusError

SINK, CONST, LATCH, ONES = 1, 2, 4, 8
"""Range kinds (bits), as the C loop reads them."""
LIMIT = 256
"""Exits answered in C per KVM_RUN call before Python looks again (signals, stops)."""
MAX_RANGES = 128
"""Ranges in one table; accesses beyond them go to Python (counters are sized to this)."""
MAX_CONSTANT = 4096
"""The largest constant range (its bytes are copied into the table)."""
_COUNTS = 3 + 2 * MAX_RANGES


class FastRange(NamedTuple):  # (not a frozen dataclass: far dearer to create at import)
    """Registers a device can answer without Python (what :meth:`Device.fast_ranges`
    returns): absolute addresses in ``space`` (``"pio"`` or ``"mmio"``), inside one of the
    device's own ranges.

    ``sink``: writes have no effect (dropped). ``constant``: reads return these bytes
    (``size`` of them; a read at offset ``o`` of ``n`` bytes gets ``constant[o:o + n]``).
    ``coalesce``: posted writes whose only effect is the last value written: the device's
    ``write`` gets the last one before Python services any other exit. A range can be a
    sink or coalescible, not both; either can be combined with ``constant``.
    """

    space: str
    base: int
    size: int
    sink: bool = False
    constant: bytes | None = None
    coalesce: bool = False

    def kind(self) -> int:
        k = (SINK if self.sink else 0) | (LATCH if self.coalesce else 0)
        return k | (CONST if self.constant is not None else 0)

    def check(self) -> None:
        if self.space not in ("pio", "mmio"):
            raise BusError(f"fast range: space must be 'pio' or 'mmio', not {self.space!r}")
        if self.size <= 0 or self.base < 0:
            raise BusError(f"fast range [{self.base:#x}, +{self.size:#x}) is empty or negative")
        if self.sink and self.coalesce:
            raise BusError(f"fast range at {self.base:#x}: sink and coalesce exclude each other")
        if not self.kind():
            raise BusError(f"fast range at {self.base:#x} declares nothing (sink, constant "
                           "or coalesce)")
        if self.constant is not None and (len(self.constant) != self.size
                                          or self.size > MAX_CONSTANT):
            raise BusError(f"fast range at {self.base:#x}: constant must be exactly size "
                           f"({self.size}) bytes, at most {MAX_CONSTANT}")


class Entry(NamedTuple):
    """One row of a built table: where, what, and who it belongs to (for stats)."""

    space: str
    base: int
    end: int
    kind: int
    name: str
    """The device mapping's name, or ``unclaimed``."""
    mapping: Any
    """The bus mapping (a coalescible range's writes go to its device), or None."""
    value: bytes | None


class FastTable:
    """The C view of a table: ``ranges``/``n``/``pool`` for ``kvmfw_run_fast``."""

    def __init__(self, entries: list[Entry]) -> None:
        entries = entries[:MAX_RANGES]
        self.entries = entries
        self.n = len(entries)
        self.ranges = ffi.new("struct kvmfw_fast_range[]", max(self.n, 1))
        pool = bytearray()
        for i, e in enumerate(entries):
            r = self.ranges[i]
            r.base, r.end, r.space, r.kind = e.base, e.end, 0 if e.space == "pio" else 1, e.kind
            r.value_off = len(pool)
            if e.value is not None:
                pool += e.value
        self.pool = ffi.new("uint8_t[]", bytes(pool) or b"\0")


class FastState:
    """One vCPU's counters, coalescing latches and the argument block ``kvmfw_run_ctx``
    reads (never shared between threads)."""

    def __init__(self, fd: int, run_addr: int, run_size: int) -> None:
        self.counts = ffi.new("uint64_t[]", _COUNTS)
        self.latches = ffi.new("struct kvmfw_fast_latch[]", MAX_RANGES)
        self.ctx = ffi.new("struct kvmfw_run_ctx *")
        c = self.ctx
        c.fd, c.run, c.run_size, c.limit = fd, run_addr, run_size, LIMIT
        c.counts, c.latches = self.counts, self.latches
        self.table: FastTable | None = None
        self.use(None)
        self._view = memoryview(ffi.buffer(self.counts)).cast("B").cast("Q")
        self._zero = bytes(8 * _COUNTS)
        self.by_entry: dict[tuple[str, str], list[int]] = {}
        """(space, name) -> [reads, writes] answered in C since the start (for profiles)."""

    def use(self, table: FastTable | None) -> None:
        """Answer exits from ``table`` from the next entry on (None: a plain KVM_RUN)."""
        self.table = table
        c = self.ctx
        if table is None:
            c.n, c.ranges, c.pool = 0, ffi.NULL, ffi.NULL
        else:
            c.n, c.ranges, c.pool = table.n, table.ranges, table.pool

    def take(self) -> list[int]:
        """The counters, zeroed."""
        vals = self._view.tolist()
        ffi.memmove(self.counts, self._zero, len(self._zero))
        return vals


def build_entries(bus: Any) -> list[Entry]:
    """The table for ``bus``: declared ranges, then (``ignore`` policy) every gap no
    device and no reservation covers, per space."""
    out: list[Entry] = []
    for space in (bus.pio, bus.mmio):
        for fr, m in space.fast_ranges():
            out.append(Entry(space.name, fr.base, fr.base + fr.size, fr.kind(), m.name, m,
                             fr.constant))
        if space.unclaimed != "ignore":
            continue
        taken = sorted([(m.base, m.end) for m in space.mappings()]
                       + [(b, e) for b, e, _ in space.reserved()])
        top = space.limit if space.limit is not None else 1 << 64
        pos = 0
        for b, e in taken:
            if b > pos:
                out.append(Entry(space.name, pos, b, SINK | ONES, "unclaimed", None, None))
            pos = max(pos, e)
        if pos < top:
            out.append(Entry(space.name, pos, min(top, (1 << 64) - 1), SINK | ONES,
                             "unclaimed", None, None))
    return out
