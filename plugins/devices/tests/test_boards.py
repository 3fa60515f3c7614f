"""The default x86 board: every spec parses and builds, and nothing overlaps."""

from __future__ import annotations

import importlib.metadata

from conftest import make_harness
from kvmfw.bus import Bus
from kvmfw.device import parse_device_spec

from kvmfw_devices import boards


def test_x86_default_board_builds_without_overlaps() -> None:
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="kvmfw.devices")}
    h = make_harness()
    bus = Bus(unclaimed="fatal")
    names = []
    for spec in boards.x86_default():
        name, params = parse_device_spec(spec)
        dev = eps[name].load()(h.ctx, **params)
        for r in dev.ranges():
            bus.space(r.space).register(r.base, r.size, dev, r.name)
        names.append(name)
    assert names[0] == "uart16550" and "debug-exit" not in names
    # a polling guest finds THRE set on COM1's LSR through the bus
    assert bus.pio.read(0x3FD, 1)[0] & 0x20
    bus.pio.write(0x3F8, b"K")
    bus.pio.write(0x3F8, b"\n")  # (console output goes out by line)
    assert h.output.getvalue() == b"K\n"


def test_default_devices_by_arch() -> None:
    assert boards.default_devices("x86", None) == boards.x86_default()
    assert boards.default_devices("armv8") == boards.armv8_default()
    assert boards.default_devices("riscv") == []


def test_armv8_board_builds() -> None:
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="kvmfw.devices")}
    h = make_harness()
    for spec in boards.armv8_default():
        name, params = parse_device_spec(spec)
        assert eps[name].load()(h.ctx, **params).ranges()
