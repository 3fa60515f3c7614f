"""virtio-mmio transport, virtio-blk and virtio-console driven through their registers."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RAM_SIZE, Harness
from kvmfw.errors import CheckpointError, ConfigError, GuestMemoryError
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


# --- issue 10: guest-controlled lengths, indices and counts ---------------------------------

ALL_FEATURES = v.VIRTIO_F_VERSION_1 | v.VIRTIO_F_INDIRECT_DESC | v.VIRTIO_F_EVENT_IDX


def start(dev: v.VirtioMmio, mem: object, features: int = ALL_FEATURES, num: int = 8) -> Driver:
    drv = Driver(dev, mem, num=num)  # type: ignore[arg-type]
    assert drv.negotiate(features) & v.STATUS_FEATURES_OK
    for q in range(dev.num_queues):
        drv.setup_queue(q)
    drv.driver_ok()
    return drv


def test_hostile_chain_costs_the_host_no_memory() -> None:
    """The issue's reproducer: one chain listing the same 1 MiB 63 times made the host copy
    it twice (+126 MiB); as views it costs nothing."""
    script = Path(__file__).with_name("rss_hostile_chain.py")
    for kind in ("console", "blk"):
        out = subprocess.run([sys.executable, str(script), kind, "63"], capture_output=True,
                             text=True, timeout=300, check=True).stdout
        growth = int(re.search(r"\(\+(\d+) MiB\)", out).group(1))  # type: ignore[union-attr]
        assert growth < 32, out
        assert "broken=False, chains=1" in out


def test_chain_longer_than_max_bytes_needs_reset(h: Harness) -> None:
    con = VirtioConsole(h.ctx, output="none")
    drv = start(con, h.ctx.memory)
    n = v.MAX_CHAIN_BYTES // RAM_SIZE + 1
    drv.num = 8
    # n descriptors of the whole of RAM through an indirect table
    bufs = [(0, RAM_SIZE, False)] * n
    drv.post_indirect(1, 0x30000, bufs)
    assert con.broken and drv.r32(v.REG_STATUS) & v.STATUS_NEEDS_RESET
    assert con.stats["tx_bytes"] == 0


@pytest.mark.parametrize("value", [0, 3, 6, 100, 512, 2**32 - 1])
def test_queue_size_must_be_a_power_of_two(blk: VirtioBlk, value: int) -> None:
    drv = Driver(blk, blk.ctx.memory)
    drv.negotiate()
    drv.w32(v.REG_QUEUE_NUM, value)
    assert blk.broken and drv.r32(v.REG_STATUS) & v.STATUS_NEEDS_RESET
    assert drv.r32(v.REG_QUEUE_NUM) == v.QUEUE_NUM_MAX


def test_ring_indices_wrap_at_2_to_the_16(h: Harness, blk: VirtioBlk) -> None:
    drv = start(blk, h.ctx.memory, v.VIRTIO_F_VERSION_1)
    q = blk.queues[0]
    q.last_avail = q.used_idx = drv.avail_idx[0] = 0xFFFE
    _, avail, used = drv.rings[0]
    h.ctx.memory.write_u(avail + 2, 2, 0xFFFE)
    for i in range(4):
        assert request(h, drv, b.T_IN, i, 512) == b.S_OK
    assert (q.last_avail, q.used_idx) == (2, 2)
    assert h.ctx.memory.read_u(used + 2, 2) == 2
    assert not blk.broken and blk.stats["chains"] == 4


@pytest.mark.parametrize("jump", [9, 0x8000, 0xFFFF])
def test_available_index_jump_beyond_queue_size_needs_reset(h: Harness, blk: VirtioBlk,
                                                           jump: int) -> None:
    drv = start(blk, h.ctx.memory)
    _, avail, _ = drv.rings[0]
    h.ctx.memory.write_u(avail + 2, 2, jump)
    drv.w32(v.REG_QUEUE_NOTIFY, 0)
    assert blk.broken and blk.stats["chains"] == 0
    assert drv.r32(v.REG_STATUS) & v.STATUS_NEEDS_RESET


def test_indirect_request(h: Harness, blk: VirtioBlk) -> None:
    drv = start(blk, h.ctx.memory)
    h.ctx.memory.write(HDR, struct.pack("<IIQ", b.T_IN, 0, 1))
    drv.post_indirect(0, 0x30000, [(HDR, 8, False), (HDR + 8, 8, False), (DATA, 256, True),
                                   (DATA + 256, 256, True), (STATUS, 1, True)])
    assert not blk.broken
    assert h.ctx.memory.read(STATUS, 1) == bytes((b.S_OK,))
    assert h.ctx.memory.read(DATA, 512) == bytes(range(256)) * 2
    assert drv.used(0) == [(0, 513)]


@pytest.mark.parametrize("case", ["nested", "misaligned", "empty", "too-big", "outside",
                                  "with-next", "loop", "not-negotiated"])
def test_bad_indirect_table_needs_reset(h: Harness, blk: VirtioBlk, case: str) -> None:
    features = v.VIRTIO_F_VERSION_1 if case == "not-negotiated" else ALL_FEATURES
    drv = start(blk, h.ctx.memory, features)
    mem, table = h.ctx.memory, 0x30000
    mem.write(HDR, struct.pack("<IIQ", b.T_IN, 0, 0))
    good = [(HDR, 16, False), (DATA, 512, True), (STATUS, 1, True)]
    if case == "nested":
        mem.write(table, struct.pack("<QIHH", 0x31000, 16, v.DESC_F_INDIRECT, 0))
        drv.post(0, [(table, 16, False)], raw_flags={0: v.DESC_F_INDIRECT})
    elif case == "misaligned":
        drv.post(0, [(table, 20, False)], raw_flags={0: v.DESC_F_INDIRECT})
    elif case == "empty":
        drv.post(0, [(table, 0, False)], raw_flags={0: v.DESC_F_INDIRECT})
    elif case == "too-big":
        drv.post(0, [(0, 16 * (v.MAX_INDIRECT + 1), False)], raw_flags={0: v.DESC_F_INDIRECT})
    elif case == "outside":
        drv.post(0, [(RAM_SIZE - 16, 32, False)], raw_flags={0: v.DESC_F_INDIRECT})
    elif case == "with-next":
        drv.post(0, [(table, 48, False), (STATUS, 1, True)],
                 raw_flags={0: v.DESC_F_INDIRECT | v.DESC_F_NEXT})
    elif case == "loop":
        for i in range(3):  # every entry chains to entry 0
            mem.write(table + 16 * i, struct.pack("<QIHH", HDR, 16, v.DESC_F_NEXT, 0))
        drv.post(0, [(table, 48, False)], raw_flags={0: v.DESC_F_INDIRECT})
    else:
        drv.post_indirect(0, table, good)
    assert blk.broken and drv.r32(v.REG_STATUS) & v.STATUS_NEEDS_RESET
    assert drv.used(0) == []


def test_event_idx_suppresses_interrupts_and_publishes_avail_event(h: Harness,
                                                                     blk: VirtioBlk) -> None:
    drv = start(blk, h.ctx.memory)
    mem = h.ctx.memory
    _, avail, used = drv.rings[0]
    used_event, avail_event = avail + 4 + 2 * drv.num, used + 4 + 8 * drv.num
    mem.write_u(used_event, 2, 2)  # interrupt me when the third chain is used
    assert request(h, drv, b.T_IN, 0, 512) == b.S_OK
    assert mem.read_u(avail_event, 2) == 1  # next notification wanted for chain 1
    assert request(h, drv, b.T_IN, 1, 512) == b.S_OK
    assert drv.r32(v.REG_INTERRUPT_STATUS) == 0 and h.irq(5).level == 0
    assert request(h, drv, b.T_IN, 2, 512) == b.S_OK
    assert drv.r32(v.REG_INTERRUPT_STATUS) == v.INT_USED_BUFFER and h.irq(5).level == 1
    assert mem.read_u(avail_event, 2) == 3
    # without event idx the NO_INTERRUPT flag rules (and used_event is ignored)
    drv = start(blk, mem, v.VIRTIO_F_VERSION_1)
    mem.write_u(avail, 2, v.AVAIL_F_NO_INTERRUPT)
    assert request(h, drv, b.T_IN, 0, 512) == b.S_OK
    assert drv.r32(v.REG_INTERRUPT_STATUS) == 0


@pytest.mark.parametrize("sector", [7, 8, 2**54, 2**64 - 1])
def test_blk_sector_ranges_past_the_disk_are_ioerr(h: Harness, blk: VirtioBlk,
                                                   sector: int) -> None:
    drv = start(blk, h.ctx.memory)
    assert request(h, drv, b.T_IN, sector, 1024) == b.S_IOERR
    assert request(h, drv, b.T_OUT, sector, 0, b"\0" * 1024) == b.S_IOERR
    assert not blk.broken and blk.stats["read_bytes"] == blk.stats["write_bytes"] == 0


def test_blk_header_split_over_descriptors_and_data_as_views(h: Harness, blk: VirtioBlk,
                                                             image: Path) -> None:
    drv = start(blk, h.ctx.memory)
    mem = h.ctx.memory
    mem.write(HDR, struct.pack("<IIQ", b.T_OUT, 0, 3))
    mem.write(DATA, b"\x5a" * 1024)
    drv.post(0, [(HDR, 4, False), (HDR + 4, 12, False), (DATA, 300, False),
                 (DATA + 300, 724, False), (STATUS, 1, True)])
    assert mem.read(STATUS, 1) == bytes((b.S_OK,))
    assert image.read_bytes()[3 * 512:5 * 512] == b"\x5a" * 1024


def test_blk_read_of_a_shrunk_image_gives_zeros(h: Harness, blk: VirtioBlk,
                                                image: Path) -> None:
    drv = start(blk, h.ctx.memory)
    h.ctx.memory.write(DATA, b"\xee" * 1024)
    with open(image, "r+b") as f:
        f.truncate(512 * 6 + 100)
    assert request(h, drv, b.T_IN, 6, 1024) == b.S_OK
    assert h.ctx.memory.read(DATA, 1024) == (bytes(range(256)) * 2)[:100] + bytes(924)


def test_handler_memory_error_needs_reset_instead_of_raising(h: Harness) -> None:
    class Racy(v.VirtioMmio):
        def handle_chain(self, index: int, buffers: list[v.Buffer]) -> int:
            raise GuestMemoryError("region went away")

    dev = Racy(h.ctx)
    drv = start(dev, h.ctx.memory)
    drv.post(0, [(DATA, 16, False)])
    assert dev.broken and drv.r32(v.REG_STATUS) & v.STATUS_NEEDS_RESET


def test_console_pending_input_is_bounded(h: Harness) -> None:
    from kvmfw_devices import virtio_console as vc
    con = VirtioConsole(h.ctx, output="none")
    con.enqueue(b"x" * (vc.PENDING_LIMIT + 10))
    assert len(con.pending) == vc.PENDING_LIMIT
    other = VirtioConsole(h.ctx, output="none")
    other.restore({**con.save(), "pending": "ab" * (vc.PENDING_LIMIT + 5)})
    assert len(other.pending) == vc.PENDING_LIMIT


@pytest.mark.parametrize("bad", [{"num": 6}, {"num": 0}, {"num": 1 << 20}, {"desc": "x"},
                                 {"used_idx": None}])
def test_restore_refuses_bad_queue_state(h: Harness, blk: VirtioBlk, bad: dict) -> None:
    state = blk.save()
    state["queues"][0].update(bad)
    with pytest.raises(CheckpointError):
        VirtioBlk(h.ctx, file=blk.params["file"]).restore(state)
