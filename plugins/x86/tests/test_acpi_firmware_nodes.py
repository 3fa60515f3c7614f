"""The DSDT describes whatever devices declare through ``Device.firmware()`` (issue 10: it
used to find virtio-mmio transports by class name, so a third-party device could never
appear)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from conftest import bzimage, requires_kvm
from kvmfw.device import Device, FirmwareNode, Range
from test_acpi import Aml, rsdt_tables, table

from kvmfw_x86 import acpi, loaders


class AcmeSensor(Device):
    """A device from no kvmfw package: an MMIO window, an IO port block, an edge IRQ."""

    name: ClassVar[str] = "acme-sensor"

    def ranges(self) -> list[Range]:
        return [Range("mmio", 0xFED00000, 0x1000), Range("pio", 0x700, 8)]

    def firmware(self) -> list[FirmwareNode]:
        return [FirmwareNode("acme-sensor", "mmio", 0xFED00000, 0x1000, irq=7,
                             irq_trigger="edge", acpi_hid="ACME0001"),
                FirmwareNode("acme-port", "pio", 0x700, 8, acpi_hid="ACME0002"),
                FirmwareNode("acme-dt-only", "mmio", 0xFED01000, 0x100,
                             compatible=("acme,thing",))]


class VirtioLookalike(Device):
    """Named like a virtio transport but declaring nothing: it must not appear."""

    name: ClassVar[str] = "VirtioMmio"


def _crs_bytes(aml: Aml, path: str) -> bytes:
    return bytes(aml.names[f"{path}._CRS"])


def test_declared_nodes_and_only_those_are_described() -> None:
    machine = SimpleNamespace(devices=[VirtioLookalike.__new__(VirtioLookalike),
                                       AcmeSensor.__new__(AcmeSensor)])
    nodes = acpi.acpi_devices(machine)
    assert nodes == [acpi.MmioDevice(0xFED00000, 0x1000, 7, "ACME0001", "mmio", True),
                     acpi.MmioDevice(0x700, 8, -1, "ACME0002", "pio", False)]
    aml = Aml(acpi.dsdt_aml(nodes))
    assert aml.devices == ["\\_SB_.DV00", "\\_SB_.DV01"]
    assert aml.names["\\_SB_.DV00._HID"] == "ACME0001"
    assert aml.names["\\_SB_.DV01._HID"] == "ACME0002"
    assert aml.names["\\_SB_.DV01._UID"] == 1
    crs0, crs1 = _crs_bytes(aml, "\\_SB_.DV00"), _crs_bytes(aml, "\\_SB_.DV01")
    assert struct.pack("<BHBII", 0x86, 9, 1, 0xFED00000, 0x1000) in crs0
    assert struct.pack("<BHBBI", 0x89, 6, 0x03, 1, 7) in crs0  # edge, active high
    assert struct.pack("<BBHHBB", 0x47, 1, 0x700, 0x700, 1, 8) in crs1
    assert b"\x89" not in crs1  # no interrupt declared, none described


def test_nodes_acpi_cannot_express_are_left_out() -> None:
    class Far(Device):
        name: ClassVar[str] = "far"

        def firmware(self) -> list[FirmwareNode]:
            return [FirmwareNode("far", "mmio", 1 << 40, 0x1000, acpi_hid="FAR00001"),
                    FirmwareNode("wide", "pio", 0xFFF0, 0x20, acpi_hid="FAR00002")]

    assert acpi.acpi_devices(SimpleNamespace(devices=[Far.__new__(Far)])) == []


@pytest.mark.skipif(shutil.which("iasl") is None,
                    reason="iasl (Debian package acpica-tools) is not installed")
def test_iasl_decompiles_declared_nodes(tmp_path: Path) -> None:
    nodes = acpi.acpi_devices(SimpleNamespace(devices=[AcmeSensor.__new__(AcmeSensor)]))
    (tmp_path / "dsdt.dat").write_bytes(acpi.dsdt(nodes))
    r = subprocess.run(["iasl", "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert 'Name (_HID, "ACME0001")' in dsl and 'Name (_HID, "ACME0002")' in dsl
    assert "IO (Decode16,\n" in dsl and "0x0700" in dsl
    assert "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )" in dsl


@requires_kvm
@pytest.mark.kvm
def test_third_party_device_appears_in_the_guest_dsdt(machine_factory: Any,
                                                       tmp_path: Path) -> None:
    k = tmp_path / "bzImage"
    k.write_bytes(bzimage())
    m, _ = machine_factory(cpus=1)
    m.add_device(AcmeSensor(m.device_context()))
    loaders.load(m, str(k), {"cmdline": "console=ttyS0"})
    read = m.memory.read
    f = rsdt_tables(read)[b"FACP"]
    aml = Aml(table(read, struct.unpack_from("<I", f, 40)[0])[36:])
    assert aml.devices == ["\\_SB_.DV00", "\\_SB_.DV01"]
    assert aml.names["\\_SB_.DV00._HID"] == "ACME0001"
