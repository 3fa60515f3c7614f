"""The default x86 board: every spec parses and builds, and nothing overlaps."""

from __future__ import annotations

import importlib.metadata

import pytest
from conftest import make_harness
from kvmfw.bus import Bus
from kvmfw.device import parse_device_spec

from kvmfw_devices import boards


def test_x86_microvm_board_is_the_pc_without_pci_and_i8042() -> None:
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="kvmfw.boards")}
    assert eps["microvm"].load()(None) == boards.x86_microvm()
    names = [parse_device_spec(s)[0] for s in boards.x86_microvm()]
    default = [parse_device_spec(s)[0] for s in boards.x86_default()]
    assert sorted(names) == sorted(set(default) - {"pci-host", "i8042"})
    bus = _build(boards.x86_microvm())
    assert bus.pio.lookup(0x64) is None and bus.pio.lookup(0x3F8) is not None
    pm = next(parse_device_spec(s)[1] for s in boards.x86_microvm() if s.startswith("acpi-pm"))
    assert pm["timer"] == "off"  # no PM timer in its FADT, as QEMU's microvm


def test_microvm_board_is_hardware_reduced_with_its_isa_devices_in_acpi() -> None:
    """As QEMU's microvm: no PM1 block (the sleep registers instead) and COM1 and the RTC
    as ACPI devices, since the OS then sees no 8259s to take ISA interrupts through."""
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="kvmfw.devices")}
    h = make_harness()
    nodes = {}
    for spec in boards.x86_microvm():
        name, params = parse_device_spec(spec)
        dev = eps[name].load()(h.ctx, **params)
        if name == "acpi-pm":
            assert dev.reduced and [r.size for r in dev.ranges()] == [2]
        nodes.update({n.acpi_hid: n for n in dev.firmware() if n.acpi_hid})
    assert (nodes["PNP0501"].base, nodes["PNP0501"].irq, nodes["PNP0501"].irq_trigger) == \
        (0x3F8, 4, "edge")
    assert (nodes["PNP0B00"].base, nodes["PNP0B00"].size, nodes["PNP0B00"].irq) == (0x70, 2, 8)
    for spec in boards.x86_default():  # the PC keeps them to legacy probing
        name, params = parse_device_spec(spec)
        assert not any(n.acpi_hid for n in eps[name].load()(h.ctx, **params).firmware()
                       if n.kind in ("uart-16550", "cmos-rtc"))


def test_microvm_board_is_x86_only() -> None:
    from kvmfw.errors import ConfigError

    class Arm:
        arch = "armv8"

    with pytest.raises(ConfigError, match="x86 board"):
        boards.microvm_board(Arm())


def _build(specs: list[str]) -> Bus:
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="kvmfw.devices")}
    h = make_harness()
    bus = Bus(unclaimed="fatal")
    for spec in specs:
        name, params = parse_device_spec(spec)
        dev = eps[name].load()(h.ctx, **params)
        for r in dev.ranges():
            bus.space(r.space).register(r.base, r.size, dev, r.name)
    return bus


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
