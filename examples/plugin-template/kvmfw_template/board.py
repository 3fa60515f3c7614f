"""``template-pc``: a board (``--option board=template-pc``), published as a
``kvmfw.boards`` entry point. A board is the list of device specs to build; it names
devices of any installed package by spec, so it imports none of them."""

from __future__ import annotations

from typing import Any


def template_pc(machine: Any) -> list[str]:
    return [
        "uart16550,port=0x3f8,irq=4",  # from kvmfw-devices
        "debug-exit,port=0xf4",        # from kvmfw-devices
        "scratch,port=0x520,irq=10",   # this package
        "exit-counter",                # this package
    ]
