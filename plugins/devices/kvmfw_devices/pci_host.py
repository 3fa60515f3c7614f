"""PCI host bridge: bus 0's configuration space (type-0 headers), BAR sizing and decoding.

Configuration access (PCI Local Bus Specification 3.0, 3.2.2.3.2 and 6.1; PCIe ECAM)::

    mechanism #1 (x86 ports, decoded by the arch plugin or :class:`ConfigMechanism1`):
      0xcf8  CONFIG_ADDRESS, dword: enable(31) bus(23..16) device(15..11) function(10..8)
             register(7..2)
      0xcfc-0xcff  CONFIG_DATA: 1, 2 or 4 bytes of the addressed dword
    ECAM (``ecam=on``): the first 1 MiB of the MMIO aperture; offset = bus << 20 |
      device << 15 | function << 12 | register (bus 0 only)

Type-0 header: 0x00 vendor, 0x02 device, 0x04 command (IO(0) MEM(1) MASTER(2) ... INTX_DIS(10)),
0x06 status (write 1 to clear bits 15..11, 8), 0x08 revision, 0x09 class code (3 bytes),
0x0c cache line, 0x0d latency, 0x0e header type, 0x10-0x24 BARs, 0x2c subsystem vendor/id,
0x30 expansion ROM (none: 0), 0x34 capabilities (none), 0x3c interrupt line, 0x3d pin.

BARs are memory BARs (32- or 64-bit) sized the usual way: writing all ones reads back
``~(size - 1)`` with the type bits. A BAR decodes when the function's command register has
MEM set and the BAR lies in the host's MMIO aperture (``mmio_base``, ``mmio_size``), which
this device claims on the bus as its only range; accesses there are routed to the function
that decodes them (nobody: all ones, counted). IO BARs are not modelled.

Functions on bus 0: 00.0 the host bridge (1b36:0008, class 0x0600), and with ``testdev=on``
01.0 a test device (1b36:0005, class 0x00ff) with a 4 KiB 32-bit BAR 0 and a 64 KiB 64-bit
prefetchable BAR 2 backed by scratch memory. The x86 plugin decodes ports 0xcf8/0xcfc itself
and calls :meth:`PciHost.config_read` / :meth:`PciHost.config_write` (its ``PciConfigSpace``);
:class:`ConfigMechanism1` does the same decoding for anything that wants to map the ports.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar

from kvmfw.device import ConfigKey, Device, DeviceContext, Range, parse_bool, parse_int
from kvmfw.errors import CheckpointError
from kvmfw.record import Frozen

from kvmfw_devices import KVMFW_PLUGIN_API as KVMFW_PLUGIN_API  # checked by the core
from kvmfw_devices._state import SavedState
from kvmfw_devices._util import ones, to_bytes, to_int

CFG_VENDOR = 0x00
CFG_DEVICE = 0x02
CFG_COMMAND = 0x04
CFG_STATUS = 0x06
CFG_REVISION = 0x08
CFG_CLASS = 0x09
CFG_CACHE_LINE = 0x0C
CFG_LATENCY = 0x0D
CFG_HEADER_TYPE = 0x0E
CFG_BAR0 = 0x10
CFG_SUBSYS_VENDOR = 0x2C
CFG_ROM = 0x30
CFG_INT_LINE = 0x3C
CFG_INT_PIN = 0x3D
CFG_SIZE = 256
ECAM_FN_SIZE = 4096
ECAM_BUS_SIZE = 1 << 20

CMD_IO = 0x0001
CMD_MEM = 0x0002
CMD_WRITABLE = 0x0547  # IO, MEM, MASTER, PARITY, SERR, INTX_DISABLE
STATUS_W1C = 0xF900

BAR_MEM64 = 0x04
BAR_PREFETCH = 0x08

CAM_ENABLE = 0x80000000
PORT_SIZE = 8

VENDOR_REDHAT = 0x1B36
DEV_HOST_BRIDGE = 0x0008
DEV_TESTDEV = 0x0005


class Bar(Frozen):
    """One memory BAR: ``size`` is a power of two >= 16."""

    size: int
    mem64: bool = False
    prefetch: bool = False

    @property
    def flags(self) -> int:
        return (BAR_MEM64 if self.mem64 else 0) | (BAR_PREFETCH if self.prefetch else 0)


class PciFunction:
    """One function: a type-0 configuration header with write masks, and its BARs.

    Subclasses answer BAR accesses by overriding :meth:`bar_read` / :meth:`bar_write`.
    """

    def __init__(self, vendor: int, device: int, class_code: int, *, revision: int = 0,
                 bars: dict[int, Bar] | None = None, int_pin: int = 0) -> None:
        self.bars = dict(bars or {})
        self.config = bytearray(CFG_SIZE)
        self.wmask = bytearray(CFG_SIZE)
        struct.pack_into("<HH", self.config, CFG_VENDOR, vendor, device)
        struct.pack_into("<I", self.config, CFG_REVISION, (class_code << 8) | revision)
        self.config[CFG_INT_PIN] = int_pin
        struct.pack_into("<H", self.wmask, CFG_COMMAND, CMD_WRITABLE)
        self.wmask[CFG_CACHE_LINE] = self.wmask[CFG_LATENCY] = self.wmask[CFG_INT_LINE] = 0xFF
        for i, bar in self.bars.items():
            off = CFG_BAR0 + 4 * i
            self.config[off] = bar.flags
            struct.pack_into("<I", self.wmask, off, ~(bar.size - 1) & 0xFFFFFFF0)
            if bar.mem64:
                struct.pack_into("<I", self.wmask, off + 4, (~(bar.size - 1) >> 32) & 0xFFFFFFFF)
        self.power_on = bytes(self.config)

    def reset(self) -> None:
        self.config[:] = self.power_on

    def cfg_read(self, offset: int, size: int) -> int:
        """Configuration-space read (offset and size already checked by the host)."""
        if offset >= CFG_SIZE:
            return 0  # extended configuration space: nothing there
        return to_int(self.config[offset:offset + size])

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        """Configuration-space write through the write masks (status bits: write 1 to clear)."""
        if offset >= CFG_SIZE:
            return
        for i in range(size):
            o, b = offset + i, (value >> (8 * i)) & 0xFF
            self.config[o] = (self.config[o] & ~self.wmask[o]) | (b & self.wmask[o])
            if o in (CFG_STATUS, CFG_STATUS + 1):
                w1c = (STATUS_W1C >> (8 * (o - CFG_STATUS))) & 0xFF
                self.config[o] &= ~(b & w1c) & 0xFF

    def bar_address(self, i: int) -> int:
        off = CFG_BAR0 + 4 * i
        addr = struct.unpack_from("<I", self.config, off)[0] & ~0xF
        if self.bars[i].mem64:
            addr |= struct.unpack_from("<I", self.config, off + 4)[0] << 32
        return addr

    def decode(self, addr: int) -> tuple[int, int] | None:
        """``(bar, offset)`` if this function decodes memory address ``addr``."""
        if not struct.unpack_from("<H", self.config, CFG_COMMAND)[0] & CMD_MEM:
            return None
        for i, bar in self.bars.items():
            base = self.bar_address(i)
            if base and base <= addr < base + bar.size:
                return i, addr - base
        return None

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        return ones(size)

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        pass

    def save(self) -> dict[str, Any]:
        return {"config": self.config.hex()}

    def restore(self, state: SavedState | dict[str, Any]) -> None:
        """Load a state from :meth:`save` (a :class:`CheckpointError` if it is malformed)."""
        s = state if isinstance(state, SavedState) else SavedState("pci function", state)
        self.config[:] = s.raw("config", CFG_SIZE)


class PciTestDev(PciFunction):
    """A function whose BARs are scratch memory (for enumeration and BAR tests)."""

    def __init__(self) -> None:
        super().__init__(VENDOR_REDHAT, DEV_TESTDEV, 0x00FF00,
                         bars={0: Bar(0x1000), 2: Bar(0x10000, mem64=True, prefetch=True)})
        self.memory = {i: bytearray(b.size) for i, b in self.bars.items()}

    def reset(self) -> None:
        super().reset()
        for m in self.memory.values():
            m[:] = bytes(len(m))

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        m = self.memory[bar]
        return bytes(m[offset:offset + size]).ljust(size, b"\xff")

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        m = self.memory[bar]
        m[offset:offset + len(data)] = data[:max(0, len(m) - offset)]

    def save(self) -> dict[str, Any]:
        return {**super().save(), "memory": {str(i): m.hex() for i, m in self.memory.items()}}

    def restore(self, state: SavedState | dict[str, Any]) -> None:
        s = state if isinstance(state, SavedState) else SavedState("pci testdev", state)
        memory = s.sub("memory")
        raws = {i: memory.raw(str(i), len(m)) for i, m in self.memory.items()}
        super().restore(s)
        for i, m in self.memory.items():
            m[:] = raws[i]


class PciHost(Device):
    """Host bridge with bus 0: configuration space, optional ECAM, a memory aperture for BARs."""

    name: ClassVar[str] = "pci-host"
    config: ClassVar[dict[str, ConfigKey]] = {
        "ecam": ConfigKey(parse_bool, False, "put an ECAM window (bus 0, 1 MiB) at mmio_base"),
        "mmio_base": ConfigKey(parse_int, 0xC0000000, "guest-physical base of the aperture"),
        "mmio_size": ConfigKey(parse_int, 0x10000000, "aperture size (ECAM + BAR window)"),
        "testdev": ConfigKey(parse_bool, False, "add the test function at 01.0"),
    }

    def __init__(self, ctx: DeviceContext, **params: Any) -> None:
        super().__init__(ctx, **params)
        self.stats.update(config_reads=0, config_writes=0, bar_accesses=0, unclaimed_bar=0)
        self.functions: dict[int, PciFunction] = {
            0: PciFunction(VENDOR_REDHAT, DEV_HOST_BRIDGE, 0x060000)}
        if self.params["testdev"]:
            self.functions[1 << 3] = PciTestDev()
        self.reset()

    def ranges(self) -> list[Range]:
        return [Range("mmio", self.params["mmio_base"], self.params["mmio_size"], self.name)]

    @property
    def bar_window(self) -> tuple[int, int]:
        """``[start, end)`` of guest-physical addresses BARs may decode in."""
        start = self.params["mmio_base"] + (ECAM_BUS_SIZE if self.params["ecam"] else 0)
        return start, self.params["mmio_base"] + self.params["mmio_size"]

    def reset(self) -> None:
        for fn in self.functions.values():
            fn.reset()

    # --- configuration space (the x86 plugin's PciConfigSpace) ------------------------------

    def _function(self, bus: int, dev: int, fn: int) -> PciFunction | None:
        return self.functions.get((dev << 3) | fn) if bus == 0 else None

    def config_read(self, bus: int, dev: int, fn: int, offset: int, size: int) -> int:
        """Read ``size`` bytes of a function's configuration space (absent: all ones)."""
        self.stats["config_reads"] += 1
        f = self._function(bus, dev, fn)
        if f is None or size not in (1, 2, 4) or offset % size:
            return (1 << (8 * size)) - 1
        return f.cfg_read(offset, size)

    def config_write(self, bus: int, dev: int, fn: int, offset: int, size: int,
                     value: int) -> None:
        """Write a function's configuration space (absent functions ignore it)."""
        self.stats["config_writes"] += 1
        f = self._function(bus, dev, fn)
        if f is not None and size in (1, 2, 4) and not offset % size:
            f.cfg_write(offset, size, value)

    # --- the MMIO aperture: ECAM and BARs ---------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        self.stats["reads"] += 1
        if self.params["ecam"] and offset < ECAM_BUS_SIZE:
            if size not in (1, 2, 4):
                self.stats["bad_accesses"] += 1
                return ones(size)
            return to_bytes(self.config_read(*_ecam_target(offset), size), size)
        hit = self._decode(self.params["mmio_base"] + offset)
        if hit is None:
            return ones(size)
        f, bar, off = hit
        return f.bar_read(bar, off, size)

    def write(self, offset: int, data: bytes) -> None:
        self.stats["writes"] += 1
        if self.params["ecam"] and offset < ECAM_BUS_SIZE:
            if len(data) not in (1, 2, 4):
                self.stats["bad_accesses"] += 1
                return
            self.config_write(*_ecam_target(offset), len(data), to_int(data))
            return
        hit = self._decode(self.params["mmio_base"] + offset)
        if hit is not None:
            f, bar, off = hit
            f.bar_write(bar, off, data)

    def _decode(self, addr: int) -> tuple[PciFunction, int, int] | None:
        lo, hi = self.bar_window
        if lo <= addr < hi:
            for f in self.functions.values():
                hit = f.decode(addr)
                if hit is not None:
                    self.stats["bar_accesses"] += 1
                    return f, hit[0], hit[1]
        self.stats["unclaimed_bar"] += 1
        return None

    # --- state ------------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        return {"functions": {str(k): f.save() for k, f in self.functions.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        functions = SavedState(self.name, state).sub("functions")
        for k in functions.state:
            if not str(k).isdigit() or int(k) not in self.functions:
                raise CheckpointError(f"{self.name}: saved state has function {k!r}, which "
                                      "this host does not have (a foreign checkpoint)")
        # check everything before changing anything: a refused state leaves the host as it was
        subs = {k: functions.sub(str(k)) for k in self.functions if str(k) in functions.state}
        backup = {k: f.save() for k, f in self.functions.items()}
        try:
            for k, sub in subs.items():
                self.functions[k].restore(sub)
        except CheckpointError:
            for k, f in self.functions.items():
                f.restore(SavedState(self.name, backup[k]))
            raise


def _ecam_target(offset: int) -> tuple[int, int, int, int]:
    return offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 7, offset & 0xFFF


class ConfigMechanism1:
    """Ports 0xcf8-0xcff decoded onto a :class:`PciHost` (map it with ``Range("pio", 0xcf8,
    8)``); byte accesses to 0xcf8-0xcfb are not configuration cycles and are ignored."""

    def __init__(self, host: PciHost) -> None:
        self.host = host
        self.address = 0

    def _target(self, offset: int) -> tuple[int, int, int, int] | None:
        a = self.address
        if not a & CAM_ENABLE:
            return None
        return (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 7, (a & 0xFC) + offset - 4

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0 and size == 4:
            return to_bytes(self.address, 4)
        t = self._target(offset) if offset >= 4 and offset + size <= PORT_SIZE else None
        if t is None:
            return ones(size)
        return to_bytes(self.host.config_read(*t, size), size)

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0 and len(data) == 4:
            self.address = to_int(data) & 0x8FFFFFFC
            return
        t = self._target(offset) if offset >= 4 and offset + len(data) <= PORT_SIZE else None
        if t is not None:
            self.host.config_write(*t, len(data), to_int(data))
