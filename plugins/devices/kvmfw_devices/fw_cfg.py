"""QEMU's firmware configuration device (fw_cfg): named blobs the guest firmware reads.

Register map (QEMU ``docs/specs/fw_cfg.rst``; ``linux/qemu_fw_cfg.h``)::

    x86 IO ports (space=pio, base 0x510)      ARM MMIO (space=mmio, ``virt`` layout)
    0x510  selector, 16-bit LE, write-only     +0x00 data, 1..8 bytes, string order
    0x511  data, 8-bit, read                   +0x08 selector, 16-bit BE
    0x514  DMA address, 64-bit BE: write the high half at 0x514, then the low half at 0x518
                                               +0x10 DMA address, 64-bit BE (one access, or
                                                     high then low half)

Selecting an item resets the data offset to 0; reads past an item's end return 0; data-port
writes are ignored (QEMU >= 2.4). Items: 0x00 signature ``QEMU``, 0x01 id (bit 0 traditional
interface, bit 1 DMA), 0x02 UUID, 0x03 RAM size (u64 LE), 0x04 nographic, 0x05 CPU count
(u16), 0x0f max CPUs (u16), 0x19 file directory (u32 BE count, then per file: u32 BE size,
u16 BE select, u16 reserved, char name[56]); files from 0x20 on.

DMA: the guest writes the guest-physical address of ``struct {be32 control; be32 length;
be64 address;}``; control bits 0x01 error, 0x02 read, 0x04 skip, 0x08 select (selector in
bits 31..16), 0x10 write. The device completes it at once and writes control back as 0 (or
with the error bit). As in QEMU, READ wins over WRITE, WRITE over SKIP. Every address is
checked against guest RAM; a bad one sets the error bit. The guest's 32-bit length never
sizes a host buffer: a read copies the item's bytes straight into a view of guest RAM and
zero-fills the rest in fixed chunks, a skip only moves the offset. Reading the DMA register
returns ``QEMU CFG``.

User blobs come from ``name=opt/x,file=PATH`` (or ``string=TEXT``) on the device itself and
from the machine option ``fw_cfg`` (a list of such specs, what ``--fw-cfg`` collects).
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar

from kvmfw.device import (
    ConfigKey,
    Device,
    DeviceContext,
    FirmwareNode,
    Range,
    parse_bool,
    parse_int,
    split_options,
)
from kvmfw.errors import CheckpointError, ConfigError

from kvmfw_devices import KVMFW_PLUGIN_API as KVMFW_PLUGIN_API  # checked by the core
from kvmfw_devices._util import ones, to_int

FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = 0x3FFF
FW_CFG_MAX_FILE_PATH = 56

ID_TRADITIONAL = 0x01
ID_DMA = 0x02

DMA_CTL_ERROR = 0x01
DMA_CTL_READ = 0x02
DMA_CTL_SKIP = 0x04
DMA_CTL_SELECT = 0x08
DMA_CTL_WRITE = 0x10
DMA_SIGNATURE = b"QEMU CFG"
DMA_DESC_SIZE = 16

PIO_SIZE = 12  # 0x510..0x51b: selector, data, (unused), DMA address
PIO_SELECTOR, PIO_DATA, PIO_DMA = 0, 1, 4
MMIO_SIZE = 0x18
MMIO_DATA, MMIO_SELECTOR, MMIO_DMA = 0x00, 0x08, 0x10
_ZEROS = bytes(4096)
MAX_OFFSET = 1 << 32
MAX_BLOB = 64 << 20
"""Largest user blob: far above what firmware reads (QEMU's sizes are 32-bit)."""


def parse_blob_spec(spec: str) -> tuple[str, bytes]:
    """``name=opt/x,file=PATH`` or ``name=opt/x,string=TEXT`` -> (name, contents); values
    may be quoted or escaped to hold commas (``string="a,b"``, ``file=a\\,b``)."""
    fields: dict[str, str] = {}
    for key, value in split_options(spec, "--fw-cfg"):
        if value is None:
            raise ConfigError(f"--fw-cfg {spec}: expected key=value, got {key!r}")
        fields[key] = value
    return _load_blob(fields.get("name", ""), fields.get("file"), fields.get("string"))


def _load_blob(name: str, file: str | None, string: str | None) -> tuple[str, bytes]:
    if not name:
        raise ConfigError("fw_cfg: a blob needs name=...")
    if len(name.encode()) >= FW_CFG_MAX_FILE_PATH:
        raise ConfigError(f"fw_cfg: blob name {name!r} is longer than 55 bytes")
    if (file is None) == (string is None):
        raise ConfigError(f"fw_cfg: blob {name!r} needs exactly one of file=PATH or string=TEXT")
    if string is not None:
        return name, string.encode()
    try:
        with open(file, "rb") as f:  # type: ignore[arg-type]
            data = f.read(MAX_BLOB + 1)  # bounded: the path may name /dev/zero or a FIFO
    except OSError as exc:
        raise ConfigError(f"fw_cfg: cannot read {file} for {name!r}: {exc.strerror}") from exc
    if len(data) > MAX_BLOB:
        raise ConfigError(f"fw_cfg: {file} for {name!r} is larger than {MAX_BLOB >> 20} MiB "
                          f"(give a smaller blob)")
    return name, data


def _opt_str(text: str) -> str | None:
    return text or None


class FwCfg(Device):
    """fw_cfg with the well-known items, a file directory and optional DMA."""

    name: ClassVar[str] = "fw-cfg"
    config: ClassVar[dict[str, ConfigKey]] = {
        "port": ConfigKey(parse_int, 0x510, "base IO port (or MMIO address with space=mmio)"),
        "space": ConfigKey(str, "pio", "pio (x86 ports) or mmio (ARM virt layout)"),
        "dma": ConfigKey(parse_bool, True, "offer the DMA interface"),
        "name": ConfigKey(_opt_str, None, "name of one user blob (e.g. opt/x)"),
        "file": ConfigKey(_opt_str, None, "host file holding the blob's contents"),
        "string": ConfigKey(_opt_str, None, "the blob's contents as text"),
        "uuid": ConfigKey(_opt_str, None, "machine UUID (default: all zeros)"),
    }

    def __init__(self, ctx: DeviceContext, **params: Any) -> None:
        super().__init__(ctx, **params)
        if self.params["space"] not in ("pio", "mmio"):
            raise ConfigError(f"fw-cfg: space must be pio or mmio, not {self.params['space']!r}")
        self.stats.update(selects=0, data_bytes=0, dma_transfers=0, dma_errors=0,
                          ignored_writes=0)
        self.items: dict[int, bytes] = {}
        self.files: list[tuple[str, int]] = []
        self._build_items()
        self.reset()

    # --- items -------------------------------------------------------------------------

    def _build_items(self) -> None:
        opts = self.ctx.options
        ram = int(opts.get("memory", opts.get("memory_size", self.ctx.memory.size)))
        cpus = int(opts.get("cpus", 1))
        dma = self.params["dma"]
        uid = bytes(16)
        if self.params["uuid"]:
            import uuid  # (only for a given UUID: not at every start)

            uid = uuid.UUID(self.params["uuid"]).bytes
        self.items = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", ID_TRADITIONAL | (ID_DMA if dma else 0)),
            FW_CFG_UUID: uid,
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram),
            FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
            FW_CFG_NB_CPUS: struct.pack("<H", cpus),
            FW_CFG_MAX_CPUS: struct.pack("<H", int(opts.get("max_cpus", cpus))),
        }
        blobs: list[tuple[str, bytes]] = []
        if self.params["name"] or self.params["file"] or self.params["string"]:
            blobs.append(_load_blob(self.params["name"] or "", self.params["file"],
                                    self.params["string"]))
        extra = opts.get("fw_cfg") or []
        for spec in [extra] if isinstance(extra, str) else extra:
            blobs.append(parse_blob_spec(spec))
        for name, data in blobs:
            self.add_file(name, data)

    def add_file(self, name: str, data: bytes) -> int:
        """Add a named blob; returns its selector. Names are unique."""
        if any(n == name for n, _ in self.files):
            raise ConfigError(f"fw_cfg: duplicate blob name {name!r}")
        select = FW_CFG_FILE_FIRST + len(self.files)
        self.files.append((name, select))
        self.items[select] = bytes(data)
        self.files.sort()  # the directory is sorted by name, as QEMU does
        self.items[FW_CFG_FILE_DIR] = self._directory()
        return select

    def _directory(self) -> bytes:
        out = bytearray(struct.pack(">I", len(self.files)))
        for name, select in self.files:
            out += struct.pack(">IHH56s", len(self.items[select]), select, 0,
                               name.encode()[:FW_CFG_MAX_FILE_PATH - 1])
        return bytes(out)

    # --- guest accesses -------------------------------------------------------------------

    def ranges(self) -> list[Range]:
        size = PIO_SIZE if self.params["space"] == "pio" else MMIO_SIZE
        return [Range(self.params["space"], self.params["port"], size, self.name)]

    def firmware(self) -> list[FirmwareNode]:
        """The MMIO layout in a device tree (``qemu,fw-cfg-mmio``, as QEMU's virt board).
        The x86 port layout is found by probing 0x510, so it declares nothing."""
        if self.params["space"] != "mmio":
            return []
        return [FirmwareNode("fw-cfg", "mmio", self.params["port"], MMIO_SIZE,
                             compatible=("qemu,fw-cfg-mmio",), node_name="fw-cfg",
                             dma_coherent=True)]

    def reset(self) -> None:
        self.selector = 0
        self.offset = 0
        self.dma_high = 0

    def _select(self, key: int) -> None:
        self.selector = key & 0xFFFF
        self.offset = 0
        self.stats["selects"] += 1

    def _current(self) -> bytes:
        return self.items.get(self.selector & FW_CFG_ENTRY_MASK, b"") \
            if not self.selector & FW_CFG_ARCH_LOCAL else b""

    def _advance(self, n: int) -> bytes:
        """Move the data offset ``n`` bytes on; returns the item bytes passed over (at most
        the item's length, however large ``n``)."""
        item = self._current()
        chunk = item[self.offset:self.offset + n]
        self.offset = min(self.offset + n, max(len(item), self.offset))
        self.stats["data_bytes"] += n
        return chunk

    def _data(self, n: int) -> bytes:
        """``n`` (at most 8) data-register bytes: reads past the end give zeros."""
        return self._advance(n).ljust(n, b"\0")

    def read(self, offset: int, size: int) -> bytes:
        self.stats["reads"] += 1
        pio = self.params["space"] == "pio"
        if pio and offset in (PIO_SELECTOR, PIO_DATA) and size == 1:
            return self._data(1)  # QEMU answers byte reads of either port with data
        if not pio and offset == MMIO_DATA and size in (1, 2, 4, 8):
            return self._data(size)
        dma = PIO_DMA if pio else MMIO_DMA
        if self.params["dma"] and dma <= offset and offset + size <= dma + 8 and size in (4, 8):
            o = offset - dma
            return DMA_SIGNATURE[o:o + size]
        self.stats["bad_accesses"] += 1
        return ones(size)

    def write(self, offset: int, data: bytes) -> None:
        self.stats["writes"] += 1
        size = len(data)
        pio = self.params["space"] == "pio"
        if pio and offset == PIO_SELECTOR and size == 2:
            self._select(to_int(data))
            return
        if not pio and offset == MMIO_SELECTOR and size == 2:
            self._select(int.from_bytes(data, "big"))
            return
        if (pio and offset in (PIO_SELECTOR, PIO_DATA) and size == 1) or \
                (not pio and offset == MMIO_DATA):
            self.stats["ignored_writes"] += 1  # data writes are ignored since QEMU 2.4
            return
        dma = PIO_DMA if pio else MMIO_DMA
        if self.params["dma"]:
            if offset == dma and size == 4:
                self.dma_high = int.from_bytes(data, "big")
                return
            if offset == dma + 4 and size == 4:
                self._dma((self.dma_high << 32) | int.from_bytes(data, "big"))
                self.dma_high = 0
                return
            if offset == dma and size == 8:
                self._dma(int.from_bytes(data, "big"))
                return
        self.stats["bad_accesses"] += 1

    # --- DMA ------------------------------------------------------------------------------

    def _dma(self, desc: int) -> None:
        mem = self.ctx.memory
        if not mem.contains(desc, DMA_DESC_SIZE):
            self.stats["dma_errors"] += 1  # nowhere to report it: the descriptor is not RAM
            return
        control, length, addr = struct.unpack(">IIQ", mem.read(desc, DMA_DESC_SIZE))
        self.stats["dma_transfers"] += 1
        if control & DMA_CTL_SELECT:
            self._select(control >> 16)
        error = False
        if control & DMA_CTL_READ:
            if length and not mem.contains(addr, length):
                error = True
            elif length:
                view = mem.view(addr, length)
                mem.mark_dirty(addr, length)  # DMA: KVM's dirty log does not see it
                chunk = self._advance(length)
                view[:len(chunk)] = chunk
                for off in range(len(chunk), length, len(_ZEROS)):  # past the end: zeros
                    n = min(len(_ZEROS), length - off)
                    view[off:off + n] = _ZEROS[:n]
                view.release()
        elif control & DMA_CTL_WRITE:
            error = True  # every item is read-only
        elif control & DMA_CTL_SKIP:
            self._advance(length)
        if error:
            self.stats["dma_errors"] += 1
        mem.write(desc, struct.pack(">I", DMA_CTL_ERROR if error else 0))

    # --- state ------------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        return {"selector": self.selector, "offset": self.offset, "dma_high": self.dma_high}

    def restore(self, state: dict[str, Any]) -> None:
        try:
            selector, offset, high = (int(state[k]) for k in ("selector", "offset", "dma_high"))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"fw-cfg: bad saved state ({exc!r})") from None
        self.selector = selector & 0xFFFF
        self.offset = min(max(0, offset), MAX_OFFSET)
        self.dma_high = high & 0xFFFFFFFF
