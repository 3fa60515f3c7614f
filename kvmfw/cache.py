"""kvmfw's on-disk cache: files derived from a guest image, made once and reused.

A Linux kernel is shipped compressed (``vmlinuz``); decompressing it costs every boot a
second or more where the host is slow (under nested virtualization, or TCG). A plugin
that can boot the decompressed kernel asks :func:`derived` for it: the first boot makes it
and stores it under ``$XDG_CACHE_HOME/kvmfw/<kind>/`` (``~/.cache/kvmfw``; ``$KVMFW_CACHE``
overrides the base, ``KVMFW_CACHE=off`` disables the cache), later boots map the stored
file.

An entry is keyed, as ccache's direct mode and make do, by what ``stat`` says of the source
(device, inode, size, modification and change times) and a plugin-given tag
(its format version): a kernel replaced or rewritten in place gets a new key, so a stale
entry is never used. Entries are written to a temporary file and renamed, so a crash or a
concurrent boot never leaves a half-written one; the ``MAX_ENTRIES`` most recent per kind
are kept. What a plugin reads back from an entry is a file like any other: it validates it
as it would validate the image.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from kvmfw.imagefile import map_file

MAX_ENTRIES = 8
"""Entries kept per kind (the oldest by modification time are removed beyond it)."""


def base_dir() -> str | None:
    """The cache's base directory, or None when there is none (``KVMFW_CACHE=off``, or no
    home directory to put it in)."""
    base = os.environ.get("KVMFW_CACHE")
    if base == "off":
        return None
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                               ".cache")
        if not xdg or xdg.startswith("~"):
            return None
        base = os.path.join(xdg, "kvmfw")
    return base


def _key(source: str, tag: str) -> str | None:
    """The entry's file name: the tag and the source's identity (device and inode) and
    version (size, modification and change times) as ``stat`` gives them. Nothing is
    hashed: hashlib and tempfile alone cost a start-up 0.1 s where the host is emulated."""
    if not tag or not all(c.isalnum() or c in "-_." for c in tag):
        raise ValueError(f"cache tag {tag!r}: letters, digits, '-', '_' and '.' only")
    try:
        st = os.stat(source)
    except OSError:
        return None
    return f"{tag}-{st.st_dev:x}-{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}-" \
           f"{st.st_ctime_ns:x}"


def derived(source: str, kind: str, tag: str,
            make: Callable[[], bytes | bytearray | None]) -> Any:
    """The cached file derived from ``source`` (a read-only
    :class:`~kvmfw.imagefile.FileMapping`: load it into guest RAM with
    :meth:`~kvmfw.memory.GuestMemory.load`), made by ``make()``
    the first time; None when ``make`` returns None (nothing to derive). Without a usable
    cache directory ``make()``'s bytes are returned as they are. ``kind`` names the
    subdirectory; change ``tag`` when what ``make`` produces changes."""
    base = base_dir()
    key = _key(source, tag) if base else None
    if base is None or key is None:
        return make()
    d = os.path.join(base, kind)
    path = os.path.join(d, key)
    try:
        hit = map_file(path)
    except (OSError, ValueError):
        pass
    else:
        try:
            os.utime(path)  # recently used: the last to be evicted
        except OSError:
            pass
        return hit
    out = make()
    if out is None:
        return None
    try:
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".tmp-{os.getpid()}-{time.monotonic_ns():x}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(out)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        _evict(d)
    except OSError:
        pass  # a read-only or full cache: boot from the bytes made (and make them again)
    return out


def _evict(d: str) -> None:
    """Keep the ``MAX_ENTRIES`` most recently used entries, and drop temporary files a
    killed writer left (older than an hour: a concurrent writer may still own a new one)."""
    try:
        now = time.time()
        entries = []
        for e in os.scandir(d):
            if not e.is_file(follow_symlinks=False):
                continue
            if e.name.startswith(".tmp-"):
                if now - e.stat().st_mtime > 3600:
                    os.unlink(e.path)
            else:
                entries.append(e)
        entries.sort(key=lambda e: e.stat().st_mtime_ns, reverse=True)
        for e in entries[MAX_ENTRIES:]:
            os.unlink(e.path)
    except OSError:
        pass
