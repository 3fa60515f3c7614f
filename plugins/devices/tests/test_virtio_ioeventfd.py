"""virtio-mmio QueueNotify through KVM_IOEVENTFD (issue 13): taken, and invisible to the
guest (the same guest gives the same results with it off)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_guests_kvm import build as build  # noqa: F401  (the fixture)
from test_guests_kvm import pytestmark as pytestmark  # noqa: F401
from test_guests_kvm import run


@pytest.mark.parametrize("ioeventfd", ["on", "off"])
def test_virtio_blk_guest_same_results_with_and_without_ioeventfd(
        build, tmp_path: Path, ioeventfd: str) -> None:  # type: ignore[no-untyped-def]
    """The miniature virtio-blk driver writes a sector, reads it back and compares: same
    console bytes and disk contents either way. With ioeventfd on, both QueueNotify
    writes complete in KVM (no MMIO exit reaches the device for them) and are served from
    the event queue."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * 512))
    result, out, m = run(build("virtio_blk"), [
        "uart16550", "debug-exit",
        f"virtio-blk,file={image},base=0xd0000000,irq=5,ioeventfd={ioeventfd}"])
    assert result.status == 1, out
    assert out == b"\x00\x00\x01"  # OK, OK, data matched
    assert image.read_bytes()[512:1024] == bytes(range(256)) * 2
    blk = m.devices[2]
    assert blk.stats["notifications"] == 2 and blk.stats["chains"] == 2
    if ioeventfd == "on":
        assert blk.stats["ioeventfd_notifications"] == 2
    else:
        assert blk.stats["ioeventfd_notifications"] == 0
    # the closed machine released its doorbells (eventfds and the helper thread)
    assert blk.doorbells is None


def test_ioeventfd_writes_do_not_reach_the_device(build, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The notify write is not an MMIO exit: the device sees two register writes fewer."""
    counts = {}
    for mode in ("on", "off"):
        image = tmp_path / f"disk-{mode}.img"
        image.write_bytes(bytes(4 * 512))
        result, out, m = run(build("virtio_blk"), [
            "uart16550", "debug-exit",
            f"virtio-blk,file={image},base=0xd0000000,irq=5,ioeventfd={mode}"])
        assert result.status == 1, out
        counts[mode] = m.devices[2].stats["writes"]
    assert counts["off"] - counts["on"] == 2


def test_doorbells_close_their_fds(build, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    before = len(os.listdir("/proc/self/fd"))
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * 512))
    for _ in range(3):
        result, _, _ = run(build("virtio_blk"), [
            "uart16550", "debug-exit", f"virtio-blk,file={image},base=0xd0000000,irq=5"])
        assert result.status == 1
    assert len(os.listdir("/proc/self/fd")) <= before + 1
