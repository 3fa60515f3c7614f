"""Guest image files mapped read-only, for loaders and the cache.

A loader parses an image (an ELF's headers, a bzImage's setup header) through a read-only
mapping, then copies the pieces it validated into guest RAM. Copying through the mapping
faults the source pages in, which costs most where the host is emulated: for Debian's
46 MiB decompressed kernel, 64-70 ms against 51-58 ms with ``preadv`` in the nested x86
environment (on a host at native speed, 5-6 ms against 7-8 ms). A :class:`FileMapping`
keeps its file open, so the pieces go in with :meth:`kvmfw.memory.GuestMemory.load`
(``preadv`` from the kernel's page cache) instead.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvmfw.memory import GuestMemory


class FileMapping(mmap.mmap):
    """A file mapped read-only that keeps its descriptor (``fd``) open until it is closed
    or collected: parse it through the mapping, load its pieces into guest RAM with
    :meth:`kvmfw.memory.GuestMemory.load` from the same open file."""

    fd: int
    _closer: weakref.finalize

    def close(self) -> None:
        super().close()
        self._closer()


def map_file(path: str | os.PathLike[str]) -> FileMapping | bytes:
    """``path`` mapped read-only as a :class:`FileMapping`, or ``b""`` for an empty file
    (which cannot be mapped). Raises OSError (or ValueError) as ``open`` and ``mmap`` do;
    anything but a regular file (a FIFO, a device) with :class:`OSError` ``EINVAL``, at
    once: the open does not wait for a FIFO's writer."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        if st.st_size == 0:
            os.close(fd)
            return b""
        m = FileMapping(fd, 0, access=mmap.ACCESS_READ)
    except BaseException:
        os.close(fd)
        raise
    m.fd = fd
    m._closer = weakref.finalize(m, os.close, fd)
    return m


def copy_into(memory: GuestMemory, gpa: int, image: Any, offset: int, size: int) -> None:
    """Put ``size`` bytes of ``image`` from ``offset`` into guest RAM at ``gpa``: read from
    its file when it is a :class:`FileMapping`, else copied from its buffer. The caller has
    checked both ranges; raises as :meth:`~kvmfw.memory.GuestMemory.load` does."""
    if isinstance(image, FileMapping):
        memory.load(gpa, image.fd, offset, size)
    else:
        memory.write(gpa, memoryview(image)[offset:offset + size])
