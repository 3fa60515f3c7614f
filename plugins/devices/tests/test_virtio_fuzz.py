"""Random descriptor chains at virtio-blk and virtio-console: nothing escapes, every guest
memory access the device makes lies in guest RAM, and the state stays restorable."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

from conftest import RAM_SIZE, make_harness
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_driver import Driver

from kvmfw_devices import virtio_mmio as v
from kvmfw_devices.virtio_blk import VirtioBlk
from kvmfw_devices.virtio_console import VirtioConsole

IMAGE = Path(tempfile.mkdtemp(prefix="kvmfw-fuzz-")) / "disk.img"
IMAGE.write_bytes(bytes(8 * 512))

addresses = st.one_of(st.integers(0, RAM_SIZE - 1), st.integers(RAM_SIZE - 64, RAM_SIZE + 64),
                      st.integers(0, (1 << 64) - 1))
descriptor = st.tuples(addresses, st.one_of(st.integers(0, 4096), st.integers(0, 2**32 - 1)),
                       st.integers(0, 7), st.integers(0, 15))


def spy(mem) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    """Record every guest range the device touches through GuestMemory.view."""
    seen: list[tuple[int, int]] = []
    real_view = mem.view

    def view(gpa: int, length: int):  # type: ignore[no-untyped-def]
        seen.append((gpa, length))
        return real_view(gpa, length)

    mem.view = view
    return seen


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["blk", "console"]), table=st.lists(descriptor, min_size=8,
       max_size=8), heads=st.lists(st.integers(0, 12), min_size=1, max_size=6),
       header=st.binary(min_size=16, max_size=16), queue=st.integers(0, 1),
       avail_jump=st.integers(0, 3))
def test_random_chains(kind: str, table: list[tuple[int, int, int, int]], heads: list[int],
                       header: bytes, queue: int, avail_jump: int) -> None:
    h = make_harness()
    mem = h.ctx.memory
    dev = VirtioBlk(h.ctx, file=str(IMAGE)) if kind == "blk" else VirtioConsole(h.ctx)
    drv = Driver(dev, mem)
    drv.start(dev.num_queues)
    q = queue % dev.num_queues
    desc, avail, _ = drv.rings[q]
    for i, (addr, length, flags, nxt) in enumerate(table):
        mem.write(desc + 16 * i, struct.pack("<QIHH", addr & (2**64 - 1), length, flags, nxt))
    for i, head in enumerate(heads):
        mem.write_u(avail + 4 + 2 * i, 2, head)
    mem.write(0x40000, header)
    seen = spy(mem)
    idx = len(heads) + (avail_jump * 100 if avail_jump == 3 else 0)
    mem.write_u(avail + 2, 2, idx & 0xFFFF)
    drv.w32(v.REG_QUEUE_NOTIFY, q)
    if kind == "console":
        dev.enqueue(b"input bytes")  # type: ignore[union-attr]
    assert all(mem.contains(gpa, max(n, 1)) or n == 0 for gpa, n in seen), seen
    state = dev.save()
    assert json.loads(json.dumps(state)) == state
    other = VirtioBlk(h.ctx, file=str(IMAGE)) if kind == "blk" else VirtioConsole(h.ctx)
    other.restore(state)
    assert other.save() == state
    dev.close()
    other.close()
    mem.close()
