"""virtio-blk over virtio-mmio: a raw disk image file (virtio 1.1, 5.2 "Block Device").

Device ID 2, one request queue. A request is a chain: a 16-byte device-readable header
``{le32 type; le32 reserved; le64 sector}``, data buffers (readable for writes, writable for
reads), and a final device-writable status byte (0 OK, 1 IOERR, 2 UNSUPP). Types: IN 0
(read), OUT 1 (write), FLUSH 4, GET_ID 8 (20-byte serial). Sectors are 512 bytes; a
request past the end of the image, not a whole number of sectors, or a write to a read-only
disk, fails with IOERR. Data moves between the image and guest RAM with ``preadv``/``pwritev``
on views of the chain's buffers: no host copy, whatever the chain's size (the transport
bounds it to ``MAX_CHAIN_BYTES``).

Configuration space: 0x00 capacity (le64, in 512-byte sectors); the rest reads zero.
Features offered: VIRTIO_BLK_F_FLUSH (9), VIRTIO_BLK_F_RO (5) with ``readonly=on``.

With ``snapshot=on`` (QEMU's option of that name) the image is opened read-only and the
guest's writes go to a private overlay, an unlinked sparse file in the temporary directory
with a bitmap of the sectors it holds: each run starts from the image as it is, and the
image never changes (so checkpoints that name it stay restorable, sweep variants stay
apart). A forked child gets such an overlay too (:meth:`VirtioBlk.after_fork`).
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Any, ClassVar

from kvmfw.device import ConfigKey, DeviceContext, parse_bool
from kvmfw.dirty import bitmap_runs
from kvmfw.errors import CheckpointError, ConfigError, DeviceError

from kvmfw_devices import KVMFW_PLUGIN_API as KVMFW_PLUGIN_API  # checked by the core
from kvmfw_devices.virtio_mmio import Buffer, VirtioMmio

VIRTIO_ID_BLOCK = 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_FLUSH = 1 << 9

T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2
SECTOR = 512
HEADER_SIZE = 16
ID_BYTES = 20


IOV_BATCH = 512
"""Views per preadv/pwritev call (below every host's IOV_MAX)."""


def _opt_str(text: str) -> str | None:
    return text or None


def _full_io(fd: int, views: list[memoryview], pos: int, read: bool) -> int:
    """preadv/pwritev until done or EOF; returns the bytes moved."""
    total, want = 0, sum(len(v) for v in views)
    while total < want:
        rest, skip = [], total
        for v in views:
            if skip >= len(v):
                skip -= len(v)
                continue
            rest.append(v[skip:])
            skip = 0
        n = os.preadv(fd, rest, pos + total) if read else os.pwritev(fd, rest, pos + total)
        if n <= 0:
            break
        total += n
    return total


def _zero_from(views: list[memoryview], start: int) -> None:
    """Zero the bytes of ``views`` from overall offset ``start`` (in bounded chunks)."""
    zero = bytes(4096)
    for v in views:
        if start >= len(v):
            start -= len(v)
            continue
        for off in range(start, len(v), len(zero)):
            n = min(len(zero), len(v) - off)
            v[off:off + n] = zero[:n]
        start = 0


def _sector_runs(bits: bytes | bytearray, capacity: int) -> list[tuple[int, int]]:
    """Runs ``[start, end)`` of the sectors whose bit is set (bit i = sector i), up to
    ``capacity`` (the core's :func:`~kvmfw.dirty.bitmap_runs`)."""
    value = int.from_bytes(bits, "little") & ((1 << capacity) - 1)
    return [(s, s + n) for s, n in bitmap_runs(value)]


def _copy(src: int, src_pos: int, dst: int, dst_pos: int, length: int) -> int:
    """``length`` bytes from ``src`` at ``src_pos`` to ``dst`` at ``dst_pos``: in the kernel
    (``copy_file_range``), or through a 1 MiB buffer between file systems that cannot.
    OSError if ``src`` ends first. Returns ``length``."""
    done = 0
    kernel = True
    while done < length:
        n = 0
        if kernel:
            try:
                n = os.copy_file_range(src, dst, length - done, src_pos + done,
                                       dst_pos + done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                                     errno.EOPNOTSUPP):
                    raise
                kernel = False
                continue
        else:
            chunk = os.pread(src, min(length - done, 1 << 20), src_pos + done)
            n = len(chunk) and os.pwrite(dst, chunk, dst_pos + done)
        if n <= 0:
            raise OSError(errno.EIO, f"the file ended {length - done} bytes early")
        done += n
    return length


class _Undo:
    """One in-process snapshot's undo log (:meth:`VirtioBlk.snapshot_take`): the overlay's
    bitmap then, and in a sparse file the take-time contents of the sectors overwritten
    since (``saved``: a bit per sector kept)."""

    __slots__ = ("fd", "bits", "saved")

    def __init__(self, fd: int, bits: bytearray, saved: bytearray) -> None:
        self.fd, self.bits, self.saved = fd, bits, saved


def _tmpfile(size: int, who: str) -> int:
    """An unlinked sparse file of ``size`` bytes in the temporary directory."""
    import tempfile  # here: only an overlay needs it (it brings shutil, random, bz2, lzma)

    fd = -1
    try:
        fd = os.open(tempfile.gettempdir(), os.O_TMPFILE | os.O_RDWR, 0o600)
        os.ftruncate(fd, size)
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        raise DeviceError(f"{who}: cannot make a private file in {tempfile.gettempdir()} "
                          f"for the disk: {exc.strerror or exc} (TMPDIR picks another "
                          "directory)") from None
    return fd


class VirtioBlk(VirtioMmio):
    """A raw image as a virtio block device."""

    name: ClassVar[str] = "virtio-blk"
    device_id: ClassVar[int] = VIRTIO_ID_BLOCK
    config: ClassVar[dict[str, ConfigKey]] = {
        **VirtioMmio.config,
        "file": ConfigKey(_opt_str, None, "raw disk image (required)"),
        "readonly": ConfigKey(parse_bool, False, "refuse writes (VIRTIO_BLK_F_RO)"),
        "snapshot": ConfigKey(parse_bool, False, "the guest's writes go to a private "
                              "overlay, never to the image, which is only read (QEMU's "
                              "snapshot=on)"),
        "serial": ConfigKey(str, "kvmfw-disk", "the GET_ID answer (up to 20 bytes)"),
    }

    def __init__(self, ctx: DeviceContext, **params: Any) -> None:
        path = self.validate_params(params)["file"]
        if path is None:
            raise ConfigError("virtio-blk: file=PATH (a raw disk image) is required")
        ro = self.validate_params(params)["readonly"]
        snapshot = self.validate_params(params)["snapshot"]
        try:
            self.fd = os.open(path, os.O_RDONLY if ro or snapshot else os.O_RDWR)
        except OSError as exc:
            raise ConfigError(f"virtio-blk: cannot open {path}: {exc.strerror}") from exc
        self.path = os.path.abspath(path)
        self.capacity = os.fstat(self.fd).st_size // SECTOR
        self._cow_fd = -1
        """With ``snapshot=on`` or in a forked child: the overlay file that takes this
        process's writes."""
        self._cow: bytearray | None = None
        """With an overlay: bit i set = sector i is in the overlay."""
        self._snaps: list[_Undo] = []
        """The live in-process snapshots' undo logs (:meth:`snapshot_take`)."""
        super().__init__(ctx, **params)
        self.stats.update(read_bytes=0, write_bytes=0, flushes=0, io_errors=0, unsupported=0)
        if snapshot and not ro:
            self._new_overlay()

    @property
    def device_features(self) -> int:  # type: ignore[override]
        return VIRTIO_BLK_F_FLUSH | (VIRTIO_BLK_F_RO if self.params["readonly"] else 0)

    def config_bytes(self) -> bytes:
        return struct.pack("<Q", self.capacity)

    def handle_chain(self, index: int, buffers: list[Buffer]) -> int:
        header = self.gather(buffers, HEADER_SIZE)
        writable = [b for b in buffers if b.writable and b.length]
        if len(header) < HEADER_SIZE or not writable:
            self.mark_broken("virtio-blk request without a header or a status byte")
            return 0
        rtype, _, sector = struct.unpack("<IIQ", header)
        status_buf = writable[-1]
        data_in = writable[:-1] + ([Buffer(status_buf.addr, status_buf.length - 1, True)]
                                   if status_buf.length > 1 else [])
        in_len = sum(b.length for b in data_in)
        out_len = sum(b.length for b in buffers if not b.writable) - HEADER_SIZE
        status, written = S_OK, 0
        if rtype == T_IN:
            if self._transfer(sector, in_len, data_in, True, 0):
                written = in_len
            else:
                status = S_IOERR
        elif rtype == T_OUT:
            if self.params["readonly"] or \
                    not self._transfer(sector, out_len, buffers, False, HEADER_SIZE):
                status = S_IOERR
        elif rtype == T_FLUSH:
            self.stats["flushes"] += 1
            try:
                os.fsync(self.fd)
            except OSError:
                status = S_IOERR
        elif rtype == T_GET_ID:
            ident = self.params["serial"].encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")
            written = self.scatter(data_in, ident[:in_len])
        else:
            self.stats["unsupported"] += 1
            status = S_UNSUPP
        if status == S_IOERR:
            self.stats["io_errors"] += 1
        last = status_buf.addr + status_buf.length - 1
        self.ctx.memory.write(last, bytes((status,)))
        return written + 1

    def _in_bounds(self, sector: int, length: int) -> bool:
        return length % SECTOR == 0 and sector * SECTOR + length <= self.capacity * SECTOR

    def _transfer(self, sector: int, length: int, buffers: list[Buffer], to_guest: bool,
                  skip: int) -> bool:
        """Move ``length`` bytes between the image at ``sector`` and the chain's views
        (device-writable ones when reading the disk ``to_guest``)."""
        if not self._in_bounds(sector, length):
            return False
        pos = sector * SECTOR
        views = list(self.views(buffers, to_guest, skip=skip, limit=length))
        try:
            if self._cow is not None:
                return self._cow_transfer(views, pos, length, to_guest)
            for i in range(0, len(views), IOV_BATCH):
                batch = views[i:i + IOV_BATCH]
                want = sum(len(v) for v in batch)
                done = _full_io(self.fd, batch, pos, to_guest)
                if done < want:  # the image shrank under us: reads see zeros past its end
                    if not to_guest:
                        return False
                    _zero_from(batch, done)
                pos += want
        except OSError:
            return False
        finally:
            for v in views:
                v.release()
        self.stats["read_bytes" if to_guest else "write_bytes"] += length
        return True

    def host_files(self) -> list[str]:
        """The image: a checkpoint names it (size, modification time) and a restore refuses
        it changed. Writes kept in an overlay go into the checkpoint (:meth:`save_files`)."""
        return [self.path]

    def save_files(self, directory: str) -> None:
        """With an overlay that holds writes: ``overlay.map`` (its bitmap, a bit per
        sector) and ``overlay.sectors`` (those sectors in order, nothing else)."""
        bits = self._cow
        if bits is None or bits.count(0) == len(bits):
            return
        with open(os.path.join(directory, "overlay.map"), "xb") as f:
            f.write(bits)
        fd = os.open(os.path.join(directory, "overlay.sectors"),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            out = 0
            for s, e in _sector_runs(bits, self.capacity):
                out += _copy(self._cow_fd, s * SECTOR, fd, out, (e - s) * SECTOR)
        finally:
            os.close(fd)

    def load_files(self, directory: str) -> None:
        """Start from the checkpoint's overlay (:meth:`save_files`): its sectors into a new
        private overlay, which takes this run's writes too (the image is never written)."""
        names = sorted(os.listdir(directory))
        if names != ["overlay.map", "overlay.sectors"]:
            raise CheckpointError(f"{self.name}: the checkpoint holds {', '.join(names)}, "
                                  "not overlay.map and overlay.sectors")
        if self.params["readonly"]:
            raise CheckpointError(f"{self.name}: the checkpoint holds writes to a disk this "
                                  "machine has read-only")
        want = (self.capacity + 7) // 8
        path = os.path.join(directory, "overlay.map")
        if os.path.getsize(path) != want:
            raise CheckpointError(f"{path}: not {want} bytes (a bit per sector of this "
                                  f"{self.capacity}-sector disk)")
        with open(path, "rb") as f:
            bits = bytearray(f.read(want))
        if len(bits) != want or (self.capacity % 8 and bits[-1] >> (self.capacity % 8)):
            raise CheckpointError(f"{path}: marks sectors past the disk's end")
        runs = _sector_runs(bits, self.capacity)
        n = sum(e - s for s, e in runs)
        data = os.path.join(directory, "overlay.sectors")
        if os.path.getsize(data) != n * SECTOR:
            raise CheckpointError(f"{data}: not the {n} sectors its map marks")
        self._new_overlay()
        try:
            fd = os.open(data, os.O_RDONLY)
            try:
                pos = 0
                for s, e in runs:
                    pos += _copy(fd, pos, self._cow_fd, s * SECTOR, (e - s) * SECTOR)
            finally:
                os.close(fd)
        except OSError as exc:
            raise CheckpointError(f"{data}: cannot read it into the disk's overlay: "
                                  f"{exc.strerror or exc}") from None
        self._cow = bits

    # --- in-process snapshots: an undo log per snapshot -------------------------------------

    def snapshot_take(self) -> _Undo | None:
        """With an overlay: an undo log that keeps, on its first overwrite after now, each
        sector the overlay holds now, and the overlay's bitmap. Without one, None: the
        guest's writes reach the image and stay (module doc)."""
        if self._cow is None:
            return None
        undo = _Undo(_tmpfile(self.capacity * SECTOR, self.name), bytearray(self._cow),
                     bytearray(len(self._cow)))
        self._snaps.append(undo)
        return undo

    def snapshot_reset(self, handle: _Undo) -> None:
        """Put back the overlay's sectors overwritten since the snapshot, and its bitmap:
        the disk reads as it did then. (The other live snapshots keep those sectors'
        current contents first, as for any write.)"""
        if handle not in self._snaps or self._cow is None:
            raise DeviceError(f"{self.name}: reset to a snapshot this disk does not hold")
        runs = _sector_runs(handle.saved, self.capacity)
        others = [u for u in self._snaps if u is not handle]
        try:
            for s, e in runs:
                self._preserve(others, s, e)
                _copy(handle.fd, s * SECTOR, self._cow_fd, s * SECTOR, (e - s) * SECTOR)
        except OSError as exc:
            raise DeviceError(f"{self.name}: cannot put the disk back to the snapshot: "
                              f"{exc.strerror or exc}") from None
        self._cow[:] = handle.bits  # (the undo log stays valid: those sectors match it)

    def snapshot_release(self, handle: _Undo) -> None:
        if handle in self._snaps:
            self._snaps.remove(handle)
            os.close(handle.fd)

    def _preserve(self, snaps: list[_Undo], first: int, end: int) -> None:
        """Before sectors ``[first, end)`` of the overlay change: each live snapshot keeps
        those it held in the overlay and has not kept yet."""
        for undo in snaps:
            start = -1  # a run of sectors to keep, copied at once
            for sector in range(first, end + 1):
                byte, bit = sector >> 3, 1 << (sector & 7)
                keep = sector < end and undo.bits[byte] & bit and not undo.saved[byte] & bit
                if keep:
                    undo.saved[byte] |= bit
                    if start < 0:
                        start = sector
                elif start >= 0:
                    _copy(self._cow_fd, start * SECTOR, undo.fd, start * SECTOR,
                          (sector - start) * SECTOR)
                    start = -1

    # --- an overlay: snapshot=on, a forked child -------------------------------------------

    def after_fork(self, child: int) -> None:
        """The image is the parent's: this child writes to a private overlay (an unlinked
        sparse temporary file) and reads each sector from the overlay once written there,
        else from the image, which it never writes (a read-only disk stays read-only). A
        parent's overlay (``snapshot=on``, a fork of a fork) is the parent's too: the
        child starts its own from a copy of it."""
        super().after_fork(child)
        if not self.params["readonly"]:
            self._new_overlay()
            for undo in self._snaps:  # the parent's logs too: the child's own copies
                fd = _tmpfile(self.capacity * SECTOR, self.name)
                try:
                    for s, e in _sector_runs(undo.saved, self.capacity):
                        _copy(undo.fd, s * SECTOR, fd, s * SECTOR, (e - s) * SECTOR)
                except OSError as exc:
                    os.close(fd)
                    raise DeviceError(f"{self.name}: cannot copy a snapshot's undo log: "
                                      f"{exc.strerror or exc}") from None
                os.close(undo.fd)
                undo.fd = fd

    def _new_overlay(self) -> None:
        """Take writes in a new overlay from now on, holding what the current one holds:
        the sectors written before, and those a live snapshot's bitmap holds (a reset to
        an older snapshot clears their bits, not their contents, which a reset to the
        live one uses)."""
        old, bits = self._cow_fd, self._cow
        fd = _tmpfile(self.capacity * SECTOR, self.name)
        try:
            if bits is not None:
                held = int.from_bytes(bits, "little")
                for undo in self._snaps:
                    held |= int.from_bytes(undo.bits, "little")
                for s, e in _sector_runs(held.to_bytes(len(bits), "little"), self.capacity):
                    _copy(old, s * SECTOR, fd, s * SECTOR, (e - s) * SECTOR)
        except OSError as exc:
            os.close(fd)
            raise DeviceError(f"{self.name}: cannot copy the disk's overlay: "
                              f"{exc.strerror or exc}") from None
        if old >= 0:
            os.close(old)  # (a fork child's copy of the parent's descriptor)
        self._cow_fd = fd
        self._cow = bytearray((self.capacity + 7) // 8) if bits is None else bytearray(bits)

    def _cow_transfer(self, views: list[memoryview], pos: int, length: int,
                      to_guest: bool) -> bool:
        cow = self._cow
        assert cow is not None
        if not to_guest:  # a request is whole sectors: every sector it touches is replaced
            self._preserve(self._snaps, pos // SECTOR, (pos + length) // SECTOR)
            done = 0
            for i in range(0, len(views), IOV_BATCH):
                done += _full_io(self._cow_fd, views[i:i + IOV_BATCH], pos + done, False)
            if done < length:
                return False
            for s in range(pos // SECTOR, (pos + length) // SECTOR):
                cow[s >> 3] |= 1 << (s & 7)
            self.stats["write_bytes"] += length
            return True
        for v in views:  # runs of sectors from one source, per view
            off = 0
            while off < len(v):
                a = pos + off
                s = a // SECTOR
                mine = bool(cow[s >> 3] >> (s & 7) & 1)
                e = s + 1
                last = (pos + len(v) - 1) // SECTOR
                while e <= last and bool(cow[e >> 3] >> (e & 7) & 1) == mine:
                    e += 1
                chunk = v[off:min(len(v), e * SECTOR - pos)]
                got = _full_io(self._cow_fd if mine else self.fd, [chunk], a, True)
                if got < len(chunk):
                    _zero_from([chunk], got)
                off += len(chunk)
            pos += len(v)
        self.stats["read_bytes"] += length
        return True

    def close(self) -> None:
        super().close()
        for undo in self._snaps:
            os.close(undo.fd)
        self._snaps.clear()
        if self._cow_fd >= 0:
            os.close(self._cow_fd)
            self._cow_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
