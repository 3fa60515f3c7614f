"""The IO/MMIO bus: address ranges of one space (port IO or MMIO) mapped to devices.

A device sees offsets relative to its own base and bytes: ``read(offset, size) -> bytes``
and ``write(offset, data)``. The bus keeps ranges sorted, rejects overlaps, remembers the
last lookups (the run loop's hot path is one dict hit and one call), counts accesses no
device claims and answers them by policy: ``ignore`` (reads return all ones, writes are
dropped) or ``fatal`` (:class:`~kvmfw.errors.UnclaimedAccessError`). Whatever a device
raises, or a read answer that is not ``size`` bytes, reaches the caller as a
:class:`~kvmfw.errors.DeviceError`, except a :class:`~kvmfw.errors.GuestError`: a device
that ends the run for the guest's doing (a guest crash report) keeps that class and status.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from kvmfw.debug import get_logger
from kvmfw.errors import (
    BusError,
    BusOverlapError,
    DeviceError,
    GuestError,
    UnclaimedAccessError,
)
from kvmfw.record import Frozen

if TYPE_CHECKING:
    from kvmfw.fastpath import FastRange, FastTable

log = get_logger("kvmfw.bus")


class PendingAccess:
    """An MMIO access a device answers later (gem5's timing mode).

    A device's ``read`` or ``write`` may return one instead of completing at once; the
    vCPU then waits in ``RunningMMIOPending`` (it does not re-enter KVM) until the device
    calls :meth:`complete`, normally from an event it scheduled, with the read's ``size``
    bytes (nothing for a write). Completing twice, or with the wrong size, is a
    :class:`~kvmfw.errors.DeviceError`. Port IO is always answered at once.
    """

    __slots__ = ("size", "is_write", "data", "done", "waiter")

    def __init__(self, size: int, is_write: bool = False) -> None:
        self.size = size
        self.is_write = is_write
        self.data = b""
        self.done = False
        self.waiter: Callable[[PendingAccess], None] | None = None
        """Set by the vCPU that waits; called once on completion."""

    def complete(self, data: bytes = b"") -> None:
        """Finish the access (with the read data); the vCPU resumes."""
        if self.done:
            raise DeviceError("a pending MMIO access was completed twice")
        if not self.is_write and len(data) != self.size:
            raise DeviceError(f"a pending {self.size}-byte MMIO read was completed with "
                              f"{len(data)} bytes")
        self.data = bytes(data)
        self.done = True
        if self.waiter is not None:
            self.waiter(self)


@runtime_checkable
class BusDevice(Protocol):
    """What the bus needs from a device."""

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> PendingAccess | None: ...


Answer = bytes | PendingAccess
"""What an MMIO read returns: the bytes, or a :class:`PendingAccess` completed later."""


class Mapping(Frozen):
    """One registered range (``end`` is exclusive)."""

    base: int
    size: int
    device: BusDevice
    name: str
    end: int


_Hit = tuple["BusDevice", int, int, Mapping]


class AddressSpace:
    """One address space (``pio`` or ``mmio``)."""

    _CACHE_LIMIT = 4096

    def __init__(self, name: str, *, unclaimed: str = "ignore", limit: int | None = None) -> None:
        if unclaimed not in ("ignore", "fatal"):
            raise BusError(
                f"unclaimed-access policy must be 'ignore' or 'fatal', not {unclaimed!r}")
        self.name = name
        self._policy = unclaimed
        self.limit = limit
        self._maps: list[Mapping] = []
        self._starts: list[int] = []
        self._cache: dict[int, _Hit | None] = {}
        """Address -> (device, base, end, mapping) or None (nothing there): a plain tuple,
        unpacked in one step on each access (three record fields cost ~60 ns more). The
        vCPU loop reads it too, for the accesses it services inline (``KvmCPU._loop``)."""
        self._fast: list[tuple[FastRange, Mapping]] = []
        self._reserved: list[tuple[int, int, str]] = []
        self.reserved_ports: frozenset[int] = frozenset()
        """The reserved addresses of a port space (:meth:`reserve`), as a set for the run
        loop's direct port IO (``KvmCPU.direct_port_io``); empty for MMIO."""
        self.on_change: Callable[[], None] | None = None
        """Called after any change the compiled exit path depends on (set by :class:`Bus`)."""
        self.unclaimed_reads = 0
        self.unclaimed_writes = 0
        if name != "mmio":
            # port IO is never pending (read_or_pending refuses a deferred answer outside
            # MMIO): a port read skips read()'s check and its frame
            self.read = self.read_or_pending  # type: ignore[method-assign,assignment]

    @property
    def unclaimed(self) -> str:
        """The unclaimed-access policy, ``ignore`` or ``fatal``."""
        return self._policy

    @unclaimed.setter
    def unclaimed(self, policy: str) -> None:
        if policy not in ("ignore", "fatal"):
            raise BusError(f"unclaimed-access policy must be 'ignore' or 'fatal', not {policy!r}")
        self._policy = policy
        self._changed()

    def _changed(self) -> None:
        self._cache.clear()
        if self.on_change is not None:
            self.on_change()

    # --- registration --------------------------------------------------------------

    def register(self, base: int, size: int, device: BusDevice, name: str | None = None) -> Mapping:
        """Map ``device`` at ``[base, base + size)``; overlaps raise :class:`BusOverlapError`."""
        label = str(name or getattr(device, "name", type(device).__name__))
        if size <= 0:
            raise BusError(f"{self.name}: {label} has an empty range at {base:#x}")
        if base < 0 or (self.limit is not None and base + size > self.limit):
            raise BusError(f"{self.name}: {label} range [{base:#x}, {base + size:#x}) is outside "
                           f"the address space")
        for m in self._maps:
            if base < m.end and m.base < base + size:
                raise BusOverlapError(
                    f"{self.name}: {label} [{base:#x}, {base + size:#x}) overlaps "
                    f"{m.name} [{m.base:#x}, {m.end:#x})")
        m = Mapping(base, size, device, label, base + size)
        i = bisect.bisect(self._starts, base)
        self._maps.insert(i, m)
        self._starts.insert(i, base)
        self._changed()
        return m

    def unregister(self, device_or_base: BusDevice | int) -> None:
        for i, m in enumerate(self._maps):
            if m.device is device_or_base or m.base == device_or_base:
                del self._maps[i]
                del self._starts[i]
                self._fast = [(f, fm) for f, fm in self._fast if fm is not m]
                self._changed()
                return
        raise BusError(f"{self.name}: nothing registered for {device_or_base!r}")

    def mappings(self) -> list[Mapping]:
        return list(self._maps)

    # --- the compiled exit path's declarations (kvmfw.fastpath) --------------------------

    def add_fast(self, fr: FastRange) -> None:
        """Declare registers answered without Python (:class:`kvmfw.fastpath.FastRange`);
        they must lie inside one mapped range, whose device they describe."""
        fr.check()
        if fr.space != self.name:
            raise BusError(f"{self.name}: fast range of space {fr.space!r}")
        end = fr.base + fr.size
        m = self.lookup(fr.base)
        if m is None or end > m.end:
            raise BusError(f"{self.name}: fast range [{fr.base:#x}, {end:#x}) is not inside "
                           "one mapped device range (map the device first)")
        for f, _ in self._fast:
            if fr.base < f.base + f.size and f.base < end:
                raise BusOverlapError(f"{self.name}: fast range [{fr.base:#x}, {end:#x}) "
                                      f"overlaps another at {f.base:#x}")
        self._fast.append((fr, m))
        self._changed()

    def fast_ranges(self) -> list[tuple[FastRange, Mapping]]:
        return list(self._fast)

    def reserve(self, base: int, size: int, name: str) -> None:
        """Addresses the architecture answers itself before the bus: the compiled path
        never takes them for unclaimed, and direct port IO leaves them to the arch."""
        if size <= 0 or base < 0 or (self.limit is not None and base + size > self.limit):
            raise BusError(f"{self.name}: reserved range {name} [{base:#x}, +{size:#x}) is "
                           "empty or outside the address space")
        self._reserved.append((base, base + size, name))
        if self.limit is not None and self.limit <= 1 << 16:
            self.reserved_ports = self.reserved_ports | frozenset(range(base, base + size))
        self._changed()

    def release(self, name: str) -> None:
        """Drop the reserved ranges named ``name`` (the arch found it need not answer them,
        e.g. no PCI host behind the PC's configuration ports): the bus and the compiled path
        take those addresses again."""
        self._reserved = [r for r in self._reserved if r[2] != name]
        if self.limit is not None and self.limit <= 1 << 16:
            self.reserved_ports = frozenset(a for b, e, _ in self._reserved for a in range(b, e))
        self._changed()

    def reserved(self) -> list[tuple[int, int, str]]:
        return list(self._reserved)

    # --- lookup and access -----------------------------------------------------------

    def lookup(self, addr: int) -> Mapping | None:
        try:
            hit = self._cache[addr]
        except KeyError:
            hit = self._fill(addr)
        return None if hit is None else hit[3]

    def _fill(self, addr: int) -> _Hit | None:
        i = bisect.bisect(self._starts, addr) - 1
        m = self._maps[i] if i >= 0 and addr < self._maps[i].end else None
        hit = None if m is None else (m.device, m.base, m.end, m)
        if len(self._cache) >= self._CACHE_LIMIT:
            self._cache.clear()
        self._cache[addr] = hit
        return hit

    def read(self, addr: int, size: int) -> bytes:
        """Read ``size`` bytes at ``addr`` from whichever device is mapped there."""
        data = self.read_or_pending(addr, size)
        if data.__class__ is PendingAccess:
            raise DeviceError(f"the device at {self.name} {addr:#x} deferred a read where "
                              "the access cannot wait (only vCPU MMIO reads may be pending)")
        return data  # type: ignore[return-value]

    def read_or_pending(self, addr: int, size: int) -> Answer:
        """:meth:`read` for the vCPU's MMIO exit: may return a :class:`PendingAccess`."""
        try:
            hit = self._cache[addr]
        except KeyError:
            hit = self._fill(addr)
        if hit is None:
            return self._unclaimed(addr, size, None)
        device, base, end, m = hit
        if addr + size > end:
            return self._unclaimed(addr, size, None)
        try:
            data = device.read(addr - base, size)
        except GuestError:
            raise  # a device ending the run for the guest's doing keeps its class and status
        except Exception as exc:
            raise self.device_raised(m, addr, size, "read", exc) from exc
        if data.__class__ is not bytes or len(data) != size:
            return self.odd_answer(m, addr, size, data)
        return data

    def write(self, addr: int, data: bytes) -> PendingAccess | None:
        """Write ``data``; returns a :class:`PendingAccess` if the device completes later."""
        try:
            hit = self._cache[addr]
        except KeyError:
            hit = self._fill(addr)
        if hit is None:
            self._unclaimed(addr, len(data), data)
            return None
        device, base, end, m = hit
        if addr + len(data) > end:
            self._unclaimed(addr, len(data), data)
            return None
        try:
            r = device.write(addr - base, data)
        except GuestError:
            raise
        except Exception as exc:
            raise self.device_raised(m, addr, len(data), "write", exc) from exc
        return None if r is None else self.write_result(m, r)

    # --- the rules on what a device may answer: here, also for the vCPU loop's inline
    # MMIO and port accesses (KvmCPU._loop), which call the device and these on odd cases

    def device_raised(self, m: Mapping, addr: int, size: int, kind: str,
                      exc: BaseException) -> DeviceError:
        """The error for a device's ``read``/``write`` that raised (not a GuestError)."""
        return DeviceError(f"device {m.name} raised on a {size}-byte {kind} of {self.name} "
                           f"{addr:#x} (offset {addr - m.base:#x}): "
                           f"{type(exc).__name__}: {exc}")

    def odd_answer(self, m: Mapping, addr: int, size: int, data: object) -> Answer:
        """A read answer that is not ``size`` bytes of :class:`bytes`: a bytearray or
        memoryview of ``size`` bytes, or a matching :class:`PendingAccess` on MMIO, is
        returned; anything else is a :class:`~kvmfw.errors.DeviceError`."""
        if data.__class__ is PendingAccess:
            if data.is_write or data.size != size or self.name != "mmio":  # type: ignore
                raise DeviceError(f"device {m.name} answered a {size}-byte read of "
                                  f"{self.name} {addr:#x} with a mismatched pending access")
            return data  # type: ignore[return-value]
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DeviceError(f"device {m.name} answered a {size}-byte read of "
                              f"{self.name} {addr:#x} with a {type(data).__name__}, "
                              "not bytes")
        if len(data) != size:
            raise DeviceError(f"device {m.name} answered a {size}-byte read of {self.name} "
                              f"{addr:#x} with {len(data)} bytes")
        return data  # type: ignore[return-value]

    def write_result(self, m: Mapping, r: object) -> PendingAccess | None:
        """What a device's ``write`` returned, when not None: a :class:`PendingAccess`
        (MMIO only, a write's) is returned; anything else is ignored."""
        if r.__class__ is not PendingAccess:
            return None
        if self.name != "mmio" or not r.is_write:  # type: ignore[attr-defined]
            raise DeviceError(f"device {m.name} deferred a {self.name} write: only MMIO "
                              "writes may be pending, as PendingAccess(size, is_write=True)")
        return r  # type: ignore[return-value]

    def _unclaimed(self, addr: int, size: int, data: bytes | None) -> bytes:
        kind = "read" if data is None else "write"
        if data is None:
            self.unclaimed_reads += 1
        else:
            self.unclaimed_writes += 1
        if self.unclaimed == "fatal":
            raise UnclaimedAccessError(
                f"unclaimed {size}-byte {self.name} {kind} at {addr:#x}"
                + ("" if data is None else f" of {data.hex()}")
                + ": no device is mapped there (use --unclaimed ignore to let it pass)")
        log.debug("unclaimed %s %s at %#x size %d", self.name, kind, addr, size)
        return b"\xff" * size


class Bus:
    """The machine's two address spaces."""

    def __init__(self, unclaimed: str = "ignore") -> None:
        self.pio = AddressSpace("pio", unclaimed=unclaimed, limit=1 << 16)
        self.mmio = AddressSpace("mmio", unclaimed=unclaimed, limit=1 << 64)
        self.fast: FastTable | None = None
        """The compiled exit path's table, built on demand (:meth:`fast_table`), dropped on
        any change to either space."""
        self.pio.on_change = self.mmio.on_change = self._drop_fast

    def _drop_fast(self) -> None:
        self.fast = None

    def fast_table(self) -> FastTable:
        """The current table for ``kvmfw_run_fast`` (built now if stale)."""
        t = self.fast
        if t is None:
            from kvmfw.fastpath import FastTable, build_entries
            t = self.fast = FastTable(build_entries(self))
        return t

    def space(self, name: str) -> AddressSpace:
        if name == "pio":
            return self.pio
        if name == "mmio":
            return self.mmio
        raise BusError(f"no address space {name!r} (use 'pio' or 'mmio')")

    @property
    def unclaimed(self) -> str:
        return self.pio.unclaimed

    @unclaimed.setter
    def unclaimed(self, policy: str) -> None:
        self.pio.unclaimed = self.mmio.unclaimed = policy
