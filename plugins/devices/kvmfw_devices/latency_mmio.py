"""A memory-mapped scratch memory that answers every access after a delay in simulated
ticks: timing-mode MMIO (gem5's ``RunningMMIOPending``), and the reference device for it.

``--device latency-mmio,base=0xd0000,size=0x1000,delay=1000000`` maps ``size`` bytes of
device memory at ``base``. A read or write does not complete at once: the device returns a
:class:`kvmfw.bus.PendingAccess`, schedules an event ``delay`` ticks ahead (``read_delay``
/ ``write_delay`` override it per direction) and completes the access from that event;
meanwhile the vCPU waits in ``RunningMMIOPending`` and simulated time, devices and the
other vCPUs go on. A delay of 0 answers at once (plain memory, no pending state). A
write's data lands in the memory when it completes; a read answers what the memory holds
when it completes (accesses of equal delay complete in issue order).
The API it follows is in :mod:`kvmfw.device` ("Timing-mode MMIO").

Bounds: ``size`` is at most :data:`SIZE_MAX` and ``delay`` at most :data:`DELAY_MAX`
(host configuration, checked at construction); an access outside the memory or wider than
8 bytes reads as zeros and is dropped on write, and completes at once (counted in
``bad_accesses``). The last :data:`HISTORY` accesses are kept (issue and completion tick)
for tests and stats. Host resources: none, so a fork needs no policy.
"""

from __future__ import annotations

from collections import deque
from typing import Any, ClassVar

from kvmfw.bus import PendingAccess
from kvmfw.device import ConfigKey, Device, DeviceContext, Range, parse_int
from kvmfw.errors import CheckpointError, ConfigError
from kvmfw.eventq import Event
from kvmfw.record import Frozen

from kvmfw_devices import KVMFW_PLUGIN_API as KVMFW_PLUGIN_API  # checked by the core

SIZE_MAX = 1 << 20
"""Largest device memory (bytes)."""
DELAY_MAX = 10**12
"""Largest delay: one simulated second (10^12 ticks)."""
HISTORY = 64
"""Accesses remembered in :attr:`LatencyMmio.history`."""


class Access(Frozen):
    """One completed access: ``offset``, ``size``, ``is_write`` and the ticks at which it was
    issued, was due (``issued + delay``) and completed. ``completed == due`` when the event
    queue drives time (one vCPU); in parallel mode simulated time follows host time, so the
    completion may come later than due, never earlier."""

    offset: int
    size: int
    is_write: bool
    issued: int
    due: int
    completed: int


class _Outstanding:
    __slots__ = ("pending", "offset", "data", "issued", "due", "event")

    def __init__(self, pending: PendingAccess, offset: int, data: bytes | None,
                 issued: int, due: int) -> None:
        self.due = due
        self.pending = pending
        self.offset = offset
        self.data = data
        self.issued = issued
        self.event: Event | None = None


class LatencyMmio(Device):
    """Scratch memory whose every access completes ``delay`` simulated ticks later."""

    name: ClassVar[str] = "latency-mmio"
    config: ClassVar[dict[str, ConfigKey]] = {
        "base": ConfigKey(parse_int, 0xD0000, "MMIO base address"),
        "size": ConfigKey(parse_int, 0x1000, f"bytes of device memory (at most {SIZE_MAX})"),
        "delay": ConfigKey(parse_int, 1_000_000, "ticks until an access completes"),
        "read_delay": ConfigKey(parse_int, -1, "ticks for reads (-1: delay)"),
        "write_delay": ConfigKey(parse_int, -1, "ticks for writes (-1: delay)"),
    }

    def __init__(self, ctx: DeviceContext, **params: Any) -> None:
        super().__init__(ctx, **params)
        p = self.params
        if not 0 < p["size"] <= SIZE_MAX:
            raise ConfigError(f"latency-mmio: size must be 1..{SIZE_MAX} bytes, not {p['size']}")
        if p["base"] < 0 or p["base"] + p["size"] > 1 << 64:
            raise ConfigError(f"latency-mmio: base {p['base']:#x} is outside the address space")
        for key in ("read_delay", "write_delay"):
            if p[key] == -1:
                p[key] = p["delay"]
        for key in ("delay", "read_delay", "write_delay"):
            if not 0 <= p[key] <= DELAY_MAX:
                raise ConfigError(f"latency-mmio: {key} must be 0..{DELAY_MAX} ticks, "
                                  f"not {p[key]}")
        self.mem = bytearray(p["size"])
        self._outstanding: list[_Outstanding] = []
        self.history: deque[Access] = deque(maxlen=HISTORY)
        self.stats.update(pending=0, completed=0, delay_ticks=0)

    def ranges(self) -> list[Range]:
        return [Range("mmio", self.params["base"], self.params["size"], self.name)]

    # --- guest accesses ------------------------------------------------------------------

    def _bad(self, offset: int, size: int) -> bool:
        if 0 < size <= 8 and 0 <= offset and offset + size <= len(self.mem):
            return False
        self.stats["bad_accesses"] += 1
        return True

    def read(self, offset: int, size: int) -> Any:
        self.stats["reads"] += 1
        if self._bad(offset, size):
            return bytes(size)
        if not self.params["read_delay"]:
            return bytes(self.mem[offset:offset + size])
        return self._defer(PendingAccess(size), offset, None, self.params["read_delay"])

    def write(self, offset: int, data: bytes) -> PendingAccess | None:
        self.stats["writes"] += 1
        if self._bad(offset, len(data)):
            return None
        if not self.params["write_delay"]:
            self.mem[offset:offset + len(data)] = data
            return None
        return self._defer(PendingAccess(len(data), is_write=True), offset, bytes(data),
                           self.params["write_delay"])

    def _defer(self, pending: PendingAccess, offset: int, data: bytes | None,
               delay: int) -> PendingAccess:
        eq = self.ctx.eventq
        entry = _Outstanding(pending, offset, data, eq.cur_tick, eq.cur_tick + delay)
        entry.event = Event(lambda: self._complete(entry), f"{self.name}.complete")
        self._outstanding.append(entry)
        eq.schedule(entry.event, entry.due)
        self.stats["pending"] += 1
        return pending

    def _complete(self, entry: _Outstanding) -> None:
        self._outstanding.remove(entry)
        pending, offset, data, issued = entry.pending, entry.offset, entry.data, entry.issued
        now = self.ctx.eventq.cur_tick
        if data is not None:
            self.mem[offset:offset + len(data)] = data
            answer = b""
        else:
            answer = bytes(self.mem[offset:offset + pending.size])
        self.stats["pending"] -= 1
        self.stats["completed"] += 1
        self.stats["delay_ticks"] += now - issued
        self.history.append(Access(offset, pending.size, data is not None, issued, entry.due,
                                   now))
        pending.complete(answer)

    # --- state -----------------------------------------------------------------------------

    def is_drained(self) -> bool:
        return not self._outstanding

    def reset(self) -> None:
        self.mem[:] = bytes(len(self.mem))

    def save(self) -> dict[str, Any]:
        # a drained device owes nothing: only the memory is state
        return {"mem": self.mem.hex()}

    def restore(self, state: dict[str, Any]) -> None:
        raw = state.get("mem")
        if not isinstance(raw, str) or len(raw) != 2 * len(self.mem):
            raise CheckpointError(f"latency-mmio: saved memory is not {len(self.mem)} bytes")
        try:
            self.mem[:] = bytes.fromhex(raw)
        except ValueError:
            raise CheckpointError("latency-mmio: saved memory is not hex") from None
