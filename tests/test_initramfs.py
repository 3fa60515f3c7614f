"""kvmfw.initramfs: an initramfs's compressed parts decompressed on the host, the guest's
view unchanged (the same archives, stored), and every size bounded."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from kvmfw import initramfs


def cpio(*files: tuple[str, bytes]) -> bytes:
    return initramfs.archive((name, 0o100644, data) for name, data in files)


A = cpio(("init", b"#!/bin/sh\necho hello\n"), ("etc/motd", b"x" * 1000))
B = cpio(("lib/modules/m.ko", os.urandom(3000)))


def flat(data: bytes, limit: int = 1 << 20) -> bytes | None:
    return initramfs.flatten(data, limit)


@pytest.mark.parametrize("pack", [gzip.compress, lzma.compress, bz2.compress,
                                  lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE)],
                         ids=["gzip", "xz", "bzip2", "lzma"])
def test_a_compressed_archive_becomes_the_stored_archive(pack: object) -> None:
    assert flat(pack(A)) == A  # type: ignore[operator]


def test_zstd_when_the_package_is_there() -> None:
    zstandard = pytest.importorskip("zstandard", reason="zstandard is not installed")
    assert flat(zstandard.ZstdCompressor().compress(A)) == A


def test_stored_and_compressed_parts_keep_their_order_and_alignment() -> None:
    # Debian's layout: an early stored archive (microcode), then the compressed main one;
    # the zeros between parts go (Linux skips them), each part starts 4-byte aligned
    image = A + bytes(-len(A) % 512) + gzip.compress(B) + bytes(13) + lzma.compress(A)
    assert flat(image + bytes(4)) == A + B + A
    # concatenated gzip members, and a part whose length is not a multiple of 4
    odd = A + bytes(2)
    out = flat(gzip.compress(odd) + gzip.compress(B))
    assert out == odd + bytes(2) + B


def test_nothing_compressed_or_nothing_known_is_left_to_the_guest() -> None:
    assert flat(A) is None  # nothing to gain
    assert flat(b"") is None
    assert flat(bytes(4096)) is None
    assert flat(b"\x89LZO\0" + bytes(100)) is None  # LZO: not decompressed here
    assert flat(b"hello world") is None
    assert flat(gzip.compress(b"not a cpio archive at all")) is None


def test_malformed_images_are_left_to_the_guest() -> None:
    g = gzip.compress(A)
    assert flat(g[:-9]) is None  # truncated member
    assert flat(g[:10] + bytes(len(g) - 10)) is None  # corrupt
    bad = bytearray(A)
    bad[54:62] = b"FFFFFFFF"  # the first entry's file size runs past the image
    assert flat(bytes(bad) + gzip.compress(B)) is None
    bad = bytearray(A)
    bad[94:102] = b"zzzzzzzz"  # not hex
    assert flat(bytes(bad) + gzip.compress(B)) is None
    assert flat(A[:200] + gzip.compress(B)) is None  # a stored archive with no trailer
    assert flat(b"\0\0" + A + gzip.compress(B)) is None  # misaligned: Linux refuses it


def test_the_result_is_bounded_before_it_is_made() -> None:
    big = cpio(("zeros", bytes(4 << 20)))
    g = gzip.compress(big)
    assert len(g) < 10_000  # a small file that says 4 MiB
    assert flat(g, limit=len(big)) == big
    assert flat(g, limit=len(big) - 1) is None
    assert flat(lzma.compress(big), limit=1 << 20) is None
    assert flat(bz2.compress(big), limit=1 << 20) is None
    assert flat(A + gzip.compress(B), limit=len(A)) is None


def test_zstd_output_is_bounded() -> None:
    zstandard = pytest.importorskip("zstandard", reason="zstandard is not installed")
    big = cpio(("zeros", bytes(64 << 20)))
    z = zstandard.ZstdCompressor().compress(big)
    assert flat(z, limit=1 << 20) is None
    assert flat(z, limit=len(big)) == big


def test_uncompressed_caches_the_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    d = tmp_path
    monkeypatch.setenv("KVMFW_CACHE", str(d / "cache"))
    src = d / "initrd.img"
    src.write_bytes(gzip.compress(A))
    why: list[str] = []
    first = initramfs.uncompressed(str(src), 1 << 20, why.append)
    assert bytes(first) == A and not why
    (entry,) = (d / "cache" / "initramfs").iterdir()
    second = initramfs.uncompressed(str(src), 1 << 20, why.append)
    assert bytes(second) == A and second.fd >= 0  # mapped from the cache entry
    second.close()
    assert entry.read_bytes() == A
    stored = d / "stored.img"
    stored.write_bytes(A)
    assert initramfs.uncompressed(str(stored), 1 << 20, why.append) is None
    assert "nothing compressed" in why[-1]
    assert initramfs.uncompressed(str(d / "missing"), 1 << 20, why.append) is None
    # a FIFO is not even opened: an open would pair with its writer, which then hands
    # its data to a reader that drops it, and the loader's own read would wait forever
    os.mkfifo(d / "fifo")
    writer = threading.Thread(target=(d / "fifo").write_bytes, args=(A,))
    writer.start()
    assert initramfs.uncompressed(str(d / "fifo"), 1 << 20, why.append) is None
    assert "not a regular file" in why[-1]
    writer.join(0.2)
    assert writer.is_alive()  # still waiting for the loader's reader
    assert (d / "fifo").read_bytes() == A
    writer.join(10)


def test_archive_is_what_cpio_reads(tmp_path: Path) -> None:
    """The archive builder against GNU cpio (when installed): names, modes and bytes."""
    if shutil.which("cpio") is None:
        pytest.skip("GNU cpio is not installed (apt install cpio)")
    d = tmp_path
    data = initramfs.archive([("/etc", 0o040755, b""), ("etc/motd", 0o100644, b"hi\n"),
                              ("init", 0o100755, b"#!/bin/sh\n" + os.urandom(999))])
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=data, cwd=d,
                   check=True)
    assert (d / "etc" / "motd").read_bytes() == b"hi\n" and (d / "etc").is_dir()
    assert (d / "init").read_bytes()[:10] == b"#!/bin/sh\n" and (d / "init").stat().st_size == 1009
    assert (d / "init").stat().st_mode & 0o777 == 0o755
