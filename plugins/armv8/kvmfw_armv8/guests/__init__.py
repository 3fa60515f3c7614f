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

A32GUEST_BIN = HERE / "a32guest.bin"
A32GUEST_ELF = HERE / "a32guest.elf"
"""The AArch32 test guest (``a32guest.S``): one program, entered at its load address."""
A32_RESULT = 465
"""What the AArch32 guest computes with VFP and NEON (printed as ``A32 RESULT 465``)."""
A32_STATE_OK = 0xC0DE0000
"""Its report once every register set before the checkpoint write (0x28) read back."""

PERFGUEST_BIN = HERE / "perfguest.bin"
"""The perf test guest (``perfguest.S``): x0 iterations of a two-instruction loop."""


def perfguest_instructions(iterations: int) -> int:
    """Instructions the perf guest retires from entry through its done store."""
    return 2 * iterations + 3
