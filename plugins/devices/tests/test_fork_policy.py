"""What devices do with their host resources in a forked child (``Device.after_fork``):
console output to ``<path>.<pid>``, console input left to the parent, disk images
copy-on-write, pseudo-op host files per child. The hook is called here as the fork calls
it in the child; one test forks for real to show the parent's resources are untouched."""

from __future__ import annotations

import os
import shutil
import socket
import struct
from pathlib import Path

import pytest
from conftest import Harness
from kvmfw.errors import CheckpointError, DeviceError
from test_virtio import DATA, request
from virtio_driver import Driver

from kvmfw_devices import virtio_blk as b
from kvmfw_devices.pseudo_op import PseudoOp
from kvmfw_devices.uart16550 import Uart16550
from kvmfw_devices.virtio_blk import VirtioBlk
from kvmfw_devices.virtio_console import VirtioConsole


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_uart_output_file_goes_per_child(h: Harness, tmp_path: Path) -> None:
    out = tmp_path / "console.txt"
    u = Uart16550(h.ctx, output=f"file:{out}", input="none")
    u.write(0, b"P")
    u.save()  # a fork captures the state first (and so writes out batched output)
    n = _fds()
    u.after_fork(4242)
    assert _fds() == n  # the inherited descriptor closed, the child's own opened
    u.write(0, b"C")
    u.close()
    assert out.read_bytes() == b"P"
    assert (tmp_path / "console.txt.4242").read_bytes() == b"C"


def test_virtio_console_input_socket_is_closed_not_shut_down(h: Harness,
                                                              tmp_path: Path) -> None:
    path = tmp_path / "sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    dev = VirtioConsole(h.ctx, input=f"unix:{path}", output="none")
    peer, _ = srv.accept()
    pid = os.fork()
    if pid == 0:  # the child drops its references only
        try:
            dev.after_fork(os.getpid())
            dev.close()
        finally:
            os._exit(0)
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0
    peer.setblocking(False)
    try:  # the connection is still open: no EOF (a shutdown in the child would give one)
        assert peer.recv(1) != b""
    except BlockingIOError:
        pass
    assert dev.input._sock is not None
    dev.close()
    peer.close()
    srv.close()


def test_virtio_blk_child_writes_to_an_overlay_never_the_image(h: Harness,
                                                               tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    original = bytes(range(256)) * 2 * 8  # 8 sectors
    image.write_bytes(original)
    blk = VirtioBlk(h.ctx, file=str(image))
    drv = Driver(blk, h.ctx.memory)
    drv.start(1)
    blk.after_fork(4242)
    assert request(h, drv, b.T_OUT, 2, 0, b"\xab" * 1024) == b.S_OK  # sectors 2 and 3
    assert image.read_bytes() == original
    assert request(h, drv, b.T_IN, 1, 2048) == b.S_OK  # sectors 1..4: image, overlay, image
    got = h.ctx.memory.read(DATA, 2048)
    assert got == original[512:1024] + b"\xab" * 1024 + original[2048:2560]
    # a read split over two buffers, across the image/overlay boundary mid-buffer
    h.ctx.memory.write(0x40000, struct.pack("<IIQ", b.T_IN, 0, 1))
    bufs = [(0x40000, 16, False), (DATA, 700, True), (DATA + 0x2000, 324, True),
            (0x42000, 1, True)]
    drv.post(0, bufs)
    assert h.ctx.memory.read(0x42000, 1)[0] == b.S_OK
    assert h.ctx.memory.read(DATA, 700) + h.ctx.memory.read(DATA + 0x2000, 324) == \
        original[512:1024] + b"\xab" * 512
    n = _fds()
    blk.close()
    assert _fds() == n - 2  # the image and the overlay


def test_virtio_blk_snapshot_on_never_writes_the_image(h: Harness, tmp_path: Path) -> None:
    """snapshot=on: the guest reads its own writes back, the image stays as it was (and
    is opened read-only), and a fork of such a disk copies the overlay, never shares it."""
    image = tmp_path / "disk.img"
    original = bytes(range(256)) * 2 * 9  # 9 sectors: the bitmap's last byte is partial
    image.write_bytes(original)
    blk = VirtioBlk(h.ctx, file=str(image), snapshot="on")
    with pytest.raises(OSError):  # the image is open read-only
        os.pwrite(blk.fd, b"x", 0)
    drv = Driver(blk, h.ctx.memory)
    drv.start(1)
    assert blk.host_files() == [str(image)]  # nothing written yet: the image is the disk
    assert request(h, drv, b.T_OUT, 8, 0, b"\xcd" * 512) == b.S_OK  # the last sector
    assert request(h, drv, b.T_IN, 7, 1024) == b.S_OK
    assert h.ctx.memory.read(DATA, 1024) == original[3584:4096] + b"\xcd" * 512
    assert image.read_bytes() == original
    assert blk.host_files() == [str(image)]  # (the overlay goes into save_files)
    parent = os.dup(blk._cow_fd)  # the parent's overlay, as the parent keeps it
    blk.after_fork(4242)
    assert blk._cow_fd != parent
    assert request(h, drv, b.T_IN, 8, 512) == b.S_OK  # the parent's write came along
    assert h.ctx.memory.read(DATA, 512) == b"\xcd" * 512
    assert request(h, drv, b.T_OUT, 8, 0, b"\xef" * 512) == b.S_OK  # the child's own
    assert request(h, drv, b.T_IN, 8, 512) == b.S_OK
    assert h.ctx.memory.read(DATA, 512) == b"\xef" * 512
    assert os.pread(parent, 512, 8 * 512) == b"\xcd" * 512  # the parent's is untouched
    os.close(parent)
    assert image.read_bytes() == original
    blk.close()


def test_virtio_blk_overlay_round_trips_through_checkpoint_files(
        h: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """save_files/load_files: the overlay's sectors (and only those) into the checkpoint,
    back into a new device's own overlay; the image is named, never written; hostile
    files are refused."""
    (tmp_path / "disk.img").write_bytes(bytes(range(256)) * 2 * 20)  # 20 sectors
    monkeypatch.chdir(tmp_path)
    blk = VirtioBlk(h.ctx, file="disk.img", snapshot="on")
    assert blk.host_files() == [str(tmp_path / "disk.img")]
    empty = tmp_path / "empty"
    empty.mkdir()
    blk.save_files(str(empty))
    assert os.listdir(empty) == []  # nothing written: nothing saved
    drv = Driver(blk, h.ctx.memory)
    drv.start(1)
    for sector, byte in ((3, 0x11), (4, 0x22), (19, 0x33)):
        assert request(h, drv, b.T_OUT, sector, 0, bytes([byte]) * 512) == b.S_OK
    saved = tmp_path / "saved"
    saved.mkdir()
    blk.save_files(str(saved))
    assert sorted(os.listdir(saved)) == ["overlay.map", "overlay.sectors"]
    assert (saved / "overlay.sectors").read_bytes() == b"".join(
        bytes([x]) * 512 for x in (0x11, 0x22, 0x33))
    assert (saved / "overlay.map").read_bytes() == bytes([0x18, 0, 0x08])
    blk.close()
    again = VirtioBlk(h.ctx, file="disk.img", snapshot="on")
    again.load_files(str(saved))
    drv = Driver(again, h.ctx.memory)
    drv.start(1)
    assert request(h, drv, b.T_IN, 2, 4 * 512) == b.S_OK
    assert h.ctx.memory.read(DATA, 4 * 512) == bytes(range(256)) * 2 + bytes([0x11]) * 512 \
        + bytes([0x22]) * 512 + bytes(range(256)) * 2
    assert (tmp_path / "disk.img").read_bytes() == bytes(range(256)) * 2 * 20
    again.close()
    # hostile files: a map marking a sector past the end, sectors not matching the map
    for name, data, why in (("overlay.map", bytes([0x18, 0, 0x18]), "past the disk's end"),
                            ("overlay.map", bytes(4), "not 3 bytes"),
                            ("overlay.sectors", bytes(512), "not the 3 sectors")):
        bad = tmp_path / f"bad-{name}-{len(data)}"
        shutil.copytree(saved, bad)
        (bad / name).write_bytes(data)
        dev = VirtioBlk(h.ctx, file="disk.img", snapshot="on")
        with pytest.raises(CheckpointError, match=why):
            dev.load_files(str(bad))
        dev.close()
    ro = VirtioBlk(h.ctx, file="disk.img", readonly="on")
    with pytest.raises(CheckpointError, match="read-only"):
        ro.load_files(str(saved))
    ro.close()


def test_virtio_blk_names_its_image_for_checkpoints_and_saves_a_childs_overlay(
        h: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint names the image (absolute: a restore may run elsewhere); a forked
    child's writes, in its overlay, go into the checkpoint's files."""
    (tmp_path / "disk.img").write_bytes(bytes(4096))
    monkeypatch.chdir(tmp_path)
    blk = VirtioBlk(h.ctx, file="disk.img")
    assert blk.host_files() == [str(tmp_path / "disk.img")]
    drv = Driver(blk, h.ctx.memory)
    drv.start(1)
    blk.after_fork(4242)
    assert blk.host_files() == [str(tmp_path / "disk.img")]  # nothing written yet
    assert request(h, drv, b.T_OUT, 7, 0, b"\xab" * 512) == b.S_OK
    assert blk.host_files() == [str(tmp_path / "disk.img")]  # and the overlay is saved
    saved = tmp_path / "saved"
    saved.mkdir()
    blk.save_files(str(saved))
    assert (saved / "overlay.sectors").read_bytes() == b"\xab" * 512
    blk.close()


def test_pseudo_op_child_writes_its_own_directory(h: Harness, tmp_path: Path) -> None:
    d = PseudoOp(h.ctx, dir=str(tmp_path))
    (tmp_path / "in.txt").write_bytes(b"shared")
    d.after_fork(4242)
    mine = tmp_path / "fork.4242"
    assert mine.is_dir()
    h.ctx.memory.write(0x1000, b"out.txt\0")
    h.ctx.memory.write(0x2000, b"child")
    assert d._write_file(0x2000, 5, 0, 0x1000) == 5
    assert (mine / "out.txt").read_bytes() == b"child"
    assert not (tmp_path / "out.txt").exists()
    h.ctx.memory.write(0x1000, b"in.txt\0")
    assert d._read_file(0x3000, 6, 0, 0x1000) == 6  # not written here: read from dir
    assert h.ctx.memory.read(0x3000, 6) == b"shared"


def _disk(h: Harness, drv: Driver, sectors: int) -> bytes:
    """The whole disk as the guest reads it."""
    assert request(h, drv, b.T_IN, 0, sectors * 512) == b.S_OK
    return h.ctx.memory.read(DATA, sectors * 512)


def test_virtio_blk_snapshot_reset_puts_the_overlay_back(h: Harness, tmp_path: Path) -> None:
    """In-process snapshots of a snapshot=on disk: reset puts back what the guest read at
    the snapshot (sectors in the overlay then, overwritten since, from the undo log;
    sectors first written since, from the image), any number of times, with two
    snapshots live; a fork copies the logs; release and close free them."""
    image = tmp_path / "disk.img"
    original = b"".join(bytes([0x80 + i]) * 512 for i in range(16))
    image.write_bytes(original)
    blk = VirtioBlk(h.ctx, file=str(image), snapshot="on")
    drv = Driver(blk, h.ctx.memory)
    drv.start(1)

    def write(sector: int, byte: int, n: int = 1) -> None:
        assert request(h, drv, b.T_OUT, sector, 0, bytes([byte]) * 512 * n) == b.S_OK

    write(2, 0x11)  # in the overlay before the snapshot
    at_a = _disk(h, drv, 16)
    a = blk.snapshot_take()
    assert a is not None
    for round_ in range(3):
        write(2, 0x20 + round_)  # overwrites an overlay sector
        write(5, 0x30 + round_, 3)  # sectors first written since
        assert _disk(h, drv, 16) != at_a
        blk.snapshot_reset(a)
        assert _disk(h, drv, 16) == at_a
    write(7, 0x44)
    at_b = _disk(h, drv, 16)
    b_ = blk.snapshot_take()
    write(7, 0x55)
    write(2, 0x66)
    blk.snapshot_reset(a)  # back past b's take: b keeps what it needs first
    assert _disk(h, drv, 16) == at_a
    blk.snapshot_reset(b_)
    assert _disk(h, drv, 16) == at_b
    blk.after_fork(4242)  # the child's own overlay and logs
    write(2, 0x77)
    blk.snapshot_reset(a)
    assert _disk(h, drv, 16) == at_a
    n = _fds()
    blk.snapshot_release(b_)
    assert _fds() == n - 1
    assert image.read_bytes() == original
    blk.snapshot_release(a)
    blk.close()
    with pytest.raises(DeviceError, match="does not hold"):
        blk.snapshot_reset(a)


def test_virtio_blk_without_an_overlay_takes_no_snapshot(h: Harness, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    blk = VirtioBlk(h.ctx, file=str(image))
    assert blk.snapshot_take() is None  # a plain disk: its writes stay (documented)
    blk.close()


def test_virtio_blk_fork_keeps_sectors_only_a_live_snapshot_holds(
        h: Harness, tmp_path: Path) -> None:
    """A reset to an older snapshot clears a sector's bit but keeps its contents for a
    newer live snapshot; a fork then must copy it too."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(8 * 512))
    blk = VirtioBlk(h.ctx, file=str(image), snapshot="on")
    drv = Driver(blk, h.ctx.memory)
    drv.start(1)
    older = blk.snapshot_take()  # before sector 3 is written
    assert request(h, drv, b.T_OUT, 3, 0, b"\x11" * 512) == b.S_OK
    newer = blk.snapshot_take()  # holds sector 3
    blk.snapshot_reset(older)
    assert _disk(h, drv, 8) == bytes(8 * 512)
    blk.after_fork(4242)
    blk.snapshot_reset(newer)
    assert _disk(h, drv, 8)[3 * 512:4 * 512] == b"\x11" * 512
    blk.close()
