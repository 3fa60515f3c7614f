"""Random descriptor chains at virtio-blk and virtio-console: nothing escapes, every guest
memory access the device makes lies in guest RAM, and the state stays restorable."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

from conftest import RAM_SIZE, make_harness
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from kvmfw.errors import GuestMemoryError
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


# --- stateful: a hostile driver over the whole register range and every chain shape ------------

ALL = v.VIRTIO_F_VERSION_1 | v.VIRTIO_F_INDIRECT_DESC | v.VIRTIO_F_EVENT_IDX
FUZZ_EXAMPLES = int(os.environ.get("KVMFW_FUZZ_EXAMPLES", "60"))
RUN_COUNTS = {"cases": 0, "steps": 0}
"""How much the state machines ran (printed at the end of the session for the report)."""

ring_addr = st.one_of(st.sampled_from([0x10000, 0x20000, 0x30000]),
                      st.integers(0, RAM_SIZE + 0x100), st.integers(0, 2**64 - 1))
buf_addr = st.one_of(st.integers(0x40000, 0x80000), st.integers(0, RAM_SIZE + 64),
                     st.integers(RAM_SIZE - 64, RAM_SIZE + 64), st.integers(0, 2**64 - 1))
buf_len = st.one_of(st.integers(0, 2048), st.sampled_from([RAM_SIZE, 2**32 - 1, 512, 16]),
                    st.integers(0, 2**32 - 1))
flag_bits = st.integers(0, 7)
chain_desc = st.tuples(buf_addr, buf_len, flag_bits, st.one_of(st.none(), st.integers(0, 300)))


def _ranges_of_table(mem, table: int, count: int, depth: int = 0):  # type: ignore[no-untyped-def]
    """Every device-writable range the descriptors of a table (and the indirect tables they
    name) describe: where a correct device may write."""
    out = []
    for i in range(count):
        if not mem.contains(table + 16 * i, 16):
            break
        addr, length, flags, _ = struct.unpack("<QIHH", mem.read(table + 16 * i, 16))
        if flags & v.DESC_F_WRITE:
            out.append((addr, addr + length))
        if flags & v.DESC_F_INDIRECT and depth == 0 and length % 16 == 0:
            out += _ranges_of_table(mem, addr, min(length // 16, v.MAX_INDIRECT), 1)
    return out


def changed_bytes(before: bytes, after: bytes, allowed: list[tuple[int, int]],
                  chunk: int = 4096) -> list[int]:
    """Offsets where two RAM snapshots differ (skipping chunks wholly ``allowed``)."""
    out: list[int] = []
    if before == after:
        return out
    for base in range(0, len(before), chunk):
        a, b = before[base:base + chunk], after[base:base + chunk]
        if a != b and not any(lo <= base and base + chunk <= hi for lo, hi in allowed):
            out += [base + i for i in range(len(a)) if a[i] != b[i]]
    return out


class VirtioMachine(RuleBasedStateMachine):
    """A driver that may do anything through the registers and the rings."""

    def __init__(self) -> None:
        super().__init__()
        RUN_COUNTS["cases"] += 1
        self.h = make_harness()
        self.mem = self.h.ctx.memory
        self.dev: v.VirtioMmio | None = None
        self.drv: Driver | None = None
        self.avail: dict[int, int] = {}

    @initialize(kind=st.sampled_from(["blk", "console"]),
                features=st.sampled_from([v.VIRTIO_F_VERSION_1, ALL, ALL & ~v.VIRTIO_F_EVENT_IDX,
                                          ALL & ~v.VIRTIO_F_INDIRECT_DESC]),
                num=st.sampled_from([1, 2, 8, 16, 256]))
    def start(self, kind: str, features: int, num: int) -> None:
        self.dev = VirtioBlk(self.h.ctx, file=str(IMAGE)) if kind == "blk" else \
            VirtioConsole(self.h.ctx, output="none")
        self.mem.write(0x40000, bytes(range(256)) * ((RAM_SIZE - 0x40000) // 256))
        self.drv = Driver(self.dev, self.mem, num=num)
        self.drv.negotiate(features)
        for q in range(self.dev.num_queues):
            self.drv.setup_queue(q)
            self.avail[q] = 0
        self.drv.driver_ok()

    # every step runs through check(): RAM outside what the guest offered stays untouched
    def check(self, action) -> None:  # type: ignore[no-untyped-def]
        assert self.dev is not None
        before = bytes(self.mem.view(0, RAM_SIZE))
        allowed = []
        for q in self.dev.queues:
            allowed.append((q.used, q.used + 6 + 8 * q.num))
            allowed += _ranges_of_table(self.mem, q.desc, q.num)
        seen = spy(self.mem)
        stats = dict(self.dev.stats)
        try:
            action()
        finally:
            del self.mem.view
        RUN_COUNTS["steps"] += 1
        after = bytes(self.mem.view(0, RAM_SIZE))
        for i in changed_bytes(before, after, allowed):
            assert any(lo <= i < hi for lo, hi in allowed), f"wrote {i:#x} outside buffers"
        assert all(self.mem.contains(gpa, max(n, 1)) for gpa, n in seen if n)
        moved = sum(n for _, n in seen)
        bound = sum(q.num for q in self.dev.queues) * (v.MAX_CHAIN_BYTES + 16 * (
            v.MAX_INDIRECT + 256) + 64) + 4096
        assert moved <= bound
        for key in ("read_bytes", "write_bytes", "tx_bytes", "rx_bytes"):
            if key in stats:
                assert self.dev.stats[key] - stats[key] <= bound

    @rule(offset=st.integers(0, v.WINDOW_SIZE + 8), size=st.sampled_from([1, 2, 4, 8]),
          value=st.integers(0, 2**64 - 1))
    def register_write(self, offset: int, size: int, value: int) -> None:
        assert self.dev is not None
        self.check(lambda: self.dev.write(offset, (value & ((1 << 8 * size) - 1))  # type: ignore
                                          .to_bytes(size, "little")))

    @rule(offset=st.integers(0, v.WINDOW_SIZE + 8), size=st.sampled_from([1, 2, 4, 8]))
    def register_read(self, offset: int, size: int) -> None:
        assert self.dev is not None
        out: list[bytes] = []
        self.check(lambda: out.append(self.dev.read(offset, size)))  # type: ignore[union-attr]
        assert len(out[0]) == size

    @rule(queue=st.integers(0, 1), num=st.sampled_from([1, 4, 8, 256, 3, 0]),
          desc=ring_addr, avail=ring_addr, used=ring_addr)
    def reprogram_queue(self, queue: int, num: int, desc: int, avail: int, used: int) -> None:
        drv = self.drv
        assert drv is not None

        def act() -> None:
            drv.w32(v.REG_QUEUE_SEL, queue)
            drv.w32(v.REG_QUEUE_READY, 0)
            drv.w32(v.REG_QUEUE_NUM, num)
            for reg, addr in ((v.REG_QUEUE_DESC_LOW, desc), (v.REG_QUEUE_DRIVER_LOW, avail),
                              (v.REG_QUEUE_DEVICE_LOW, used)):
                drv.w32(reg, addr & 0xFFFFFFFF)
                drv.w32(reg + 4, addr >> 32)
            drv.w32(v.REG_QUEUE_READY, 1)
        self.check(act)

    @rule(queue=st.integers(0, 1), descs=st.lists(chain_desc, min_size=1, max_size=12),
          indirect=st.booleans(), table=st.sampled_from([0x38000, RAM_SIZE - 32, 2**40]),
          jump=st.sampled_from([1, 1, 1, 2, 0, 257, 0x8000]), head=st.integers(0, 300))
    def post_chain(self, queue: int, descs: list[tuple[int, int, int, int | None]],
                   indirect: bool, table: int, jump: int, head: int) -> None:
        dev, mem = self.dev, self.mem
        assert dev is not None
        q = dev.queues[queue % dev.num_queues]
        base, count = (table, len(descs)) if indirect else (q.desc, q.num)
        for i, (addr, length, flags, nxt) in enumerate(descs):
            entry = base + 16 * (i % count)
            if mem.contains(entry, 16):
                mem.write(entry, struct.pack("<QIHH", addr, length, flags,
                                             (i + 1) if nxt is None else nxt))
        if indirect and mem.contains(q.desc, 16):
            mem.write(q.desc, struct.pack("<QIHH", table, 16 * len(descs),
                                          v.DESC_F_INDIRECT, 0))
            head = 0
        a = self.avail.get(queue, 0)
        if mem.contains(q.avail, 6 + 2 * q.num):
            mem.write_u(q.avail + 4 + 2 * (a % q.num), 2, head if head < 300 else 0)
            self.avail[queue] = (a + jump) & 0xFFFF
            mem.write_u(q.avail + 2, 2, self.avail[queue])
        assert self.drv is not None
        self.check(lambda: self.drv.w32(v.REG_QUEUE_NOTIFY, queue))  # type: ignore[union-attr]

    @rule(queue=st.integers(0, 1), rtype=st.sampled_from([0, 1, 4, 8, 99]),
          sector=st.one_of(st.integers(0, 9), st.integers(0, 2**64 - 1)),
          pieces=st.lists(st.integers(1, 1024), min_size=0, max_size=4),
          split=st.integers(1, 15), status_len=st.integers(1, 3), indirect=st.booleans(),
          at=st.integers(0x40000, 0xF0000))
    def post_request(self, queue: int, rtype: int, sector: int, pieces: list[int], split: int,
                     status_len: int, indirect: bool, at: int) -> None:
        """A well-formed request (a blk request; console data either way)."""
        dev, drv, mem = self.dev, self.drv, self.mem
        assert dev is not None and drv is not None
        q = queue % dev.num_queues
        mem.write(at, struct.pack("<IIQ", rtype, 0, sector))
        write_data = rtype != 1 if isinstance(dev, VirtioBlk) else q == 0
        bufs = [(at, split, False), (at + split, 16 - split, False)]
        addr = at + 0x1000
        for n in pieces:
            bufs.append((addr, n, write_data))
            addr += n
        bufs.append((addr, status_len, True))
        if dev.queues[q].num < len(bufs) and not indirect:
            return
        if not all(mem.contains(a, n) for a, n, _ in bufs):
            return
        drv.rings[q] = (dev.queues[q].desc, dev.queues[q].avail, dev.queues[q].used)
        drv.num = dev.queues[q].num
        drv.avail_idx[q] = self.avail.get(q, 0)
        drv.next_desc.setdefault(q, 0)

        try:
            if indirect:
                drv.post_indirect(q, 0x3C000, bufs, notify=False)
            else:
                drv.post(q, bufs, notify=False)
        except GuestMemoryError:
            return  # the rings are outside RAM: the driver itself cannot write them
        self.avail[q] = drv.avail_idx[q]
        self.check(lambda: drv.w32(v.REG_QUEUE_NOTIFY, q))

    @rule(start=st.integers(0xFFF0, 0xFFFF))
    def near_wrap(self, start: int) -> None:
        """Jump both sides to just below 2^16 (as after a long run)."""
        dev, mem = self.dev, self.mem
        assert dev is not None
        for i, q in enumerate(dev.queues):
            q.last_avail = q.used_idx = start
            self.avail[i] = start
            if mem.contains(q.avail, 4):
                mem.write_u(q.avail + 2, 2, start)

    @rule(queue=st.integers(0, 1), used_event=st.integers(0, 0xFFFF), flags=st.integers(0, 3))
    def driver_event_fields(self, queue: int, used_event: int, flags: int) -> None:
        dev, mem = self.dev, self.mem
        assert dev is not None
        q = dev.queues[queue % dev.num_queues]
        if mem.contains(q.avail, 6 + 2 * q.num):
            mem.write_u(q.avail, 2, flags)
            mem.write_u(q.avail + 4 + 2 * q.num, 2, used_event)

    @rule(data=st.binary(max_size=64))
    def host_input(self, data: bytes) -> None:
        if isinstance(self.dev, VirtioConsole):
            self.check(lambda: self.dev.enqueue(data))  # type: ignore[union-attr]

    @rule()
    def driver_reset_and_restart(self) -> None:
        dev, drv = self.dev, self.drv
        assert dev is not None and drv is not None

        def act() -> None:
            drv.negotiate(ALL)
            for q in range(dev.num_queues):
                drv.setup_queue(q)
            drv.driver_ok()
        self.check(act)
        self.avail = {q: 0 for q in range(dev.num_queues)}

    @invariant()
    def saves_and_restores(self) -> None:
        if self.dev is None:
            return
        state = self.dev.save()
        assert json.loads(json.dumps(state)) == state
        other = VirtioBlk(self.h.ctx, file=str(IMAGE)) if isinstance(self.dev, VirtioBlk) \
            else VirtioConsole(self.h.ctx, output="none")
        other.restore(json.loads(json.dumps(state)))
        assert other.save() == state
        other.close()

    @invariant()
    def needs_reset_iff_broken(self) -> None:
        if self.dev is not None:
            assert bool(self.dev.status & v.STATUS_NEEDS_RESET) == self.dev.broken

    def teardown(self) -> None:
        if self.dev is not None:
            self.dev.close()
        self.mem.close()


VirtioMachine.TestCase.settings = settings(
    max_examples=FUZZ_EXAMPLES, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestVirtioStateful = VirtioMachine.TestCase


def test_report_fuzz_counts() -> None:
    """Not a check: prints how many cases and steps the state machines ran (pytest -s)."""
    print(f"\nvirtio stateful: {RUN_COUNTS['cases']} cases, {RUN_COUNTS['steps']} steps")


def test_the_driver_cannot_set_device_needs_reset() -> None:
    """DEVICE_NEEDS_RESET is the device's: a driver writing it to the status register does
    not mark a working device broken (found by the state machine above)."""
    m = VirtioMachine()
    m.start(kind="blk", features=1 << 32, num=1)
    m.register_write(offset=0x70, size=4, value=v.STATUS_NEEDS_RESET)
    m.needs_reset_iff_broken()
    assert m.dev is not None and not m.dev.status & v.STATUS_NEEDS_RESET
    m.teardown()
