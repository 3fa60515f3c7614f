"""The coalesced-MMIO ring: KVM's page of posted writes, read without losing any.

KVM appends a write to a coalesced zone to one page shared by the VM's vCPUs
(``struct kvm_coalesced_mmio_ring``: ``first``, ``last``, then ``KVM_COALESCED_MMIO_MAX``
entries) instead of exiting, and exits only when the ring is full. Userspace consumes
entries from ``first`` and advances it.

Kernels without the 2024 fix "KVM: Fix coalesced_mmio_has_room() to avoid premature
userspace exit" (Debian 12's 6.1 among them) test for room with
``(first - last - 1) % KVM_COALESCED_MMIO_MAX`` in unsigned 32-bit arithmetic. The
ring holds 170 entries, which is not a power of two, so the test is wrong whenever
``first <= last``. At ``first == 0, last == 169`` the ring is full, yet the test says
there is room: the kernel writes a 170th entry, ``last`` wraps to 0 == ``first``, and a
whole ring of writes looks consumed. (The same test also exits early when
``last - first == 85``, which costs an exit and loses nothing.) That state needs
``first`` to be 0 while ``last`` passes 85: a reader that moves ``first`` to 0 at the
ring's wrap while another vCPU has written more than 85 entries past it.

The reader here never gives the kernel ``first == 0`` once it has moved it, and that is
enough. With any ``first`` from 1 to 169, a full ring has ``last == first - 1 < first``,
where the old test computes right. The position of the next entry to read, the
*cursor*, is kept in the 8 bytes the page has spare after its entries. They are
VM-wide like the ring, so every vCPU and the compiled loop (``kvmfw_run_fast``) read
one cursor. ``first`` follows the cursor, except that it stays at the last entry
(169) while the cursor is at 0. The kernel then sees one entry more in use than there
is, until the entry at 0 is read. A fresh ring has ``first == last == 0``. That is safe
too: from ``last == 0`` the early exit at 85 stops the kernel first.

Every store to the page is one aligned 32-bit store, through a memoryview of 32-bit
words (:func:`words`), because the kernel reads ``first`` on another CPU while a vCPU
runs. ``struct.pack_into`` would not do: CPython zeroes the field before it packs the
value into it, so the kernel can read ``first == 0`` in between, and then a whole ring
is overwritten, on old kernels (the early exit at 85 is skipped) and fixed ones alike
(a full ring looks empty unless ``last`` is 169). The nested 2-vCPU test lost a ring
that way in about 4% of its runs.

The reader has to hold the machine lock (one drainer at a time), and bounds the
kernel's indices before it uses them.
"""

from __future__ import annotations

import mmap
import struct

from kvmfw.errors import StateError

__all__ = ["CURSOR", "ENTRY_SIZE", "RING_MAX", "pending", "take", "words"]

_HEADER = 8  # uint32 first, last
_FIRST, _LAST = 0, 1  # word indices
_entry = struct.Struct("<QII8s")  # phys_addr, len, pio, data[8]
_unpack_entry = _entry.unpack_from

ENTRY_SIZE = _entry.size
RING_MAX = (mmap.PAGESIZE - _HEADER) // ENTRY_SIZE
"""``KVM_COALESCED_MMIO_MAX``: entries in the ring (170 with 4 KiB pages)."""
CURSOR = _HEADER + RING_MAX * ENTRY_SIZE
"""Offset in the ring page of kvmfw's read cursor: the page's spare tail, which the kernel
never touches (8 bytes with 4, 16 and 64 KiB pages)."""
if CURSOR + 4 > mmap.PAGESIZE or CURSOR % 4:  # pragma: no cover - no such page in Linux
    raise ImportError(f"no room for the coalesced ring's cursor in a {mmap.PAGESIZE}-byte page")
_CURSOR = CURSOR // 4  # word index


def words(view: memoryview, base: int) -> memoryview | None:
    """The ring page at ``base`` in the run area ``view`` as native 32-bit words: what
    :func:`pending` and :func:`take` read and write. None when the page does not lie
    inside the area. Release it before the area is unmapped."""
    if base < 0 or base % mmap.PAGESIZE or base + mmap.PAGESIZE > len(view):
        return None
    return view[base:base + mmap.PAGESIZE].cast("I")


def pending(ring: memoryview) -> bool:
    """Whether the ring (from :func:`words`) holds writes not read yet (no lock)."""
    return ring[_CURSOR] != ring[_LAST]


def take(ring: memoryview) -> tuple[int, bytes, bool] | None:
    """Consume the next entry: ``(address, data, is_pio)``, or None when none is waiting.

    The entry is marked consumed before it is returned, so a caller that raises while
    delivering it never gets it twice. The caller holds the machine lock."""
    cursor = ring[_CURSOR]
    last = ring[_LAST]
    if cursor == last:
        return None
    if cursor >= RING_MAX or last >= RING_MAX:
        raise StateError(f"coalesced-MMIO ring indices out of range (read at {cursor}, "
                         f"last {last}, ring of {RING_MAX}); the run area is corrupt: "
                         "report it with the kernel version")
    addr, length, pio, data = _unpack_entry(ring, _HEADER + cursor * ENTRY_SIZE)
    nxt = cursor + 1 if cursor + 1 < RING_MAX else 0
    ring[_CURSOR] = nxt  # one 32-bit store each (see the module's docstring)
    if nxt:  # never first == 0
        ring[_FIRST] = nxt
    if length > 8:
        raise StateError(f"coalesced-MMIO entry at {addr:#x} has length {length} (at most 8)")
    return addr, data[:length], bool(pio)
