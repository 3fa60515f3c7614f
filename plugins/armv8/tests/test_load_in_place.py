"""An uncompressed arm64 Image and the initrd are read straight into guest RAM: loading them
makes no host copy (the boot benchmark's kernel is 33 MiB), and what does not fit is refused
before anything is read."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.arm64_kvm

RAM_BASE = 0x4000_0000
IMAGE_SIZE = 24 << 20
INITRD_SIZE = 4 << 20
HOST_COPY = 2 << 20
"""Python allocations while loading must stay below this: far less than either file."""


def _image(path: Path, size: int) -> Path:
    """A synthetic Image: header (text_offset 0, 4 KiB pages, anywhere), zeros (sparse),
    and a tail marker in its last 8 bytes."""
    hdr = struct.pack("<IIQQQQQQII", 0x14000000, 0, 0, size, 0b1010, 0, 0, 0, 0x644D5241, 0)
    with open(path, "wb") as f:
        f.write(hdr)
        f.truncate(size - 8)
        f.seek(size - 8)
        f.write(b"IMG-TAIL")
    return path


def _blob(path: Path, size: int, tail: bytes) -> Path:
    with open(path, "wb") as f:
        f.truncate(size - len(tail))
        f.seek(size - len(tail))
        f.write(tail)
    return path


def _load(m: Any, image: Path, initrd: Path | None) -> int:
    """load_guest; the peak of Python allocations meanwhile, in bytes."""
    opts = {"initrd": str(initrd)} if initrd else {}
    tracemalloc.start()
    try:
        m.hooks.call("load_guest", machine=m, image=str(image), options=opts)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_image_and_initrd_go_straight_into_guest_ram(build: Any, tmp_path: Path) -> None:
    from kvmfw_armv8 import plugin

    m, _ = build()
    image = _image(tmp_path / "Image", IMAGE_SIZE)
    initrd = _blob(tmp_path / "initrd", INITRD_SIZE, b"RD-TAIL!")
    peak = _load(m, image, initrd)
    assert peak < HOST_COPY, f"loading allocated {peak} bytes: a host copy of the files"
    assert m.memory.read(RAM_BASE, 4) == struct.pack("<I", 0x14000000)
    assert m.memory.read(RAM_BASE + IMAGE_SIZE - 8, 8) == b"IMG-TAIL"
    start, end = plugin.board_of(m).initrd
    assert end - start == INITRD_SIZE
    assert m.memory.read(end - 8, 8) == b"RD-TAIL!"
    assert m.cpus[0].context.pc == RAM_BASE


def test_what_does_not_fit_is_refused_before_it_is_read(build: Any, tmp_path: Path) -> None:
    from kvmfw.errors import ImageError

    m, _ = build()  # 64 MiB of RAM
    big = _image(tmp_path / "Image", 80 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="does not fit guest RAM"):
            m.hooks.call("load_guest", machine=m, image=str(big), options={})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < HOST_COPY, f"{peak} bytes allocated for an image that cannot fit"
    small = _image(tmp_path / "small", 1 << 20)
    rd = _blob(tmp_path / "initrd", 62 << 20, b"x")
    with pytest.raises(ImageError, match="initrd overlaps the kernel"):
        m.hooks.call("load_guest", machine=m, image=str(small), options={"initrd": str(rd)})


def test_an_initramfs_goes_in_decompressed_unless_decompress_guest(
        build: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on x86: what the guest would inflate is inflated on the host, once (cached)."""
    import gzip

    from kvmfw_armv8 import plugin

    from kvmfw import initramfs

    monkeypatch.setenv("KVMFW_CACHE", str(tmp_path / "cache"))
    image = _image(tmp_path / "Image", 1 << 20)
    cpio = initramfs.archive([("init", 0o100755, b"#!/bin/sh\necho hello\n" * 300)])
    rd = tmp_path / "initrd.img"
    rd.write_bytes(gzip.compress(cpio))
    for opts, want in (({}, cpio), ({}, cpio), ({"decompress": "guest"}, rd.read_bytes())):
        m, _ = build()
        m.hooks.call("load_guest", machine=m, image=str(image),
                     options={"initrd": str(rd), **opts})
        start, end = plugin.board_of(m).initrd
        assert start % 0x10000 == 0 and m.memory.read(start, end - start) == want
    assert len(list((tmp_path / "cache" / "initramfs").iterdir())) == 1
