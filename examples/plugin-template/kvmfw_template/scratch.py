"""``scratch``: four byte-wide port registers, the smallest useful device.

=======  ====  ==========================================================
offset   r/w   meaning
=======  ====  ==========================================================
0        rw    DATA: one byte of storage
1        r     NOT: ``~DATA``
2        r     COUNT: writes to DATA so far (low 8 bits)
3        w     IRQ: 1 raises the interrupt line, 0 lowers it
=======  ====  ==========================================================

``--device scratch,port=0x520,irq=10`` (``irq=-1``: no interrupt). Wider accesses are
answered byte by byte, as an ISA device's would be.
"""

from __future__ import annotations

from typing import Any, ClassVar

from kvmfw.device import ConfigKey, Device, DeviceContext, Range, parse_int
from kvmfw.errors import StateError

DATA, NOT, COUNT, IRQ = range(4)


class Scratch(Device):
    name = "scratch"
    config: ClassVar[dict[str, ConfigKey]] = {
        "port": ConfigKey(parse_int, 0x520, "first of the 4 IO ports"),
        "irq": ConfigKey(parse_int, 10, "interrupt line (-1: none)"),
    }

    def __init__(self, ctx: DeviceContext, **params: Any) -> None:
        super().__init__(ctx, **params)
        self.line = self.optional_irq(self.params["irq"])
        self.data = 0
        self.count = 0
        self.level = 0

    def ranges(self) -> list[Range]:
        return [Range("pio", self.params["port"], 4, self.name)]

    def _read_byte(self, offset: int) -> int:
        if offset == DATA:
            return self.data
        if offset == NOT:
            return ~self.data & 0xFF
        if offset == COUNT:
            return self.count & 0xFF
        return 0

    def read(self, offset: int, size: int) -> bytes:
        self.stats["reads"] += 1
        # the bus only sends accesses inside the 4 ports; bytes past them read 0xff
        return bytes(self._read_byte(offset + i) if offset + i < 4 else 0xFF
                     for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        self.stats["writes"] += 1
        for i, byte in enumerate(data):
            reg = offset + i
            if reg == DATA:
                self.data = byte
                self.count += 1
            elif reg == IRQ:
                self._set_irq(byte & 1)
            else:
                self.stats["bad_accesses"] += 1  # read-only registers ignore writes

    def _set_irq(self, level: int) -> None:
        self.level = level
        if level:
            self.line.raise_()
        else:
            self.line.lower()

    def reset(self) -> None:
        self.data = self.count = 0
        self._set_irq(0)

    def save(self) -> dict[str, Any]:
        return {"data": self.data, "count": self.count, "level": self.level}

    def restore(self, state: dict[str, Any]) -> None:
        # a checkpoint is outside data: check every value before changing anything
        try:
            data, count, level = int(state["data"]), int(state["count"]), int(state["level"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"scratch: bad saved state: {exc}") from None
        if not (0 <= data <= 0xFF and 0 <= count < 1 << 32 and level in (0, 1)):
            raise StateError(f"scratch: saved state out of range: {state!r}")
        self.data, self.count = data, count
        self._set_irq(level)
