"""virtio-mmio transport, virtio-blk and virtio-console driven through their registers."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from conftest import RAM_SIZE, Harness
from kvmfw.errors import ConfigError
from virtio_driver import Driver

from kvmfw_devices import virtio_blk as b
from kvmfw_devices import virtio_mmio as v
from kvmfw_devices.virtio_blk import VirtioBlk
from kvmfw_devices.virtio_console import VirtioConsole

HDR, DATA, STATUS = 0x40000, 0x41000, 0x42000


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(range(256)) * 2 * 8)  # 8 sectors
    return p


@pytest.fixture
def blk(h: Harness, image: Path) -> VirtioBlk:
    return VirtioBlk(h.ctx, file=str(image))


def request(h: Harness, drv: Driver, rtype: int, sector: int, data_len: int,
            payload: bytes = b"") -> int:
    h.ctx.memory.write(HDR, struct.pack("<IIQ", rtype, 0, sector))
    h.ctx.memory.write(STATUS, b"\x77")
    bufs = [(HDR, 16, False)]
    if rtype == b.T_OUT:
        h.ctx.memory.write(DATA, payload)
        bufs.append((DATA, len(payload), False))
    elif data_len:
        bufs.append((DATA, data_len, True))
    bufs.append((STATUS, 1, True))
    drv.post(0, bufs)
    return h.ctx.memory.read(STATUS, 1)[0]


def test_identification_registers(blk: VirtioBlk) -> None:
    drv = Driver(blk, blk.ctx.memory)
    assert drv.r32(v.REG_MAGIC) == 0x74726976
    assert drv.r32(v.REG_VERSION) == 2
    assert drv.r32(v.REG_DEVICE_ID) == 2
    assert drv.r32(v.REG_VENDOR_ID) == v.VENDOR_ID
    assert drv.r32(v.REG_STATUS) == 0
    assert drv.r32(v.REG_INTERRUPT_STATUS) == 0
    assert drv.r32(v.REG_QUEUE_NUM_MAX) == v.QUEUE_NUM_MAX
    drv.w32(v.REG_DEVICE_FEATURES_SEL, 1)
    assert drv.r32(v.REG_DEVICE_FEATURES) == 1  # VERSION_1 is bit 32
    drv.w32(v.REG_DEVICE_FEATURES_SEL, 0)
    assert drv.r32(v.REG_DEVICE_FEATURES) == (b.VIRTIO_BLK_F_FLUSH | v.VIRTIO_F_INDIRECT_DESC
                                              | v.VIRTIO_F_EVENT_IDX)
    assert blk.kernel_cmdline() == "virtio_mmio.device=512@0xd0000000:5"


def test_capacity_in_config_space(blk: VirtioBlk) -> None:
    assert blk.read(0x100, 8) == struct.pack("<Q", 8)
    assert blk.read(0x104, 4) == bytes(4)


def test_features_without_version_1_are_refused(blk: VirtioBlk) -> None:
    drv = Driver(blk, blk.ctx.memory)
    assert not drv.negotiate(features=0) & v.STATUS_FEATURES_OK
    assert not drv.negotiate(features=v.VIRTIO_F_VERSION_1 | (1 << 40)) & v.STATUS_FEATURES_OK


def test_read_write_flush_get_id(h: Harness, blk: VirtioBlk, image: Path) -> None:
    drv = Driver(blk, h.ctx.memory)
    drv.start(1)
    assert request(h, drv, b.T_IN, 1, 512) == b.S_OK
    assert h.ctx.memory.read(DATA, 512) == bytes(range(256)) * 2
    assert drv.used(0)[-1][1] == 513
    assert h.irq(5).level == 1
    assert drv.r32(v.REG_INTERRUPT_STATUS) == v.INT_USED_BUFFER
    drv.w32(v.REG_INTERRUPT_ACK, v.INT_USED_BUFFER)
    assert h.irq(5).level == 0
    assert request(h, drv, b.T_OUT, 2, 0, b"\xab" * 512) == b.S_OK
    assert image.read_bytes()[1024:1536] == b"\xab" * 512
    assert request(h, drv, b.T_FLUSH, 0, 0) == b.S_OK
    assert request(h, drv, b.T_GET_ID, 0, 20) == b.S_OK
    assert h.ctx.memory.read(DATA, 20).rstrip(b"\0") == b"kvmfw-disk"
    assert request(h, drv, 99, 0, 0) == b.S_UNSUPP
    assert blk.stats["chains"] == 5


def test_out_of_range_and_readonly_are_ioerr(h: Harness, image: Path) -> None:
    dev = VirtioBlk(h.ctx, file=str(image), readonly="on")
    drv = Driver(dev, h.ctx.memory)
    drv.w32(v.REG_DEVICE_FEATURES_SEL, 0)
    assert drv.r32(v.REG_DEVICE_FEATURES) & b.VIRTIO_BLK_F_RO
    drv.start(1)
    assert request(h, drv, b.T_IN, 8, 512) == b.S_IOERR  # past the end
    assert request(h, drv, b.T_IN, 0, 100) == b.S_IOERR  # not whole sectors
    assert request(h, drv, b.T_OUT, 0, 0, b"\0" * 512) == b.S_IOERR
    assert image.read_bytes()[:2] == b"\x00\x01"
    assert dev.stats["io_errors"] == 3


def test_file_is_required(h: Harness, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="required"):
        VirtioBlk(h.ctx)
    with pytest.raises(ConfigError, match="cannot open"):
        VirtioBlk(h.ctx, file=str(tmp_path / "missing.img"))


@pytest.mark.parametrize("case", ["outside", "straddle", "indirect", "loop", "order"])
def test_bad_descriptor_breaks_the_device(h: Harness, blk: VirtioBlk, case: str) -> None:
    drv = Driver(blk, h.ctx.memory)
    drv.start(1)
    h.ctx.memory.write(HDR, struct.pack("<IIQ", b.T_IN, 0, 0))
    sentinel = h.ctx.memory.read(0, 64)
    if case == "outside":
        drv.post(0, [(HDR, 16, False), (RAM_SIZE + 0x1000, 512, True), (STATUS, 1, True)])
    elif case == "straddle":
        drv.post(0, [(HDR, 16, False), (RAM_SIZE - 256, 512, True), (STATUS, 1, True)])
    elif case == "indirect":
        drv.post(0, [(HDR, 16, False)], raw_flags={0: v.DESC_F_INDIRECT})
    elif case == "loop":
        drv.post(0, [(HDR, 16, False), (DATA, 512, True)],
                 raw_flags={1: v.DESC_F_WRITE | v.DESC_F_NEXT})  # next = 0: a loop
    else:
        drv.post(0, [(DATA, 512, True), (HDR, 16, False)])
    assert blk.broken
    assert drv.r32(v.REG_STATUS) & v.STATUS_NEEDS_RESET
    assert drv.r32(v.REG_INTERRUPT_STATUS) & v.INT_CONFIG_CHANGE
    assert drv.used(0) == []
    assert h.ctx.memory.read(0, 64) == sentinel
    # ignored until reset, then usable again
    drv.post(0, [(HDR, 16, False), (DATA, 512, True), (STATUS, 1, True)])
    assert drv.used(0) == []
    drv.start(1)
    assert not blk.broken
    assert request(h, drv, b.T_IN, 0, 512) == b.S_OK


def test_rings_outside_ram_break_the_device(h: Harness, blk: VirtioBlk) -> None:
    drv = Driver(blk, h.ctx.memory, ring_base=RAM_SIZE - 0x1000)
    drv.negotiate()
    drv.setup_queue(0)
    assert blk.broken and drv.r32(v.REG_QUEUE_READY) == 0


def test_bad_register_accesses(blk: VirtioBlk) -> None:
    assert blk.read(0x000, 2) == b"\xff\xff"
    assert blk.read(0x0F0, 4) == b"\xff" * 4  # reserved
    blk.write(0x000, b"\0\0\0\0")  # read-only
    blk.write(0x0FF, b"\0")
    assert blk.stats["bad_accesses"] == 4


def test_queue_num_bounds_and_select(blk: VirtioBlk) -> None:
    drv = Driver(blk, blk.ctx.memory)
    drv.w32(v.REG_QUEUE_NUM, 1024)
    assert drv.r32(v.REG_QUEUE_NUM) == v.QUEUE_NUM_MAX
    drv.w32(v.REG_QUEUE_SEL, 5)  # no such queue
    assert drv.r32(v.REG_QUEUE_NUM_MAX) == 0


def test_console_transmit_and_receive(h: Harness) -> None:
    con = VirtioConsole(h.ctx)
    drv = Driver(con, h.ctx.memory)
    assert drv.r32(v.REG_DEVICE_ID) == 3
    drv.start(2)
    h.ctx.memory.write(DATA, b"hello from hvc0\n")
    drv.post(1, [(DATA, 16, False)])
    assert h.output.getvalue() == b"hello from hvc0\n"
    con.enqueue(b"typed")  # no receive buffer yet: held
    assert con.stats["rx_bytes"] == 0
    drv.post(0, [(STATUS, 3, True)])
    assert h.ctx.memory.read(STATUS, 3) == b"typ"
    drv.post(0, [(STATUS, 64, True)])
    assert h.ctx.memory.read(STATUS, 2) == b"ed"
    assert [n for _, n in drv.used(0)] == [3, 2]
    assert con.read(0x100, 4) == bytes(4)


def test_zero_length_descriptor_outside_ram_is_not_touched(h: Harness, blk: VirtioBlk) -> None:
    drv = Driver(blk, h.ctx.memory)
    drv.start(1)
    h.ctx.memory.write(HDR, struct.pack("<IIQ", b.T_FLUSH, 0, 0))
    drv.post(0, [(HDR, 16, False), (RAM_SIZE + 1, 0, False), (STATUS, 1, True)])
    assert not blk.broken
    assert h.ctx.memory.read(STATUS, 1) == bytes((b.S_OK,))
