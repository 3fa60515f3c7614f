"""PCI host: type-0 headers, enumeration, BAR sizing and decoding, ECAM, mechanism #1."""

from __future__ import annotations

import pytest
from conftest import Harness
from kvmfw.bus import Bus
from kvmfw.device import Range

from kvmfw_devices import pci_host as p
from kvmfw_devices.pci_host import ConfigMechanism1, PciHost

BASE = 0xC0000000


@pytest.fixture
def host(h: Harness) -> PciHost:
    return PciHost(h.ctx, testdev="on")


def enumerate_bus0(host: PciHost) -> list[tuple[int, int, int]]:
    found = []
    for dev in range(32):
        vendor = host.config_read(0, dev, 0, p.CFG_VENDOR, 2)
        if vendor != 0xFFFF:
            found.append((dev, vendor, host.config_read(0, dev, 0, p.CFG_DEVICE, 2)))
    return found


def test_enumeration_finds_host_bridge_and_testdev(host: PciHost) -> None:
    assert enumerate_bus0(host) == [(0, 0x1B36, 0x0008), (1, 0x1B36, 0x0005)]
    assert host.config_read(0, 0, 0, p.CFG_CLASS + 1, 2) == 0x0600  # host bridge
    assert host.config_read(0, 0, 0, p.CFG_HEADER_TYPE, 1) == 0
    assert host.config_read(1, 0, 0, 0, 4) == 0xFFFFFFFF  # no bus 1
    assert host.config_read(0, 0, 1, 0, 4) == 0xFFFFFFFF  # no function 1


def test_without_testdev_only_the_bridge(h: Harness) -> None:
    assert enumerate_bus0(PciHost(h.ctx)) == [(0, 0x1B36, 0x0008)]


def test_header_reset_values_and_read_only_fields(host: PciHost) -> None:
    assert host.config_read(0, 1, 0, p.CFG_COMMAND, 2) == 0
    host.config_write(0, 1, 0, p.CFG_VENDOR, 4, 0x12345678)
    assert host.config_read(0, 1, 0, p.CFG_VENDOR, 4) == 0x00051B36
    host.config_write(0, 1, 0, p.CFG_COMMAND, 2, 0xFFFF)
    assert host.config_read(0, 1, 0, p.CFG_COMMAND, 2) == p.CMD_WRITABLE
    host.config_write(0, 1, 0, p.CFG_INT_LINE, 1, 11)
    assert host.config_read(0, 1, 0, p.CFG_INT_LINE, 1) == 11
    assert host.config_read(0, 1, 0, p.CFG_ROM, 4) == 0
    assert host.config_read(0, 1, 0, 0x100, 4) == 0  # extended space is empty


def test_status_write_one_to_clear(host: PciHost) -> None:
    f = host.functions[8]
    f.config[p.CFG_STATUS + 1] = 0xF9
    host.config_write(0, 1, 0, p.CFG_STATUS, 2, 0x0100)
    assert host.config_read(0, 1, 0, p.CFG_STATUS, 2) == 0xF800


def test_bar_sizing(host: PciHost) -> None:
    host.config_write(0, 1, 0, p.CFG_BAR0, 4, 0xFFFFFFFF)
    assert host.config_read(0, 1, 0, p.CFG_BAR0, 4) == 0xFFFFF000  # 4 KiB, mem32
    bar2 = p.CFG_BAR0 + 8
    host.config_write(0, 1, 0, bar2, 4, 0xFFFFFFFF)
    host.config_write(0, 1, 0, bar2 + 4, 4, 0xFFFFFFFF)
    assert host.config_read(0, 1, 0, bar2, 4) == 0xFFFF0000 | p.BAR_MEM64 | p.BAR_PREFETCH
    assert host.config_read(0, 1, 0, bar2 + 4, 4) == 0xFFFFFFFF
    assert host.config_read(0, 1, 0, p.CFG_BAR0 + 4, 4) == 0  # unimplemented BAR


def test_programmed_bars_decode_only_with_memory_enabled(host: PciHost) -> None:
    host.config_write(0, 1, 0, p.CFG_BAR0, 4, BASE + 0x2000)
    host.config_write(0, 1, 0, p.CFG_BAR0 + 8, 4, BASE + 0x10000)
    host.config_write(0, 1, 0, p.CFG_BAR0 + 12, 4, 0)
    host.write(0x2010, b"\xaa\xbb\xcc\xdd")
    assert host.read(0x2010, 4) == b"\xff" * 4  # MEM not enabled yet
    host.config_write(0, 1, 0, p.CFG_COMMAND, 2, p.CMD_MEM)
    host.write(0x2010, b"\xaa\xbb\xcc\xdd")
    assert host.read(0x2010, 4) == b"\xaa\xbb\xcc\xdd"
    host.write(0x10008, (0x1122334455667788).to_bytes(8, "little"))
    assert host.read(0x10008, 8) == (0x1122334455667788).to_bytes(8, "little")
    assert host.read(0x1000, 4) == b"\xff" * 4  # between BARs
    assert host.stats["unclaimed_bar"] >= 2


def test_ecam_window(h: Harness) -> None:
    host = PciHost(h.ctx, ecam="on", testdev="on")
    assert host.read(0, 4) == (0x00081B36).to_bytes(4, "little")
    assert host.read((1 << 15) | p.CFG_DEVICE, 2) == b"\x05\x00"
    assert host.read(2 << 15, 4) == b"\xff" * 4
    host.write((1 << 15) | p.CFG_COMMAND, b"\x02\x00")
    assert host.config_read(0, 1, 0, p.CFG_COMMAND, 2) == p.CMD_MEM
    assert host.bar_window == (BASE + (1 << 20), BASE + 0x10000000)
    assert host.read(0, 8) == b"\xff" * 8
    assert host.stats["bad_accesses"] == 1


def test_misaligned_config_access_reads_ones(host: PciHost) -> None:
    assert host.config_read(0, 0, 0, 1, 2) == 0xFFFF
    assert host.config_read(0, 0, 0, 0, 3) == 0xFFFFFF


def test_mechanism1_on_a_bus(host: PciHost) -> None:
    bus = Bus()
    bus.pio.register(0xCF8, 8, ConfigMechanism1(host), "pci-cam")
    r = host.ranges()[0]
    bus.mmio.register(r.base, r.size, host)
    assert r == Range("mmio", BASE, 0x10000000, "pci-host")
    bus.pio.write(0xCF8, (0x80000000 | 1 << 11).to_bytes(4, "little"))
    assert bus.pio.read(0xCF8, 4) == (0x80000800).to_bytes(4, "little")
    assert bus.pio.read(0xCFC, 4) == (0x00051B36).to_bytes(4, "little")
    assert bus.pio.read(0xCFE, 2) == b"\x05\x00"
    bus.pio.write(0xCF8, (0x80000000 | 1 << 11 | p.CFG_BAR0).to_bytes(4, "little"))
    bus.pio.write(0xCFC, (BASE + 0x4000).to_bytes(4, "little"))
    bus.pio.write(0xCF8, (0x80000000 | 1 << 11 | p.CFG_COMMAND).to_bytes(4, "little"))
    bus.pio.write(0xCFC, b"\x02\x00")
    bus.mmio.write(BASE + 0x4000, b"\x42")
    assert bus.mmio.read(BASE + 0x4000, 1) == b"\x42"
    bus.pio.write(0xCF8, (0).to_bytes(4, "little"))
    assert bus.pio.read(0xCFC, 4) == b"\xff" * 4  # enable bit clear
    bus.pio.write(0xCFB, b"\x01")  # Linux's type-1 probe: harmless
