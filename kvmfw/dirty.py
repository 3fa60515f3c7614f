"""Dirty-page tracking: which guest pages changed, for incremental checkpoints and snapshots.

Two sources of writes reach guest RAM and both are recorded:

* the guest's own stores: KVM's dirty log. The first :class:`DirtyTracker` switches on
  ``KVM_MEM_LOG_DIRTY_PAGES`` for every writable RAM slot (the last one to close switches
  it off again, so an untracked guest pays nothing); a harvest reads each slot's log with
  ``KVM_GET_DIRTY_LOG``. Where the kernel offers ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` it
  can be enabled (``manual_protect=True``): the log is then read without being cleared and
  only the dirty pages are re-protected with ``KVM_CLEAR_DIRTY_LOG`` (two ioctls instead of
  one; measured by ``benchmarks/snapshot.py``, it is not faster here, so it is off by
  default). The dirty ring (``KVM_CAP_DIRTY_LOG_RING``) is not used: per-vCPU rings must be
  reaped at ring-full exits, which would put work on the exit path.
* kvmfw's own writes (device DMA, loaders, the GDB stub, :meth:`GuestMemory.write`), which
  KVM does not see: :meth:`GuestMemory.mark_dirty` records them in a software bitmap.

Every harvest moves both into every live tracker, so trackers are independent subscribers
(a checkpoint chain and a snapshot may track at once): :meth:`DirtyTracker.collect` returns
the pages dirtied since that tracker was created or last collected and resets only its own
bitmaps. Bitmaps are sized by the region (host-chosen at machine build), never by guest
data; bit ``i`` is page ``i`` of the region (little-endian bit order within bytes, as
KVM's).

Writing and tracking are not atomic with a running vCPU: collect on a drained machine (or
between runs), as checkpoints and snapshots do.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING

from kvmfw.abi import IOCTLS, Cap, address_of, constants, ffi, ioctl
from kvmfw.errors import GuestMemoryError, KvmError, KvmfwError, StateError
from kvmfw.memory import PAGE_SIZE, MemoryRegion

if TYPE_CHECKING:
    from kvmfw.vm import VM

__all__ = ["DirtyLog", "DirtyTracker", "DirtyLogUnavailableError", "bitmap_pages",
           "bitmap_runs"]


class DirtyLogUnavailableError(KvmfwError):
    """This KVM refuses dirty logging on a memory slot."""


def _pages(region: MemoryRegion) -> int:
    return region.size // PAGE_SIZE


def _bitmap_bytes(region: MemoryRegion) -> int:
    # KVM fills whole longs: round the buffer up to 8 bytes
    return (_pages(region) + 63) // 64 * 8


class _Slot:
    """Per-region harvest state: the KVM bitmap buffer and the software bitmap."""

    __slots__ = ("region", "logged", "nbytes", "kvm_buf", "kvm_arg", "clear_arg", "soft",
                 "soft_any")

    def __init__(self, region: MemoryRegion) -> None:
        self.region = region
        self.logged = False
        self.nbytes = _bitmap_bytes(region)
        self.kvm_buf = ffi.new("uint8_t[]", self.nbytes)
        self.kvm_arg = ffi.new("struct kvm_dirty_log *")
        self.kvm_arg.dirty_bitmap = self.kvm_buf
        self.clear_arg = ffi.new("struct kvm_clear_dirty_log *")
        self.clear_arg.dirty_bitmap = self.kvm_buf
        self.clear_arg.first_page = 0
        self.clear_arg.num_pages = _pages(region)
        self.soft = bytearray(self.nbytes)
        """kvmfw's own writes since the last harvest (bit i = page i)."""
        self.soft_any = False


class DirtyLog:
    """One VM's dirty logging: KVM's slot logs, the software bitmap and the live trackers.

    Made by :meth:`DirtyLog.of` (one per VM, attached to its :class:`GuestMemory` while
    any tracker lives)."""

    def __init__(self, vm: VM, *, manual_protect: bool | None = None) -> None:
        self.vm = vm
        self.lock = threading.Lock()
        self.trackers: list[DirtyTracker] = []
        self._slots: dict[MemoryRegion, _Slot] = {}
        self.manual_protect = False
        if manual_protect and vm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2) & \
                constants.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2,
                          constants.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
            self.manual_protect = True
        self.harvests = 0

    @classmethod
    def of(cls, vm: VM) -> DirtyLog:
        """The VM's dirty log, switching logging on for every RAM slot the first time."""
        log = vm.memory.dirty
        if log is None:
            log = cls(vm, manual_protect=vm.dirty_manual_protect)
            for region in vm.memory:
                log.region_added(region)
            vm.memory.dirty = log
        return log

    # --- regions ---------------------------------------------------------------------------

    def region_added(self, region: MemoryRegion) -> None:
        """Track ``region``; KVM logs it unless it is read-only (the guest cannot write it;
        kvmfw's writes are marked in software)."""
        slot = _Slot(region)
        if not region.readonly and region.slot is not None:
            try:
                self.vm.set_slot_flags(region, constants.KVM_MEM_LOG_DIRTY_PAGES)
            except KvmError as exc:
                raise DirtyLogUnavailableError(
                    f"this KVM refuses dirty logging on memory slot {region.slot} "
                    f"({region.name}): {exc}; incremental checkpoints and snapshots need "
                    "KVM_MEM_LOG_DIRTY_PAGES") from exc
            slot.logged = True
            slot.kvm_arg.slot = region.slot
            slot.clear_arg.slot = region.slot
        self._slots[region] = slot
        for t in self.trackers:
            t._bits[region] = 0

    def region_removed(self, region: MemoryRegion) -> None:
        self._slots.pop(region, None)
        for t in self.trackers:
            t._bits.pop(region, None)
            t.lost_regions = True

    def _stop_logging(self) -> None:
        for slot in self._slots.values():
            if slot.logged and slot.region.slot is not None:
                self.vm.set_slot_flags(slot.region, 0)
                slot.logged = False
        self._slots.clear()

    # --- marking and harvesting --------------------------------------------------------------

    def mark(self, region: MemoryRegion, offset: int, length: int) -> None:
        """Record kvmfw's write of ``[offset, offset + length)`` of ``region`` (checked by
        the caller to lie in it)."""
        if length <= 0:
            return
        first = offset // PAGE_SIZE
        last = (offset + length - 1) // PAGE_SIZE
        with self.lock:
            slot = self._slots.get(region)
            if slot is None:
                return
            soft = slot.soft
            slot.soft_any = True
            if last - first < 16:  # the usual case: a descriptor, a used ring, a sector
                for p in range(first, last + 1):
                    soft[p >> 3] |= 1 << (p & 7)
                return
            a, b = (first + 7) >> 3, (last + 1) >> 3  # whole bytes in [first, last]
            for p in range(first, min(8 * a, last + 1)):
                soft[p >> 3] |= 1 << (p & 7)
            if b > a:
                soft[a:b] = b"\xff" * (b - a)
            for p in range(max(8 * b, first), last + 1):
                soft[p >> 3] |= 1 << (p & 7)

    def harvest(self) -> None:
        """Move KVM's logs and the software bitmap into every live tracker."""
        with self.lock:
            self.harvests += 1
            trackers = self.trackers
            fd = self.vm.fd
            for region, slot in self._slots.items():
                bits = 0
                if slot.soft_any:
                    bits = int.from_bytes(slot.soft, "little")
                    slot.soft[:] = bytes(slot.nbytes)
                    slot.soft_any = False
                if slot.logged:
                    ioctl(fd, IOCTLS.KVM_GET_DIRTY_LOG, address_of(slot.kvm_arg),
                          f"slot {slot.kvm_arg.slot}")
                    buf = ffi.buffer(slot.kvm_buf)
                    kvm_bits = int.from_bytes(buf, "little")
                    if kvm_bits:
                        if self.manual_protect:
                            ioctl(fd, IOCTLS.KVM_CLEAR_DIRTY_LOG, address_of(slot.clear_arg),
                                  f"slot {slot.clear_arg.slot}")
                        bits |= kvm_bits
                if bits:
                    for t in trackers:
                        t._bits[region] |= bits

    def _add(self, tracker: DirtyTracker) -> None:
        # what happened before the new tracker existed goes to the others only
        self.harvest()
        with self.lock:
            tracker._bits = dict.fromkeys(self._slots, 0)
            self.trackers.append(tracker)

    def _remove(self, tracker: DirtyTracker) -> None:
        with self.lock:
            if tracker in self.trackers:
                self.trackers.remove(tracker)
            last = not self.trackers
        if last and self.vm.memory.dirty is self:
            self.vm.memory.dirty = None
            if self.vm.fd >= 0:
                self._stop_logging()


class DirtyTracker:
    """One subscriber to the VM's dirty pages (see the module docstring)."""

    def __init__(self, vm: VM) -> None:
        self._log: DirtyLog | None = DirtyLog.of(vm)
        self._bits: dict[MemoryRegion, int] = {}
        self.lost_regions = False
        """True once a tracked region was removed from the VM: what it held is gone."""
        self._log._add(self)

    @property
    def closed(self) -> bool:
        return self._log is None

    def collect_bits(self) -> dict[MemoryRegion, int]:
        """As :meth:`collect`, with each bitmap as an integer (bit i = page i): the form
        :func:`bitmap_runs` and the snapshot code use, without a bytes round-trip."""
        log = self._log
        if log is None:
            raise StateError("this dirty tracker is closed")
        log.harvest()
        with log.lock:
            out = self._bits
            self._bits = dict.fromkeys(out, 0)
        return out

    def collect(self) -> dict[MemoryRegion, bytearray]:
        """Per tracked region, a bitmap of the pages dirtied (by the guest or by kvmfw)
        since this tracker was created or last collected; collecting resets it."""
        return {r: bytearray(bits.to_bytes((_pages(r) + 7) // 8, "little"))
                for r, bits in self.collect_bits().items()}

    def add_bits(self, bits: dict[MemoryRegion, int]) -> None:
        """Mark pages dirty in this tracker only (a snapshot restore marks the pages it
        copied back for every other tracker)."""
        log = self._log
        if log is None:
            return
        with log.lock:
            for r, b in bits.items():
                if r in self._bits:
                    self._bits[r] |= b

    def close(self) -> None:
        """Stop tracking (the last tracker switches KVM's logging off); idempotent."""
        log, self._log = self._log, None
        if log is not None:
            log._remove(self)
        self._bits = {}

    def __enter__(self) -> DirtyTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bitmap_pages(bits: int) -> list[int]:
    """The page numbers set in ``bits`` (ascending)."""
    return [p for first, n in bitmap_runs(bits) for p in range(first, first + n)]


def bitmap_runs(bits: int) -> list[tuple[int, int]]:
    """Runs of consecutive set bits as ``(first_page, count)``, ascending.

    The zero stretches are skipped by a regular expression over the bytes (C speed): a
    sparse bitmap of a large region costs a scan of its bytes, not a Python step per page.
    """
    out: list[tuple[int, int]] = []
    if not bits:
        return out
    raw = bits.to_bytes((bits.bit_length() + 7) // 8, "little")
    for m in _NONZERO.finditer(raw):
        base = 8 * m.start()
        start = -1
        for k, byte in enumerate(m.group()):
            if byte == 0xFF:
                if start < 0:
                    start = base + 8 * k
                continue
            for b in range(8):
                if byte >> b & 1:
                    if start < 0:
                        start = base + 8 * k + b
                elif start >= 0:
                    out.append((start, base + 8 * k + b - start))
                    start = -1
        if start >= 0:
            out.append((start, 8 * m.end() - start))
    # runs that meet across a byte-group boundary cannot happen: groups are separated by
    # at least one zero byte
    return out


_NONZERO = re.compile(rb"[^\x00]+")


def check_mark(region: MemoryRegion | None, gpa: int, length: int) -> None:
    """Raise :class:`GuestMemoryError` for a mark outside guest RAM."""
    if region is None or length < 0:
        raise GuestMemoryError(f"cannot mark [{gpa:#x}, +{length:#x}) dirty: not in guest RAM")
