"""A tiny virtio-mmio driver for tests: negotiation, split rings in guest RAM, chains."""

from __future__ import annotations

import struct

from kvmfw.memory import GuestMemory

from kvmfw_devices import virtio_mmio as v
from kvmfw_devices.virtio_mmio import VirtioMmio


class Driver:
    def __init__(self, dev: VirtioMmio, mem: GuestMemory, *, ring_base: int = 0x10000,
                 num: int = 8) -> None:
        self.dev, self.mem, self.num = dev, mem, num
        self.rings: dict[int, tuple[int, int, int]] = {}
        self.avail_idx: dict[int, int] = {}
        self.next_desc: dict[int, int] = {}
        self.ring_base = ring_base

    def r32(self, off: int) -> int:
        return int.from_bytes(self.dev.read(off, 4), "little")

    def w32(self, off: int, value: int) -> None:
        self.dev.write(off, value.to_bytes(4, "little"))

    def negotiate(self, features: int = v.VIRTIO_F_VERSION_1) -> int:
        self.w32(v.REG_STATUS, 0)
        self.w32(v.REG_STATUS, v.STATUS_ACKNOWLEDGE | v.STATUS_DRIVER)
        for sel in (0, 1):
            self.w32(v.REG_DRIVER_FEATURES_SEL, sel)
            self.w32(v.REG_DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.w32(v.REG_STATUS, v.STATUS_ACKNOWLEDGE | v.STATUS_DRIVER | v.STATUS_FEATURES_OK)
        return self.r32(v.REG_STATUS)

    def setup_queue(self, index: int) -> None:
        base = self.ring_base + index * 0x4000
        desc, avail, used = base, base + 0x1000, base + 0x2000
        self.w32(v.REG_QUEUE_SEL, index)
        self.w32(v.REG_QUEUE_NUM, self.num)
        for reg, addr in ((v.REG_QUEUE_DESC_LOW, desc), (v.REG_QUEUE_DRIVER_LOW, avail),
                          (v.REG_QUEUE_DEVICE_LOW, used)):
            self.w32(reg, addr & 0xFFFFFFFF)
            self.w32(reg + 4, addr >> 32)
        self.w32(v.REG_QUEUE_READY, 1)
        self.rings[index] = (desc, avail, used)
        self.avail_idx[index] = 0
        self.next_desc[index] = 0

    def driver_ok(self) -> None:
        self.w32(v.REG_STATUS, self.r32(v.REG_STATUS) | v.STATUS_DRIVER_OK)

    def start(self, queues: int) -> None:
        assert self.negotiate() & v.STATUS_FEATURES_OK
        for q in range(queues):
            self.setup_queue(q)
        self.driver_ok()

    def post(self, index: int, bufs: list[tuple[int, int, bool]], *, notify: bool = True,
             raw_flags: dict[int, int] | None = None) -> int:
        """Add a chain of (addr, len, writable); returns its head descriptor index."""
        desc, avail, _ = self.rings[index]
        first = self.next_desc[index]
        ids = [(first + i) % self.num for i in range(len(bufs))]
        for i, (addr, length, writable) in enumerate(bufs):
            flags = (v.DESC_F_WRITE if writable else 0) | (v.DESC_F_NEXT if i + 1 < len(bufs)
                                                            else 0)
            flags = (raw_flags or {}).get(i, flags)
            nxt = ids[i + 1] if i + 1 < len(bufs) else 0
            self.mem.write(desc + 16 * ids[i], struct.pack("<QIHH", addr, length, flags, nxt))
        self.next_desc[index] = (first + len(bufs)) % self.num
        a = self.avail_idx[index]
        self.mem.write_u(avail + 4 + 2 * (a % self.num), 2, ids[0])
        self.avail_idx[index] = (a + 1) & 0xFFFF
        self.mem.write_u(avail + 2, 2, self.avail_idx[index])
        if notify:
            self.w32(v.REG_QUEUE_NOTIFY, index)
        return ids[0]

    def post_indirect(self, index: int, table: int, bufs: list[tuple[int, int, bool]], *,
                      notify: bool = True) -> int:
        """Add a chain as one indirect descriptor pointing at a table written at ``table``."""
        for i, (addr, length, writable) in enumerate(bufs):
            flags = (v.DESC_F_WRITE if writable else 0) | (v.DESC_F_NEXT if i + 1 < len(bufs)
                                                            else 0)
            self.mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, i + 1))
        return self.post(index, [(table, 16 * len(bufs), False)], notify=notify,
                         raw_flags={0: v.DESC_F_INDIRECT})

    def used(self, index: int) -> list[tuple[int, int]]:
        _, _, used = self.rings[index]
        n = self.mem.read_u(used + 2, 2)
        return [struct.unpack("<II", self.mem.read(used + 4 + 8 * i, 8)) for i in range(n)]
