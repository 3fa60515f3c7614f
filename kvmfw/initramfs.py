"""Linux initramfs images with their compressed parts decompressed on the host, once, cached.

An initramfs is a run of cpio archives (``newc``: magic ``070701`` or ``070702``), each
stored or compressed, with zero bytes between them; Linux's ``unpack_to_rootfs`` walks it
the same way. Given a compressed one, the guest inflates it before ``/init`` can run:
under nested virtualization or TCG a few hundred milliseconds of the boot for a 1 MiB
gzip. A loader asks :func:`uncompressed` instead: kvmfw decompresses every compressed part
on the host, at most once per file (:func:`kvmfw.cache.derived`), and the guest gets the
same archives stored, in the same order, so what it unpacks into its root file system is
the same, file for file.

Formats: gzip, XZ, LZMA and bzip2 (the standard library) and zstd (the ``zstandard``
package, when installed: Debian's ``mkinitramfs`` default). LZ4, LZO, anything unknown or
malformed, or an image with nothing compressed, gives None: the loader hands the guest the
file as it is, and the guest's unpacker decides, as without kvmfw. Every size is bounded:
the result is at most ``limit`` bytes, and no decompressor is let produce more.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from typing import Any

from kvmfw import cache
from kvmfw.imagefile import FileMapping, map_file

TAG = "initramfs-1"
"""Cache tag: what :func:`flatten` produces (change it when that changes)."""
CPIO_MAGICS = (b"070701", b"070702")
CPIO_HEADER = 110
"""A ``newc`` header: the magic and 13 eight-digit hex fields."""
TRAILER = b"TRAILER!!!\0"
ZSTD_FEED = 512
"""zstd input is fed this many bytes at a time: a zstd block of 3 bytes can stand for
128 KiB, so one feed can overshoot ``limit`` by at most ~22 MiB before it is refused."""


def archive(entries: Iterable[tuple[Any, ...]]) -> bytes:
    """A stored ``newc`` archive, with its trailer: an initramfs Linux unpacks as it is
    (compress it, and :func:`flatten` gives it back). ``entries``: ``(path, mode, data)``
    or ``(path, mode, data, (rdev_major, rdev_minor))``, in order (directories before what
    they hold); a device node needs no privileges to describe here."""
    out = bytearray()
    for ino, (path, mode, data, *rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"")], 1):
        name = path.lstrip("/").encode() + b"\0"
        major, minor = rdev[0] if rdev else (0, 0)
        fields = (0 if path == "TRAILER!!!" else ino, mode, 0, 0,
                  2 if mode & 0o170000 == 0o040000 else 1, 0, len(data), 0, 0, major, minor,
                  len(name), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name
        out += bytes(-len(out) % 4)
        out += data
        out += bytes(-len(out) % 4)
    return bytes(out)


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _cpio_end(data: memoryview, pos: int) -> int | None:
    """Where the stored archive at ``pos`` ends (after its trailer entry's padding), or
    None when it is malformed or runs past the image."""
    end = len(data)
    p = pos
    while True:
        hdr = bytes(data[p:p + CPIO_HEADER])
        if len(hdr) < CPIO_HEADER or hdr[:6] not in CPIO_MAGICS:
            return None
        try:
            filesize = int(hdr[54:62], 16)
            namesize = int(hdr[94:102], 16)
        except ValueError:
            return None
        name = bytes(data[p + CPIO_HEADER:p + CPIO_HEADER + min(namesize, len(TRAILER))])
        p = pos + _align4(p - pos + CPIO_HEADER + namesize)
        p = pos + _align4(p - pos + filesize)
        if p > end:
            return None
        if namesize == len(TRAILER) and name == TRAILER:
            return p


def _zero_run(data: memoryview, pos: int) -> int:
    """The number of zero bytes at ``pos``."""
    n = 0
    while pos + n < len(data):
        chunk = bytes(data[pos + n:pos + n + 65536])
        rest = chunk.lstrip(b"\0")
        n += len(chunk) - len(rest)
        if rest:
            break
    return n


def _inflate(data: memoryview, room: int) -> tuple[bytes, int] | None:
    """The decompressed member at the start of ``data`` (at most ``room`` bytes) and the
    number of compressed bytes it took, or None (unknown format, corrupt, truncated, too
    large, or a package missing)."""
    if room <= 0:
        return None
    head = bytes(data[:6])
    d: Any
    errors: tuple[type[Exception], ...]
    if head[:2] == b"\x1f\x8b":
        import zlib

        d, errors = zlib.decompressobj(16 + zlib.MAX_WBITS), (zlib.error,)
    elif head == b"\xfd7zXZ\x00" or head[:3] == b"\x5d\x00\x00":
        import lzma

        d, errors = lzma.LZMADecompressor(), (lzma.LZMAError,)
    elif head[:3] == b"BZh":
        import bz2

        d, errors = bz2.BZ2Decompressor(), (OSError,)
    elif head[:4] == b"\x28\xb5\x2f\xfd":
        return _zstd(data, room)
    else:
        return None
    try:
        out = d.decompress(data, room + 1)
    except errors:
        return None
    if not d.eof or len(out) > room:  # truncated, or more than fits
        return None
    return out, len(data) - len(d.unused_data)


def _zstd(data: memoryview, room: int) -> tuple[bytes, int] | None:
    try:
        import zstandard
    except ImportError:
        return None
    d = zstandard.ZstdDecompressor().decompressobj()
    out = bytearray()
    pos = 0
    try:
        while not d.eof and pos < len(data) and len(out) <= room:
            out += d.decompress(data[pos:pos + ZSTD_FEED])
            pos += ZSTD_FEED
    except zstandard.ZstdError:
        return None
    if not d.eof or len(out) > room:
        return None
    return bytes(out), min(pos, len(data)) - len(d.unused_data)


def flatten(data: Any, limit: int) -> bytes | None:
    """``data`` (an initramfs image) with every compressed part replaced by what it
    decompresses to, each part starting 4-byte aligned as Linux requires; None when
    nothing in it is compressed, or anything in it cannot be read here, or the result
    would exceed ``limit`` bytes."""
    view = memoryview(data)
    try:
        return _flatten(view, limit)
    finally:
        view.release()


def _flatten(data: memoryview, limit: int) -> bytes | None:
    parts: list[Any] = []
    size = 0
    pos, end = 0, len(data)
    compressed = False
    while pos < end:
        if data[pos] == 0:  # padding between archives
            pos += _zero_run(data, pos)
            continue
        if bytes(data[pos:pos + 6]) in CPIO_MAGICS:
            if pos % 4:
                return None  # Linux refuses a misaligned archive: let it say so
            stop = _cpio_end(data, pos)
            if stop is None:
                return None
            part: Any = data[pos:stop]
            pos = stop
        else:
            got = _inflate(data[pos:], limit - size)
            if got is None:
                return None
            part, used = got
            if bytes(part[:6]) not in CPIO_MAGICS:
                return None  # not an initramfs member
            pos += used
            compressed = True
        parts.append(part)
        size += _align4(len(part))
        if size > limit:
            return None
        parts.append(bytes(_align4(len(part)) - len(part)))
    return b"".join(parts) if compressed else None


def uncompressed(path: str, limit: int,
                 log: Callable[[str], None] | None = None) -> Any | None:
    """The initramfs at ``path`` with its compressed parts decompressed (a read-only
    :class:`~kvmfw.imagefile.FileMapping` of the cached file, or bytes), or None when
    there is nothing to gain or it cannot be done here (``log`` gets why, if given):
    the loader then loads the file as it is. Only a regular file is opened: opening a
    FIFO, even to look, would pair with its writer and take the data the loader reads."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as exc:
        regular, why = False, exc.strerror
    else:
        why = "not a regular file"
    if not regular:
        if log:
            log(f"initramfs {path}: {why}; the guest unpacks it as it is")
        return None

    def make() -> bytes | None:
        try:
            src = map_file(path)
        except (OSError, ValueError) as exc:
            if log:
                log(f"initramfs {path}: {exc}")
            return None
        try:
            out = flatten(src, limit)
        finally:
            if isinstance(src, FileMapping):
                src.close()
        if out is None and log:
            log(f"initramfs {path}: nothing compressed, or not in a format decompressed "
                "here; the guest unpacks it as it is")
        return out

    return cache.derived(path, "initramfs", TAG, make)
