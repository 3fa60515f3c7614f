"""The bare-metal test guest (``testguest.S``, built by ``build.sh``; binaries committed)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
TESTGUEST_BIN = HERE / "testguest.bin"
TESTGUEST_ELF = HERE / "testguest.elf"
LOAD_ADDR = 0x4000_0000
TESTDEV_BASE = 0x0B00_0000
TEST_SPI = 5
"""The SPI the irq program enables (INTID 37)."""

ENTRY = {"compute": 0x00, "regs": 0x04, "irq": 0x08, "timer": 0x0C, "psci": 0x10,
         "sysoff": 0x14, "secondary": 0x18, "ckpt": 0x1C}
"""Entry points: offsets from the load address."""
VECTORS = 0x800
