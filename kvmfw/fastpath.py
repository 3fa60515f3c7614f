"""The compiled exit path: exits answered in C without returning to Python.

Some exits need no Python: writes to a sink port (port 0x80, Linux's ``io_delay``),
accesses where no device is mapped under the ``ignore`` policy, reads of a register whose
value never changes, and posted writes to a register where only the last value matters.
A device declares such registers with :meth:`Device.fast_ranges` (or anyone with
:meth:`kvmfw.bus.AddressSpace.add_fast`). Registers that change only when their device
does something (a UART's line status, its control registers) are a :class:`LiveConstant`:
the device rewrites them as they change and closes one while reading it would have a side
effect, so their reads stay in C except then; the bus builds one table per machine and the
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

from typing import Any

from kvmfw.abi import ffi
from kvmfw.errors import BusError
from kvmfw.record import Frozen

SINK, CONST, LATCH, ONES = 1, 2, 4, 8
"""Range kinds (bits), as the C loop reads them."""
LIMIT = 256
"""Exits answered in C per KVM_RUN call before Python looks again (signals, stops)."""
MAX_RANGES = 128
"""Ranges in one table; accesses beyond them go to Python (counters are sized to this)."""
MAX_CONSTANT = 4096
"""The largest constant range (its bytes are copied into the table)."""
LATCHED = 3
"""The counter the C loop sets when a coalescible write waits in a latch."""
RANGE_COUNTS = 4
"""Where the per-range counters start: reads of range i at RANGE_COUNTS + 2 * i, writes
next to them."""
_COUNTS = RANGE_COUNTS + 2 * MAX_RANGES


class LiveConstant:
    """Registers whose current values their device keeps up to date for the compiled path.

    Each byte is open (reads of it are answered in C with its current value) or closed
    (reads that touch it reach the device's ``read``: one with side effects, e.g. that
    clears error bits, or one the device must see); all start closed. A read at offset
    ``o`` of ``n`` bytes is answered in C when bytes ``o .. o + n - 1`` are all open. The
    device updates them whenever a register changes, wherever it changes it (under the
    machine's lock, as all device code runs); a vCPU answering in C at that moment sees
    the old value or the new, as if its read came just before or after. Bytes are written
    one at a time: a register wider than a byte may be read half old, half new while it
    changes, so keep multi-byte registers closed unless their bytes are independent.
    """

    __slots__ = ("size", "_gate", "_value")

    def __init__(self, size: int) -> None:
        if not 0 < size <= MAX_CONSTANT:
            raise BusError(f"live constant: size {size} is not 1..{MAX_CONSTANT} bytes")
        self.size = size
        self._gate = ffi.new("uint8_t[]", size)  # C reads both
        self._value = ffi.new("uint8_t[]", size)

    def set(self, offset: int, value: int) -> None:
        """Byte ``offset`` reads ``value`` (0..255) in C from now on."""
        self._value[offset] = value
        self._gate[offset] = 1

    def set_int(self, offset: int, value: int, size: int) -> None:
        """Bytes ``offset .. offset + size - 1`` read ``value``, little-endian, in C."""
        for k in range(size):
            self._value[offset + k] = value >> (8 * k) & 0xFF
            self._gate[offset + k] = 1

    def close(self, offset: int, size: int = 1) -> None:
        """Reads that touch bytes ``offset .. offset + size - 1`` go to the device (until
        they are set again)."""
        for k in range(size):
            self._gate[offset + k] = 0

    def get(self, offset: int) -> int | None:
        """What a read of byte ``offset`` answered in C returns now; None while closed."""
        return int(self._value[offset]) if self._gate[offset] else None

    def snapshot(self) -> list[int | None]:
        """:meth:`get` of every byte, at once."""
        gate, value = bytes(ffi.buffer(self._gate)), bytes(ffi.buffer(self._value))
        return [v if g else None for g, v in zip(gate, value, strict=True)]

    def c_pointers(self) -> tuple[Any, Any]:
        """(value, gate) for the C table."""
        return self._value, self._gate


Constant = bytes | LiveConstant


class FastRange(Frozen):
    """Registers a device can answer without Python (what :meth:`Device.fast_ranges`
    returns): absolute addresses in ``space`` (``"pio"`` or ``"mmio"``), inside one of the
    device's own ranges.

    ``sink``: writes have no effect (dropped). ``constant``: reads return these bytes
    (``size`` of them; a read at offset ``o`` of ``n`` bytes gets ``constant[o:o + n]``),
    or what a :class:`LiveConstant` holds now (reads of its closed bytes go to Python).
    ``width``: the registers' width in bytes (0: any); a constant read is answered in C
    only when it is one register or part of it from its start, so the device keeps the
    say over odd accesses (a 16550's registers are 1 byte wide, a PL011's 4).
    ``coalesce``: posted writes whose only effect is the last value written: the device's
    ``write`` gets the last one before Python services any other exit. A range can be a
    sink or coalescible, not both; either can be combined with ``constant``.
    """

    space: str
    base: int
    size: int
    sink: bool = False
    constant: Constant | None = None
    coalesce: bool = False
    width: int = 0

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
        if self.width not in (0, 1, 2, 4, 8) or (self.width and self.size % self.width):
            raise BusError(f"fast range at {self.base:#x}: width {self.width} is not 1, 2, "
                           f"4 or 8 bytes dividing its size (or 0: any)")
        if isinstance(self.constant, LiveConstant):
            if self.constant.size != self.size:
                raise BusError(f"fast range at {self.base:#x}: its live constant holds "
                               f"{self.constant.size} bytes, the range {self.size}")
        elif self.constant is not None and (len(self.constant) != self.size
                                            or self.size > MAX_CONSTANT):
            raise BusError(f"fast range at {self.base:#x}: constant must be exactly size "
                           f"({self.size}) bytes, at most {MAX_CONSTANT}")


class Entry(Frozen):
    """One row of a built table: where, what, and who it belongs to (for stats)."""

    space: str
    base: int
    end: int
    kind: int
    name: str
    """The device mapping's name, or ``unclaimed``."""
    mapping: Any
    """The bus mapping (a coalescible range's writes go to its device), or None."""
    value: Constant | None
    width: int = 0
    """Register width of a constant range (see :class:`FastRange`)."""


class FastTable:
    """The C view of a table: ``ranges``/``n`` for ``kvmfw_run_fast``; it keeps alive the
    memory its ranges point at (the constants' bytes, live ones' cells)."""

    def __init__(self, entries: list[Entry]) -> None:
        entries = entries[:MAX_RANGES]
        self.entries = entries
        self.n = len(entries)
        self.latch_rows = [i for i, e in enumerate(entries) if e.kind & LATCH]
        """The rows whose writes are latched (what Python delivers when LATCHED is set)."""
        self.ranges = ffi.new("struct kvmfw_fast_range[]", max(self.n, 1))
        self._keep: list[Any] = []
        for i, e in enumerate(entries):
            r = self.ranges[i]
            r.base, r.end, r.space, r.kind = e.base, e.end, 0 if e.space == "pio" else 1, e.kind
            r.width = e.width
            if isinstance(e.value, LiveConstant):
                r.value, r.gate = e.value.c_pointers()
                self._keep.append(e.value)
            elif e.value is not None:
                buf = ffi.new("uint8_t[]", e.value)
                self._keep.append(buf)
                r.value = buf


def _word(field: str) -> int:
    try:
        off = ffi.offsetof("struct kvmfw_run_ctx", field)
    except KeyError:
        off = -1
    if off < 0 or off % 8:
        raise ImportError(f"kvmfw.abi's compiled module has no aligned kvmfw_run_ctx.{field}: "
                          "it is older than its source; reinstall kvmfw (pip install -e .)")
    return off // 8


T1, NOW, REASON = _word("t1"), _word("now"), _word("reason")
"""Indices of ``kvmfw_run_ctx`` fields in :attr:`FastState.words`: when KVM_RUN returned
(host ns), the simulated tick then (with ``ticks_per_ns_int`` set), the exit reason."""


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
        self.words = memoryview(ffi.buffer(self.ctx)).cast("B").cast("q")
        """The argument block as machine words: the run loop reads ``words[REASON]``,
        ``words[NOW]`` and ``words[T1]`` (an index costs a third of a cffi field read)."""
        self._zero = bytes(8 * _COUNTS)
        self.by_entry: dict[tuple[str, str], list[int]] = {}
        """(space, name) -> [reads, writes] answered in C since the start (for profiles)."""

    def use(self, table: FastTable | None) -> None:
        """Answer exits from ``table`` from the next entry on (None: a plain KVM_RUN)."""
        self.table = table
        c = self.ctx
        if table is None:
            c.n, c.ranges = 0, ffi.NULL
        else:
            c.n, c.ranges = table.n, table.ranges

    def take(self) -> list[int]:
        """The counters, zeroed (exits answered since the last take: they add up in C
        across entries; the vCPU folds them into its stats when it folds the C entry's)."""
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
                             fr.constant, fr.width))
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
