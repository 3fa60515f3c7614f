"""The device tree describes whatever devices declare through ``Device.firmware()`` (issue
10: the console was found by the name ``pl011`` and virtio-mmio never appeared, so a
third-party device could not be described). Runs on any host."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import ClassVar

import fdt
import pytest
from kvmfw_armv8 import board

from kvmfw.device import Device, DeviceContext, FirmwareNode, NullIrqLine
from kvmfw.eventq import EventQueue
from kvmfw.memory import GuestMemory


class AcmeTimer(Device):
    """A device from no kvmfw package."""

    name: ClassVar[str] = "acme-timer"

    def firmware(self) -> list[FirmwareNode]:
        return [FirmwareNode("acme-timer", "mmio", 0x0C00_0000, 0x1000, irq=40,
                             irq_trigger="edge", compatible=("acme,timer-v2", "acme,timer"),
                             properties=(("clock-frequency", 1000000), ("acme,mode", "fast")),
                             dma_coherent=True),
                FirmwareNode("acme-port", "pio", 0x700, 8, compatible=("acme,port",)),
                FirmwareNode("acme-acpi-only", "mmio", 0x0C00_1000, 0x100, acpi_hid="ACME0003"),
                FirmwareNode("acme-huge-irq", "mmio", 0x0C00_2000, 0x100, irq=500,
                             compatible=("acme,x",))]


class Pl011Lookalike(Device):
    name: ClassVar[str] = "pl011"  # named like the UART but declaring nothing


class Uart(Device):
    name: ClassVar[str] = "my-uart"

    def firmware(self) -> list[FirmwareNode]:
        return [FirmwareNode("pl011", "mmio", 0x0910_0000, 0x1000, irq=5,
                             compatible=("arm,pl011", "arm,primecell"))]


def _spec(devices: list[FirmwareNode], **kw: object) -> board.DeviceTreeSpec:
    return board.DeviceTreeSpec(ram_base=board.RAM_BASE, ram_size=64 << 20, mpidrs=[0],
                                devices=devices, **kw)  # type: ignore[arg-type]


def test_declared_mmio_nodes_appear_and_only_those() -> None:
    nodes = board.firmware_nodes([AcmeTimer.__new__(AcmeTimer),
                                  Pl011Lookalike.__new__(Pl011Lookalike)])
    assert [n.kind for n in nodes] == ["acme-timer", "acme-port", "acme-acpi-only"]
    tree = fdt.parse_dtb(board.build_dtb(_spec(nodes, uart=False)))
    node = tree.get_node("/acme-timer@c000000")
    assert list(node.get_property("compatible")) == ["acme,timer-v2", "acme,timer"]
    assert node.get_property("reg").data == [0, 0x0C00_0000, 0, 0x1000]
    assert node.get_property("interrupts").data == [0, 40, 1]  # SPI 40, rising edge
    assert node.get_property("clock-frequency").value == 1000000
    assert node.get_property("acme,mode").value == "fast"
    assert node.exist_property("dma-coherent")
    names = [n.name for n in tree.root.nodes]
    assert not any(n.startswith(("acme-port", "acme-acpi-only", "acme-huge-irq", "pl011"))
                   for n in names), names
    assert tree.get_property("stdout-path", "/chosen") is None


def test_a_declared_pl011_is_the_console_wherever_it_is() -> None:
    tree = fdt.parse_dtb(board.build_dtb(_spec(board.firmware_nodes([Uart.__new__(Uart)]),
                                               uart=False)))
    assert tree.get_property("stdout-path", "/chosen").value == "/pl011@9100000"
    uart = tree.get_node("/pl011@9100000")
    assert uart.get_property("interrupts").data == [0, 5, 4]
    assert uart.get_property("clocks").data == [board.PHANDLE_CLK, board.PHANDLE_CLK]
    assert tree.exist_node("/apb-pclk")
    assert not tree.exist_node(f"/pl011@{board.UART_BASE:x}")


def test_the_builtin_devices_declare_themselves() -> None:
    pytest.importorskip("kvmfw_devices", reason="the devices plugin is not installed")
    from kvmfw_devices.pl011 import Pl011
    from kvmfw_devices.virtio_console import VirtioConsole

    ctx = DeviceContext(eventq=EventQueue(), irq=lambda n: NullIrqLine(), memory=GuestMemory(),
                        request_exit=lambda status, reason: None)
    nodes = board.firmware_nodes([Pl011(ctx, base="0x9000000", irq="1", output="none"),
                                  VirtioConsole(ctx, base="0xa000200", irq="17",
                                                output="none")])
    tree = fdt.parse_dtb(board.build_dtb(_spec(nodes, uart=False)))
    assert tree.get_property("stdout-path", "/chosen").value == "/pl011@9000000"
    vio = tree.get_node("/virtio_mmio@a000200")
    assert vio.get_property("compatible").value == "virtio,mmio"
    assert vio.get_property("interrupts").data == [0, 17, 4]


@pytest.mark.skipif(shutil.which("dtc") is None,
                    reason="dtc not installed (apt-get install device-tree-compiler)")
def test_declared_nodes_decompile_cleanly_with_dtc(tmp_path: Path) -> None:
    nodes = board.firmware_nodes([AcmeTimer.__new__(AcmeTimer), Uart.__new__(Uart)])
    blob = tmp_path / "board.dtb"
    blob.write_bytes(board.build_dtb(_spec(nodes, uart=False)))
    out = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", str(blob)], capture_output=True,
                         text=True, check=True)
    assert out.stderr.strip() == "", out.stderr
    assert 'compatible = "acme,timer-v2\\0acme,timer";' in out.stdout
