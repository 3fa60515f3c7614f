"""A third-party device package made on the fly: one module and a dist-info with an
``entry_points.txt``, put on ``PYTHONPATH`` (no pip needed). It registers exactly as
kvmfw-devices does, through the ``kvmfw.devices`` entry-point group."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

MODULE = '''
"""acme-devices: a third-party kvmfw device."""
from typing import Any, ClassVar

from kvmfw.device import ConfigKey, Device, DeviceContext, Range, parse_int

KVMFW_PLUGIN_API = (1, 0)


class Stopper(Device):
    """Any write ends the run with status ``code``."""

    name: ClassVar[str] = "acme-stopper"
    config: ClassVar[dict[str, ConfigKey]] = {
        "port": ConfigKey(parse_int, 0xF4, "IO port"),
        "code": ConfigKey(parse_int, 0x55, "exit status"),
    }

    def ranges(self) -> list[Range]:
        return [Range("pio", self.params["port"], 4, self.name)]

    def write(self, offset: int, data: bytes) -> None:
        self.stats["writes"] += 1
        self.ctx.request_exit(self.params["code"], "acme-stopper was written")
'''


def make_third_party(root: Path) -> dict[str, str]:
    """Create the package under ``root``; returns an environment that can import it."""
    site = root / "site"
    site.mkdir()
    (site / "acme_devices.py").write_text(textwrap.dedent(MODULE))
    info = site / "acme_devices-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-devices\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[kvmfw.devices]\nacme-stopper = acme_devices:Stopper\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    return env
