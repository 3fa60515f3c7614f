"""The on-disk checkpoint format: names, the manifest's version rule, and the page scans
and hashes both the writer and the reader use (one definition, so they cannot disagree).

A checkpoint is a directory (``docs/checkpoint.md`` describes every file)::

    manifest.json     written last; names every other file with its size and sha256
    state.json        MachineState: cpus, vm, devices, time (plain data)
    stats.json        the statistics at the checkpoint (informational, not restored)
    ram/<i>.bin       guest RAM region i: a sparse file of the region's size, zero pages
                      are holes (full checkpoint) -- or, in an incremental checkpoint, only
                      the pages listed in ram/<i>.map (a bitmap, bit n = page n stored)

Versioning: ``FORMAT_VERSION`` is ``major.minor``. A minor bump only adds optional fields
or files that an older reader may ignore; anything else bumps the major. A reader accepts
every minor of its own major and refuses another major.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections.abc import Iterator
from typing import Any

from kvmfw.errors import CheckpointError

FORMAT_NAME = "kvmfw-checkpoint"
FORMAT_VERSION = (1, 2)
"""1.1 added the manifest's optional ``host_files``, 1.2 the devices' files
(``dev/<index>/<name>``); an older checkpoint has none of either."""
MANIFEST = "manifest.json"
STATE = "state.json"
STATS = "stats.json"
RAM_DIR = "ram"
MANIFEST_MAX = 16 << 20
"""Largest manifest a reader parses (a hostile file must not size an allocation)."""
STATE_MAX = 256 << 20
"""Largest state.json a reader parses (per-vCPU XSAVE/MSRs are a few KiB each)."""
PAGE_SIZES = (4096, 16384, 65536)
REGIONS_MAX = 512
"""Guest RAM regions a manifest may list (KVM's slot limit is below this)."""
CHAIN_MAX = 64
"""Incremental checkpoints a restore follows back to the full one."""
DEV_DIR = "dev"
DEV_FILES_MAX = 16
"""Files one device may write into a checkpoint (:meth:`Device.save_files
<kvmfw.device.Device.save_files>`)."""
DEV_FILE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
DEV_FILE_MAX = 1 << 44
"""Largest device file a reader hashes (a disk overlay holds at most the disk)."""
HOST_FILES_MAX = 1024
"""Host files (disk images) a manifest may list."""
CHUNK = 1 << 20
_ZERO_CHUNK = bytes(CHUNK)
_PRESENT = bytes(1 if b & 0xC0 else 0 for b in range(256))  # pagemap: present | swapped
_RUNS = re.compile(rb"\x01+")


def version_text(v: tuple[int, int] = FORMAT_VERSION) -> str:
    return f"{v[0]}.{v[1]}"


def parse_version(text: Any, where: str) -> tuple[int, int]:
    if not isinstance(text, str) or not re.fullmatch(r"\d{1,6}\.\d{1,6}", text):
        raise CheckpointError(f"{where}: version must be MAJOR.MINOR, not {text!r}")
    a, b = text.split(".")
    return int(a), int(b)


def file_identity(path: str) -> dict[str, int]:
    """What a checkpoint records of a host file a device reads (:meth:`Device.host_files
    <kvmfw.device.Device.host_files>`) and a restore compares: its size and modification
    time. Not a hash: a disk image may be large, and every write changes the time (a copy
    made with ``cp -p`` keeps it). Raises OSError."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def dev_dir(index: int) -> str:
    """Where device ``index`` (its place on the board) keeps its files."""
    return f"{DEV_DIR}/{index}"


def ram_file(index: int) -> str:
    return f"{RAM_DIR}/{index}.bin"


def ram_map(index: int) -> str:
    return f"{RAM_DIR}/{index}.map"


# --- page scans ----------------------------------------------------------------------------

def resident_runs(host_addr: int, size: int, page: int) -> list[tuple[int, int]] | None:
    """Page runs ``[start, end)`` of the mapping at ``host_addr`` that are present or
    swapped (``/proc/self/pagemap``): the only pages of an anonymous mapping that can be
    non-zero. None if pagemap cannot be read (the caller scans everything)."""
    if page != os.sysconf("SC_PAGE_SIZE"):
        return None
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return None
    try:
        n = size // page
        out: list[tuple[int, int]] = []
        step = 1 << 17  # pages per read (1 MiB of pagemap)
        for first in range(0, n, step):
            count = min(step, n - first)
            data = os.pread(fd, count * 8, (host_addr // page + first) * 8)
            if len(data) != count * 8:
                return None
            flags = data[7::8].translate(_PRESENT)
            out += [(first + m.start(), first + m.end()) for m in _RUNS.finditer(flags)]
        return out
    except OSError:
        return None
    finally:
        os.close(fd)


def data_runs(fd: int, size: int, page: int) -> list[tuple[int, int]]:
    """Page runs of a file that may hold data (``SEEK_DATA``/``SEEK_HOLE``; everything if
    the filesystem cannot tell)."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start // page, -(-end // page)))
            pos = end
    except OSError:
        return [(0, -(-size // page))]
    return merge_runs(out)


def merge_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(runs):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def nonzero_pages(buf: Any, first: int, page: int) -> Iterator[tuple[int, int]]:
    """Runs ``[start, end)`` (page numbers, offset by ``first``) of the non-zero pages of
    ``buf`` (bytes-like, a whole number of pages). Whole zero megabytes are skipped with
    one comparison."""
    n = len(buf) // page
    zero_page = _ZERO_CHUNK[:page]
    per_chunk = CHUNK // page
    run_start = -1
    i = 0
    while i < n:
        if run_start < 0 and i % per_chunk == 0 and i + per_chunk <= n \
                and buf[i * page:(i + per_chunk) * page] == _ZERO_CHUNK:
            i += per_chunk
            continue
        zero = buf[i * page:(i + 1) * page] == zero_page
        if zero and run_start >= 0:
            yield first + run_start, first + i
            run_start = -1
        elif not zero and run_start < 0:
            run_start = i
        i += 1
    if run_start >= 0:
        yield first + run_start, first + n


class PageHash:
    """The checksum of a RAM file: sha256 over every stored page in increasing order, each
    as its page number (8 bytes, little-endian) then its bytes. A full checkpoint stores the
    non-zero pages; an incremental one the pages its map lists. The value does not depend
    on how the file's holes were laid out (a copy that fills them hashes the same)."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.pages = 0

    def add(self, first: int, data: Any, page: int) -> None:
        upd = self.h.update
        for k in range(len(data) // page):
            upd((first + k).to_bytes(8, "little"))
            upd(data[k * page:(k + 1) * page])
        self.pages += len(data) // page

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def file_sha256(path: str, limit: int) -> tuple[int, str]:
    """(size, sha256) of a small file, refusing one larger than ``limit``."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                break
            size += len(b)
            if size > limit:
                raise CheckpointError(f"{path}: larger than {limit} bytes")
            h.update(b)
    return size, h.hexdigest()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
