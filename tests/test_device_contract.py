"""The device contract's shared pieces: specs, config schemas, IRQ lines, stats, flags."""

from __future__ import annotations

import json
import logging

import pytest

from kvmfw import debug
from kvmfw.device import (
    CallbackIrqLine,
    ConfigKey,
    Device,
    FirmwareNode,
    firmware_nodes,
    parse_bool,
    parse_device_spec,
    parse_int,
)
from kvmfw.errors import ConfigError
from kvmfw.stats import KvmCpuStats, StatsRegistry


def test_device_spec_parsing() -> None:
    assert parse_device_spec("uart16550,port=0x3f8,irq=4") == (
        "uart16550", {"port": "0x3f8", "irq": "4"})
    assert parse_device_spec("debug-exit") == ("debug-exit", {})
    assert parse_device_spec("fw_cfg,file-name=a=b") == ("fw_cfg", {"file_name": "a=b"})
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_device_spec("uart16550,0x3f8")
    with pytest.raises(ConfigError, match="empty"):
        parse_device_spec(" , ")


class Thing(Device):
    name = "thing"
    config = {"port": ConfigKey(parse_int, 0x10, "base port"),
              "verbose": ConfigKey(parse_bool, False, "log accesses")}


def test_config_schema_fills_defaults_converts_and_rejects_unknown_keys() -> None:
    assert Thing.validate_params({"port": "0x20"}) == {"port": 0x20, "verbose": False}
    assert Thing.validate_params({"verbose": "on"})["verbose"] is True
    with pytest.raises(ConfigError, match="unknown key 'irq' .*known keys: port, verbose"):
        Thing.validate_params({"irq": "4"})
    with pytest.raises(ConfigError, match="bad value 'zz' for port"):
        Thing.validate_params({"port": "zz"})


def test_irq_line_skips_redundant_level_changes() -> None:
    levels: list[int] = []
    line = CallbackIrqLine(levels.append)
    line.raise_()
    line.raise_()
    line.lower()
    line.lower()
    line.pulse()
    assert levels == [1, 0, 1, 0] and line.level == 0 and line.raised_count == 2


def test_stats_dump_text_json_and_reset() -> None:
    reg = StatsRegistry()
    cpu = KvmCpuStats()
    cpu.io = 3
    reg.add("system.cpu0", cpu.as_dict, cpu.reset)
    reg.add("system", lambda: {"sim_seconds": 0.5}, None)
    text = reg.dump()
    assert "system.cpu0.io" in text and "system.sim_seconds" in text
    assert json.loads(reg.dump("json"))["system.cpu0"]["io"] == 3
    reg.reset()
    assert cpu.io == 0 and reg.dumps == 2


def test_debug_flags_enable_loggers_and_reject_unknown_names() -> None:
    enabled = debug.enable("KvmIO,Bus")
    assert enabled == ["kvmfw.io", "kvmfw.bus"]
    assert logging.getLogger("kvmfw.io").isEnabledFor(logging.DEBUG)
    assert "kvmfw.run" in debug.enable("KvmAll")
    with pytest.raises(ConfigError, match="unknown debug flag 'Kvmio'"):
        debug.enable("Kvmio")
    for name in ("kvmfw.io", "kvmfw.bus", "kvmfw.run", "kvmfw.cpu", "kvmfw.int",
                 "kvmfw.context", "kvmfw.timer"):
        logging.getLogger(name).setLevel(logging.NOTSET)


def test_firmware_nodes_are_collected_in_order_and_checked() -> None:
    """What a table builder gets: every device's declared nodes, in the order the devices
    came, each checked; a malformed node or a wrong type is a ConfigError naming it."""

    class Dev:
        def __init__(self, *nodes: object) -> None:
            self.nodes = list(nodes)

        def firmware(self) -> list[object]:
            return self.nodes

    a = FirmwareNode("uart-16550", "pio", 0x3F8, 8, irq=4, acpi_hid="PNP0501")
    b = FirmwareNode("virtio-mmio", "mmio", 0xD000_0000, 0x200, irq=5, irq_trigger="edge")
    assert firmware_nodes([Dev(a), object(), Dev(), Dev(b, a)]) == [a, b, a]
    assert a.irq_trigger == "level" and a.compatible == () and not a.dma_coherent
    for bad, why in ((a._replace(space="io"), "space must be pio or mmio"),
                     (a._replace(irq_trigger="rising"), "irq_trigger must be level or edge"),
                     (a._replace(size=0), "bad window"), (a._replace(base=-1), "bad window")):
        with pytest.raises(ConfigError, match=why):
            firmware_nodes([Dev(a, bad)])
    with pytest.raises(ConfigError, match="returned tuple, not a FirmwareNode"):
        firmware_nodes([Dev(("uart-16550", "pio", 0x3F8, 8))])
