"""Guest RAM: host mmap regions placed at guest-physical addresses.

A :class:`MemoryRegion` is one host mapping (anonymous, or a file mapped shared or
copy-on-write) that the VM installs in one KVM memory slot. :class:`GuestMemory` is the
set of regions with guest-physical accessors that devices (e.g. virtio queues) use; every
accessor checks the whole range lies in one region, so a guest-supplied address can never
make the host read or write outside guest RAM.
"""

from __future__ import annotations

import bisect
import mmap
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from kvmfw.abi import address_of, ffi
from kvmfw.errors import GuestMemoryError

if TYPE_CHECKING:
    from pathlib import Path

    from kvmfw.dirty import DirtyLog

PAGE_SIZE = mmap.PAGESIZE
HUGE_PAGE = 2 << 20
"""Anonymous RAM's host address agrees with its guest-physical address modulo this: KVM maps
guest memory with huge pages (arm64 stage-2 blocks, x86 EPT/NPT large pages) only where the
two agree modulo the huge-page size, as QEMU's RAM does; with 4 KiB mappings a booting guest
takes many more nested-paging faults and TLB misses."""


class MemoryRegion:
    """One host mapping seen by the guest at ``[gpa, gpa + size)``; equal only to itself.
    (A plain class, not a dataclass: see :mod:`kvmfw.record`.)"""

    def __init__(self, gpa: int, size: int, name: str = "ram", readonly: bool = False,
                 path: Path | None = None, private: bool = False,
                 slot: int | None = None) -> None:
        self.gpa = gpa
        self.size = size
        self.name = name
        self.readonly = readonly
        self.path = path
        self.private = private
        self.slot = slot
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._whole: memoryview | None = None
        self.host_addr = 0
        self.map_offset = 0
        """Where the region starts in its host mapping (:meth:`_attach`)."""
        self.discard = 0
        """The granule :meth:`zero` hands back to the kernel with ``MADV_DONTNEED`` (0:
        never): only a private anonymous mapping reads back zeros after it (a private file
        mapping would read the file again, a shared one keeps its pages)."""

    def __repr__(self) -> str:
        return (f"MemoryRegion(gpa={self.gpa:#x}, size={self.size:#x}, name={self.name!r}, "
                f"readonly={self.readonly}, path={self.path!r}, private={self.private}, "
                f"slot={self.slot}, host_addr={self.host_addr:#x})")

    @classmethod
    def anonymous(cls, gpa: int, size: int, name: str = "ram") -> MemoryRegion:
        """Zero-filled RAM backed by anonymous memory; from 2 MiB up placed at a host address
        congruent to ``gpa`` modulo :data:`HUGE_PAGE` and advised for transparent huge pages
        (the mapping is one huge page longer; its unused ends are never touched)."""
        _check_aligned(gpa, size)
        region = cls(gpa, size, name)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if size < HUGE_PAGE:
            region._attach(mmap.mmap(-1, size, flags))
            region.discard = PAGE_SIZE
            return region
        mm = mmap.mmap(-1, size + HUGE_PAGE, flags)
        offset = (gpa - address_of(ffi.from_buffer(mm))) % HUGE_PAGE
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is not None:
            try:
                mm.madvise(advice)
            except OSError:  # a kernel without transparent huge pages
                pass
        region._attach(mm, offset)
        region.discard = HUGE_PAGE  # (a smaller discard would split a transparent huge page)
        return region

    @classmethod
    def from_file(cls, gpa: int, path: str | os.PathLike[str], *, size: int | None = None,
                  private: bool = True, readonly: bool = False,
                  name: str | None = None) -> MemoryRegion:
        """RAM backed by a file: ``private`` maps it copy-on-write (the file never changes),
        otherwise guest writes reach the file."""
        from pathlib import Path  # (not at import: pathlib is not on a run's path)

        p = Path(path)
        try:
            fd = os.open(p, os.O_RDONLY if (readonly or private) else os.O_RDWR)
        except OSError as exc:
            raise GuestMemoryError(f"cannot open memory backing file {p}: {exc.strerror}") from exc
        try:
            length = size if size is not None else os.fstat(fd).st_size
            length = (length + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
            _check_aligned(gpa, length)
            flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
            prot = mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE)
            try:
                mm = mmap.mmap(fd, length, flags=flags, prot=prot)
            except (OSError, ValueError) as exc:
                raise GuestMemoryError(f"cannot map {p}: {exc}") from exc
        finally:
            os.close(fd)
        region = cls(gpa, length, name or p.name, readonly=readonly, path=p, private=private)
        region._attach(mm)
        return region

    def _attach(self, mm: mmap.mmap, offset: int = 0) -> None:
        """Use ``mm`` from ``offset`` (``size`` bytes) as this region's memory."""
        self._map = mm
        self.map_offset = offset
        self._whole = memoryview(mm)
        self._view = self._whole[offset:offset + self.size] if offset or len(mm) != self.size \
            else self._whole
        if self.readonly:
            self.host_addr = address_of(ffi.from_buffer(mm, require_writable=False)) + offset
        else:
            self.host_addr = address_of(ffi.from_buffer(mm)) + offset

    def zero(self, offset: int, length: int) -> None:
        """Zero ``[offset, offset + length)`` of the region (the caller checked it lies in
        it): whole :attr:`discard` granules are given back to the kernel (they read as zeros
        and are faulted in again, zeroed, when touched), the rest is written with zeros."""
        view = self.view
        end = offset + length
        lo = hi = end  # [lo, hi): discarded; [offset, lo) and [hi, end): written
        g = self.discard
        if g and self._map is not None:
            a = -(-(self.host_addr + offset) // g) * g - self.host_addr
            b = (self.host_addr + end) // g * g - self.host_addr
            if a < b:
                try:
                    self._map.madvise(mmap.MADV_DONTNEED, self.map_offset + a, b - a)
                except (OSError, ValueError):  # (locked pages: EINVAL) write them instead
                    pass
                else:
                    lo, hi = a, b
        _write_zeros(view, offset, lo)
        _write_zeros(view, hi, end)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def view(self) -> memoryview:
        """The whole region as a writable memoryview (offset 0 = ``gpa``)."""
        if self._view is None:
            raise GuestMemoryError(f"memory region {self.name} is closed")
        return self._view

    def close(self) -> None:
        """Unmap the region. A view of it that someone still holds (a slice kept past the
        machine, or garbage not collected yet) keeps the mapping until the view goes; the
        mapping is then unmapped with it. Closing never fails for it (it raised
        ``BufferError`` out of ``Machine.close``)."""
        for v in (self._view, self._whole):
            if v is not None:
                v.release()
        self._view = self._whole = None
        mm, self._map = self._map, None
        if mm is None:
            return
        try:
            mm.close()
        except BufferError:
            import gc

            gc.collect()  # the usual holder: a reference cycle (an exception's frames)
            try:
                mm.close()
            except BufferError:
                pass  # held for real: mmap unmaps when its last view is released


class GuestMemory:
    """All guest RAM regions, sorted by address, with checked accessors."""

    def __init__(self) -> None:
        self._regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        self.dirty: DirtyLog | None = None
        """The VM's dirty log while any :class:`~kvmfw.dirty.DirtyTracker` lives (None: no
        one tracks, and marking costs one test)."""

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(list(self._regions))

    def __len__(self) -> int:
        return len(self._regions)

    @property
    def size(self) -> int:
        """Total bytes of guest RAM."""
        return sum(r.size for r in self._regions)

    def add(self, region: MemoryRegion) -> None:
        for other in self._regions:
            if region.gpa < other.end and other.gpa < region.end:
                raise GuestMemoryError(
                    f"memory region {region.name} [{region.gpa:#x}, {region.end:#x}) overlaps "
                    f"{other.name} [{other.gpa:#x}, {other.end:#x})")
        i = bisect.bisect(self._starts, region.gpa)
        self._regions.insert(i, region)
        self._starts.insert(i, region.gpa)

    def remove(self, region: MemoryRegion) -> None:
        i = self._regions.index(region)
        del self._regions[i]
        del self._starts[i]

    def find(self, gpa: int, length: int = 1) -> tuple[MemoryRegion, int] | None:
        """The region holding all of ``[gpa, gpa + length)`` and the offset in it, or None."""
        i = bisect.bisect(self._starts, gpa) - 1
        if i < 0 or length < 0:
            return None
        r = self._regions[i]
        off = gpa - r.gpa
        if off + length > r.size:
            return None
        return r, off

    def contains(self, gpa: int, length: int = 1) -> bool:
        """True if ``[gpa, gpa + length)`` lies wholly in guest RAM."""
        return self.find(gpa, length) is not None

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of guest RAM; raises :class:`GuestMemoryError` if out of RAM."""
        hit = self.find(gpa, length)
        if hit is None:
            raise GuestMemoryError(f"guest range [{gpa:#x}, {gpa + length:#x}) is not in guest RAM")
        r, off = hit
        return r.view[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest RAM (the pages are marked dirty for trackers)."""
        n = len(data)
        hit = self.find(gpa, n)
        if hit is None:
            raise GuestMemoryError(f"guest range [{gpa:#x}, {gpa + n:#x}) is not in guest RAM")
        r, off = hit
        r.view[off:off + n] = data
        if self.dirty is not None:
            self.dirty.mark(r, off, n)

    def zero(self, gpa: int, length: int) -> None:
        """Zero ``[gpa, gpa + length)`` of guest RAM (a BSS) with no host buffer of that
        size; the pages are marked dirty for trackers (KVM's dirty log does not see this).
        In anonymous RAM whole pages (whole 2 MiB huge pages in RAM from 2 MiB up) are
        discarded (``MADV_DONTNEED``) rather than written: nothing is copied, and pages
        never touched are not faulted in. Raises :class:`GuestMemoryError` if the range is
        not wholly in one region or that region is mapped read-only on the host."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"cannot zero [{gpa:#x}, +{length:#x}): negative")
        hit = self.find(gpa, length)
        if hit is None:
            raise GuestMemoryError(f"guest range [{gpa:#x}, {gpa + length:#x}) is not in guest RAM")
        r, off = hit
        if r.view.readonly:
            raise GuestMemoryError(f"cannot zero [{gpa:#x}, {gpa + length:#x}): memory region "
                                   f"{r.name} is mapped read-only")
        if not length:
            return
        try:
            r.zero(off, length)
        finally:  # (marked even if zeroing failed part way: some of it may have changed)
            if self.dirty is not None:
                self.dirty.mark(r, off, length)

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Record that kvmfw wrote ``[gpa, gpa + length)`` through a view (device DMA, a
        loader): KVM's dirty log sees only the guest's own stores. The range may span
        adjacent regions; a range outside guest RAM raises :class:`GuestMemoryError`."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"cannot mark [{gpa:#x}, +{length:#x}) dirty: negative")
        end = gpa + length
        pieces = []  # all checked before anything is marked
        while gpa < end:
            i = bisect.bisect(self._starts, gpa) - 1
            r = self._regions[i] if i >= 0 else None
            if r is None or gpa >= r.end:
                raise GuestMemoryError(
                    f"cannot mark [{gpa:#x}, {end:#x}) dirty: {gpa:#x} is not in guest RAM")
            n = min(end, r.end) - gpa
            pieces.append((r, gpa - r.gpa, n))
            gpa += n
        log = self.dirty
        if log is not None:
            for r, off, n in pieces:
                log.mark(r, off, n)

    def load(self, gpa: int, fd: int, offset: int, length: int) -> None:
        """Read ``length`` bytes of the file ``fd`` from ``offset`` straight into guest RAM
        at ``gpa`` (the pages are marked dirty). The kernel copies from its page cache: no
        host buffer is made and the source is never faulted in page by page through a
        mapping (:mod:`kvmfw.imagefile`). Raises :class:`GuestMemoryError` if the range is
        not in guest RAM and :class:`EOFError` if the file ends first (nothing past its
        end is left unwritten silently)."""
        if length <= 0:
            return
        hit = self.find(gpa, length)
        if hit is None:
            raise GuestMemoryError(
                f"guest range [{gpa:#x}, {gpa + length:#x}) is not in guest RAM")
        r, off = hit
        view = r.view[off:off + length]
        done = 0
        try:
            while done < length:  # (a regular file reads short only at its end)
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise EOFError(f"the file ends at {offset + done:#x}, "
                                   f"{length - done:#x} bytes short")
                done += n
        finally:  # what was written is dirty, even when the read failed part way
            if self.dirty is not None and done:
                self.dirty.mark(r, off, done)

    def read_u(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.view(gpa, size), "little")

    def write_u(self, gpa: int, size: int, value: int) -> None:
        self.write(gpa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def close(self) -> None:
        for r in self._regions:
            r.close()
        self._regions.clear()
        self._starts.clear()


_ZEROS = memoryview(bytes(256 << 10))


def _write_zeros(view: memoryview, start: int, end: int) -> None:
    """Write zeros to ``view[start:end]`` from a small shared buffer."""
    step = len(_ZEROS)
    for i in range(start, end, step):
        n = min(step, end - i)
        view[i:i + n] = _ZEROS[:n]


def _check_aligned(gpa: int, size: int) -> None:
    if size <= 0 or gpa < 0:
        raise GuestMemoryError(f"invalid memory region at {gpa:#x} of {size:#x} bytes")
    if gpa % PAGE_SIZE or size % PAGE_SIZE:
        raise GuestMemoryError(
            f"memory region [{gpa:#x}, {gpa + size:#x}) is not page-aligned ({PAGE_SIZE:#x})")
