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
``first`` to be 0 while ``last`` passes 85. That happens when one vCPU drains the ring
while another fills it: the nested 2-vCPU test lost exactly 170 writes that way.

The reader here never gives the kernel ``first == 0`` once it has moved it, and that is
enough. With any ``first`` from 1 to 169, a full ring has ``last == first - 1 < first``,
where the old test computes right. The position of the next entry to read, the
*cursor*, is kept in the 8 bytes the page has spare after its entries. They are
VM-wide like the ring, so every vCPU and the compiled loop (``kvmfw_run_fast``) read
one cursor. ``first`` follows the cursor, except that it stays at the last entry
(169) while the cursor is at 0. The kernel then sees one entry more in use than there
is, until the entry at 0 is read. A fresh ring has ``first == last == 0``. That is safe
too: from ``last == 0`` the early exit at 85 stops the kernel first.

The reader has to hold the machine lock (one drainer at a time), and bounds the
kernel's indices before it uses them.
"""

from __future__ import annotations

import mmap
import struct

from kvmfw.errors import StateError

__all__ = ["CURSOR", "ENTRY_SIZE", "RING_MAX", "pending", "take"]

_HEADER = 8  # uint32 first, last
_FIRST, _LAST = 0, 4
_entry = struct.Struct("<QII8s")  # phys_addr, len, pio, data[8]
_u32 = struct.Struct("<I")
_unpack_entry = _entry.unpack_from
_unpack_u32 = _u32.unpack_from
_pack_u32 = _u32.pack_into

ENTRY_SIZE = _entry.size
RING_MAX = (mmap.PAGESIZE - _HEADER) // ENTRY_SIZE
"""``KVM_COALESCED_MMIO_MAX``: entries in the ring (170 with 4 KiB pages)."""
CURSOR = _HEADER + RING_MAX * ENTRY_SIZE
"""Offset in the ring page of kvmfw's read cursor: the page's spare tail, which the kernel
never touches (8 bytes with 4, 16 and 64 KiB pages)."""
if CURSOR + _u32.size > mmap.PAGESIZE:  # pragma: no cover - no such page size in Linux
    raise ImportError(f"no room for the coalesced ring's cursor in a {mmap.PAGESIZE}-byte page")


def pending(view: memoryview, base: int) -> bool:
    """Whether the ring at ``base`` in ``view`` holds writes not read yet (no lock)."""
    return _unpack_u32(view, base + CURSOR)[0] != _unpack_u32(view, base + _LAST)[0]


def take(view: memoryview, base: int) -> tuple[int, bytes, bool] | None:
    """Consume the next entry: ``(address, data, is_pio)``, or None when none is waiting.

    The entry is marked consumed before it is returned, so a caller that raises while
    delivering it never gets it twice. The caller holds the machine lock."""
    cursor = _unpack_u32(view, base + CURSOR)[0]
    last = _unpack_u32(view, base + _LAST)[0]
    if cursor == last:
        return None
    if cursor >= RING_MAX or last >= RING_MAX:
        raise StateError(f"coalesced-MMIO ring indices out of range (read at {cursor}, "
                         f"last {last}, ring of {RING_MAX}); the run area is corrupt: "
                         "report it with the kernel version")
    addr, length, pio, data = _unpack_entry(view, base + _HEADER + cursor * ENTRY_SIZE)
    nxt = cursor + 1 if cursor + 1 < RING_MAX else 0
    _pack_u32(view, base + CURSOR, nxt)
    if nxt:  # never first == 0 (see the module's docstring)
        _pack_u32(view, base + _FIRST, nxt)
    if length > 8:
        raise StateError(f"coalesced-MMIO entry at {addr:#x} has length {length} (at most 8)")
    return addr, data[:length], bool(pio)
