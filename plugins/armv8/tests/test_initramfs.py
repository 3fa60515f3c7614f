"""The Linux boot test's initramfs: a newc cpio archive the kernel can unpack (any host)."""

from __future__ import annotations

import gzip
import stat

from kvmfw_armv8.testing import BOOT_MARKER, READY_PROMPT, busybox_initramfs, newc_archive


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """``{path: (mode, data, (rdev major, minor))}`` of a newc archive, as the kernel's
    init/initramfs.c reads it (6-byte magic, 13 hex fields, name and data 4-byte aligned)."""
    out: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        pos += 110
        name = data[pos:pos + namesize - 1].decode()
        assert data[pos + namesize - 1] == 0
        pos = (pos + namesize + 3) & ~3
        body = data[pos:pos + filesize]
        pos = (pos + filesize + 3) & ~3
        if name == "TRAILER!!!":
            assert pos == len(data)
            return out
        out[name] = (mode, body, (rmaj, rmin))


def test_newc_archive_round_trips_files_directories_and_device_nodes() -> None:
    entries = [("d", stat.S_IFDIR | 0o755, b"", (0, 0)),
               ("d/f", stat.S_IFREG | 0o644, b"hello", (0, 0)),
               ("/dev-null", stat.S_IFCHR | 0o666, b"", (1, 3))]
    got = read_newc(newc_archive(entries))
    assert got == {"d": (stat.S_IFDIR | 0o755, b"", (0, 0)),
                   "d/f": (stat.S_IFREG | 0o644, b"hello", (0, 0)),
                   "dev-null": (stat.S_IFCHR | 0o666, b"", (1, 3))}


def test_busybox_initramfs_has_a_console_and_an_init_that_powers_off() -> None:
    busybox = b"\x7fELF-static-busybox" * 100
    files = read_newc(gzip.decompress(busybox_initramfs(busybox)))
    assert files["bin/busybox"] == (stat.S_IFREG | 0o755, busybox, (0, 0))
    assert files["dev/console"] == (stat.S_IFCHR | 0o600, b"", (5, 1))
    mode, init, _ = files["init"]
    assert mode & 0o111 and init.startswith(b"#!/bin/busybox sh\n")
    text = init.decode()
    assert text.index(READY_PROMPT) < text.index("read -r") < text.index(BOOT_MARKER)
    assert text.rstrip().endswith("poweroff -f")
