"""Device writes into guest RAM through views (virtio, fw_cfg DMA, pseudo-op readfile) are
marked dirty (``GuestMemory.mark_dirty``): KVM's dirty log does not see them, and a
snapshot reset or an incremental checkpoint would otherwise miss them."""

from __future__ import annotations

import struct
from pathlib import Path

from conftest import Harness
from test_pseudo_op import call, put_string
from test_virtio import DATA, STATUS, request
from virtio_driver import Driver

from kvmfw_devices import fw_cfg as f
from kvmfw_devices import pseudo_op as p
from kvmfw_devices import virtio_blk as b
from kvmfw_devices.fw_cfg import FwCfg
from kvmfw_devices.pseudo_op import PseudoOp
from kvmfw_devices.virtio_blk import VirtioBlk

PAGE = 4096


class MarkRecorder:
    """Stands in for the VM's dirty log (``GuestMemory.dirty``): records marked pages."""

    def __init__(self) -> None:
        self.pages: set[int] = set()

    def mark(self, region: object, offset: int, length: int) -> None:
        self.pages.update(range(offset // PAGE, (offset + length - 1) // PAGE + 1))


def _track(h: Harness) -> MarkRecorder:
    rec = MarkRecorder()
    h.ctx.memory.dirty = rec  # type: ignore[assignment]
    return rec


def test_virtio_blk_read_marks_data_and_status(h: Harness, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(512 * 8))
    blk = VirtioBlk(h.ctx, file=str(img))
    drv = Driver(blk, h.ctx.memory)
    drv.start(1)
    rec = _track(h)
    assert request(h, drv, b.T_IN, 0, PAGE) == b.S_OK
    assert {DATA // PAGE, STATUS // PAGE} <= rec.pages  # the sectors read, the status


def test_fw_cfg_dma_marks_the_destination(h: Harness) -> None:
    dev = FwCfg(h.ctx)
    rec = _track(h)
    h.ctx.memory.write(0x1000, struct.pack(">IIQ", (f.FW_CFG_SIGNATURE << 16)
                                           | f.DMA_CTL_SELECT | f.DMA_CTL_READ, 4, 0x5000))
    rec.pages.clear()
    dev.write(4, (0).to_bytes(4, "big"))
    dev.write(8, (0x1000).to_bytes(4, "big"))
    assert h.ctx.memory.read(0x5000, 4) == b"QEMU"
    assert rec.pages == {0x5, 0x1}  # the data and the descriptor's status word


def test_pseudo_op_read_file_marks_what_it_read(h: Harness, tmp_path: Path) -> None:
    dev = PseudoOp(h.ctx, dir=str(tmp_path))
    (tmp_path / "in.bin").write_bytes(b"y" * (PAGE + 10))
    put_string(h, 0x1000, "in.bin")
    rec = _track(h)
    rec.pages.clear()
    assert call(dev, p.OP_READ_FILE, 0x7000 + 100, 2 * PAGE, 0, 0x1000) == PAGE + 10
    assert rec.pages == {0x7, 0x8}
