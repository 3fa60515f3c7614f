"""QEMU's ``isa-debug-exit``: a guest write ends the run with status ``(value << 1) | 1``.

Register map (QEMU ``hw/misc/debugexit.c``): one write-only register of ``width`` bytes at
``port`` (QEMU keys ``iobase``/``iosize`` are accepted too). A write of any size within the
range ends the run; the value is the little-endian integer written. Test kernels written for
QEMU (``-device isa-debug-exit,iobase=0xf4,iosize=0x04``) report pass/fail unchanged: the
run's status is ``(value << 1) | 1`` and the process exit status its low 8 bits, exactly
what QEMU's ``exit((value << 1) | 1)`` gives (the CLI maps it with
:func:`kvmfw.config.host_status`): value 0 exits with 1, 0x7f with 255, 0x80 with 1 again.
The status is odd, so no value ever looks like success (0). Reads answer zeros.
"""

from __future__ import annotations

from typing import Any, ClassVar

from kvmfw.device import ConfigKey, Device, DeviceContext, Range, parse_int
from kvmfw.errors import ConfigError

from kvmfw_devices import KVMFW_PLUGIN_API as KVMFW_PLUGIN_API  # checked by the core
from kvmfw_devices._state import SavedState
from kvmfw_devices._util import to_int


def exit_status(value: int) -> int:
    """The run status of a guest write of ``value``: QEMU's ``(value << 1) | 1``."""
    return (value << 1) | 1


def _opt_int(text: str) -> int | None:
    return None if text in ("", "none") else parse_int(text)


class DebugExit(Device):
    """End the run from the guest with a chosen exit status."""

    name: ClassVar[str] = "debug-exit"
    config: ClassVar[dict[str, ConfigKey]] = {
        "port": ConfigKey(parse_int, 0xF4, "IO port (or MMIO address with space=mmio)"),
        "width": ConfigKey(parse_int, 4, "register width in bytes (1, 2 or 4)"),
        "space": ConfigKey(str, "pio", "address space: pio or mmio"),
        "iobase": ConfigKey(_opt_int, None, "QEMU's name for port"),
        "iosize": ConfigKey(_opt_int, None, "QEMU's name for width"),
    }

    def __init__(self, ctx: DeviceContext, **params: Any) -> None:
        super().__init__(ctx, **params)
        if self.params["iobase"] is not None:
            self.params["port"] = self.params["iobase"]
        if self.params["iosize"] is not None:
            self.params["width"] = self.params["iosize"]
        if self.params["width"] not in (1, 2, 4):
            raise ConfigError(f"debug-exit: width (iosize) must be 1, 2 or 4 bytes, not "
                              f"{self.params['width']}")
        self.stats.update(exits=0)
        self.last_value: int | None = None

    def ranges(self) -> list[Range]:
        return [Range(self.params["space"], self.params["port"], self.params["width"], self.name)]

    def read(self, offset: int, size: int) -> bytes:
        self.stats["reads"] += 1
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.stats["writes"] += 1
        if offset + len(data) > self.params["width"] or not data:
            self.stats["bad_accesses"] += 1
            return
        value = to_int(data)
        self.last_value = value
        self.stats["exits"] += 1
        # the full value, as QEMU computes it; the 8-bit process status is the CLI's
        self.ctx.request_exit(exit_status(value), f"guest wrote {value:#x} to debug-exit")

    def reset(self) -> None:
        self.last_value = None

    def save(self) -> dict[str, Any]:
        return {"last_value": self.last_value}

    def restore(self, state: dict[str, Any]) -> None:
        self.last_value = SavedState(self.name, state).opt_int("last_value", 0, (1 << 64) - 1)
