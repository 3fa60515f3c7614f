"""Driving an interrupt line to a level: the edge logic every device model shares."""

from __future__ import annotations

from kvmfw.device import IrqLine


def drive_irq(line: IrqLine, level: bool, was: bool, stats: dict[str, int]) -> bool:
    """Raise or lower ``line`` if ``level`` differs from ``was`` (counting rising edges in
    ``stats["interrupts"]``); returns ``level``, the device's new shadow of the line."""
    if level and not was:
        stats["interrupts"] += 1
        line.raise_()
    elif not level and was:
        line.lower()
    return level
