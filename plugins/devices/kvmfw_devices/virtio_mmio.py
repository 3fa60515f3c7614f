"""virtio-mmio transport, version 2 (virtio 1.x), with split virtqueues checked against RAM.

Register map (virtio 1.1, 4.2.2 "MMIO Device Register Layout"; 32-bit registers)::

    0x000 MagicValue "virt"   0x004 Version (2)   0x008 DeviceID   0x00c VendorID
    0x010 DeviceFeatures      0x014 DeviceFeaturesSel
    0x020 DriverFeatures      0x024 DriverFeaturesSel
    0x030 QueueSel   0x034 QueueNumMax   0x038 QueueNum   0x044 QueueReady
    0x050 QueueNotify         0x060 InterruptStatus   0x064 InterruptACK   0x070 Status
    0x080/0x084 QueueDesc     0x090/0x094 QueueDriver (avail)   0x0a0/0x0a4 QueueDevice (used)
    0x0fc ConfigGeneration    0x100+ device configuration space (1, 2, 4 or 8 bytes)

Split virtqueues (virtio 1.1, 2.6): descriptors ``{le64 addr; le32 len; le16 flags; le16
next}`` (flags NEXT 1, WRITE 2, INDIRECT 4), the available ring ``{flags, idx, ring[num]}``
and the used ring ``{flags, idx, {le32 id, le32 len}[num]}``.

Every guest-supplied address, length, index and count is bounded before use: the rings when
a queue is made ready (QueueNum a power of two up to 256), each descriptor of each chain, the
number of descriptors in a chain (at most the queue size, so a ``next`` loop ends; an
indirect table at most :data:`MAX_INDIRECT` entries, not nested), the total bytes of a chain
(:data:`MAX_CHAIN_BYTES`) and the distance the available index may move (at most the queue
size, modulo 2^16). Chains are processed as *views* of guest RAM (memoryviews into the
mapped regions, from :meth:`GuestMemory.view`), never gathered into host copies, so a chain
that lists the same RAM many times costs the host nothing. A bad one (outside RAM, a head
or next index out of range, a loop, a bad indirect table, a readable descriptor after a
writable one, too many bytes, the available index jumping) marks the device broken: Status
gets DEVICE_NEEDS_RESET, a configuration-change interrupt is raised, and the device ignores
the queues until the driver resets it. Nothing the guest does raises out of the run loop.

Offered transport features: VIRTIO_F_VERSION_1, VIRTIO_F_INDIRECT_DESC and
VIRTIO_F_EVENT_IDX (with event idx the device writes ``avail_event`` after each chain and
interrupts only when the used index passes the driver's ``used_event``).

Exits: QueueNotify is a doorbell through ``KVM_IOEVENTFD`` (``ioeventfd=on``, the default;
:mod:`kvmfw_devices.ioevent`): the guest's write completes in KVM and the queue is served
on the run loop's next event pass, as the exit path would serve it (a value that is not a
queue index, or a write of another width, still exits). Interrupts are ``KVM_IRQ_LINE``
calls (no exit). Every other register access exits: each one reads or changes state the
next access sees.

Subclasses (one module per device) set ``device_id``, ``device_features``, ``num_queues`` and
implement :meth:`VirtioMmio.handle_chain` and the configuration space.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, ClassVar

from kvmfw.device import (
    ConfigKey,
    Device,
    DeviceContext,
    FirmwareNode,
    Range,
    parse_bool,
    parse_int,
)
from kvmfw.errors import CheckpointError, GuestMemoryError
from kvmfw.record import Frozen, Record

from kvmfw_devices import KVMFW_PLUGIN_API as KVMFW_PLUGIN_API  # checked by the core
from kvmfw_devices._util import ones, to_bytes, to_int
from kvmfw_devices.ioevent import Doorbells
from kvmfw_devices.irq import drive_irq

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x554D4551  # "QEMU", as QEMU's devices say
WINDOW_SIZE = 0x200
VIRTIO_MMIO_HID = "LNRO0005"
"""The ACPI _HID Linux's virtio_mmio driver binds to (QEMU's microvm uses it too)."""

REG_MAGIC = 0x000
REG_VERSION = 0x004
REG_DEVICE_ID = 0x008
REG_VENDOR_ID = 0x00C
REG_DEVICE_FEATURES = 0x010
REG_DEVICE_FEATURES_SEL = 0x014
REG_DRIVER_FEATURES = 0x020
REG_DRIVER_FEATURES_SEL = 0x024
REG_QUEUE_SEL = 0x030
REG_QUEUE_NUM_MAX = 0x034
REG_QUEUE_NUM = 0x038
REG_QUEUE_READY = 0x044
REG_QUEUE_NOTIFY = 0x050
REG_INTERRUPT_STATUS = 0x060
REG_INTERRUPT_ACK = 0x064
REG_STATUS = 0x070
REG_QUEUE_DESC_LOW = 0x080
REG_QUEUE_DESC_HIGH = 0x084
REG_QUEUE_DRIVER_LOW = 0x090
REG_QUEUE_DRIVER_HIGH = 0x094
REG_QUEUE_DEVICE_LOW = 0x0A0
REG_QUEUE_DEVICE_HIGH = 0x0A4
REG_CONFIG_GENERATION = 0x0FC
REG_CONFIG = 0x100

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64
STATUS_FAILED = 128

INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2

VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
TRANSPORT_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
DESC_SIZE = 16
AVAIL_F_NO_INTERRUPT = 1
QUEUE_NUM_MAX = 256
MAX_INDIRECT = 1024
"""Entries an indirect table may have (QEMU's VIRTQUEUE_MAX_SIZE; the table is 16 KiB)."""
MAX_CHAIN_BYTES = 64 << 20
"""Bytes one chain may describe in all (Linux's largest request is ~1.25 MiB by default)."""

_DESC = struct.Struct("<QIHH")
_ADDR_REGS = {REG_QUEUE_DESC_LOW: ("desc", 0), REG_QUEUE_DESC_HIGH: ("desc", 32),
              REG_QUEUE_DRIVER_LOW: ("avail", 0), REG_QUEUE_DRIVER_HIGH: ("avail", 32),
              REG_QUEUE_DEVICE_LOW: ("used", 0), REG_QUEUE_DEVICE_HIGH: ("used", 32)}


class BadDescriptor(GuestMemoryError):
    """The driver handed the device something it must not touch (caught: the device then
    needs a reset)."""


class Queue(Record):
    """One split virtqueue's transport state (indices are the 16-bit ring indices)."""

    def __init__(self, num: int = QUEUE_NUM_MAX, ready: bool = False, desc: int = 0,
                 avail: int = 0, used: int = 0, last_avail: int = 0,
                 used_idx: int = 0) -> None:
        self.num = num
        self.ready = ready
        self.desc = desc
        self.avail = avail
        self.used = used
        self.last_avail = last_avail
        self.used_idx = used_idx


class Buffer(Frozen):
    """One descriptor of a chain: guest-physical ``addr``, ``length``, device-writable?
    Already checked to lie in guest RAM (or to be empty)."""

    addr: int
    length: int
    writable: bool


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's ``vring_need_event``: did the index move from ``old`` to ``new`` past
    ``event``? (All modulo 2^16.)"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class VirtioMmio(Device):
    """The virtio-mmio transport; a device subclass supplies the queues' meaning."""

    name: ClassVar[str] = "virtio-mmio"
    device_id: ClassVar[int] = 0
    device_features: ClassVar[int] = 0
    num_queues: ClassVar[int] = 1
    config: ClassVar[dict[str, ConfigKey]] = {
        "base": ConfigKey(parse_int, 0xD0000000, "MMIO base of the 512-byte window"),
        "irq": ConfigKey(parse_int, 5, "interrupt line (-1: none)"),
        "ioeventfd": ConfigKey(parse_bool, True, "QueueNotify completes in KVM "
                               "(KVM_IOEVENTFD) and is served on the event queue; off: "
                               "every notify is an exit"),
    }

    def __init__(self, ctx: DeviceContext, **params: Any) -> None:
        super().__init__(ctx, **params)
        self.stats.update(notifications=0, chains=0, interrupts=0, bad_descriptors=0,
                          ioeventfd_notifications=0)
        self.irq_line = self.optional_irq(self.params["irq"])
        self._irq_level = False
        self.reset()
        self.doorbells: Doorbells | None = None
        if self.params["ioeventfd"]:
            bells = Doorbells(ctx, self.name, self._doorbell)
            notify = self.params["base"] + REG_QUEUE_NOTIFY
            if all(bells.add(i, notify, 4, datamatch=i) for i in range(self.num_queues)):
                self.doorbells = bells
            else:  # all queues or none: one path per device
                bells.close()

    def _doorbell(self, index: int) -> None:
        """QueueNotify written with ``index``, completed in KVM (the exit path's twin)."""
        self.stats["notifications"] += 1
        self.stats["ioeventfd_notifications"] += 1
        self.notify(index)

    def ranges(self) -> list[Range]:
        return [Range("mmio", self.params["base"], WINDOW_SIZE, self.name)]

    def firmware(self) -> list[FirmwareNode]:
        """A virtio-mmio window: ``LNRO0005`` in ACPI, ``virtio,mmio`` in a device tree
        (only with an interrupt: the drivers need one)."""
        if self.params["irq"] < 0:
            return []
        return [FirmwareNode("virtio-mmio", "mmio", self.params["base"], WINDOW_SIZE,
                             irq=self.params["irq"], acpi_hid=VIRTIO_MMIO_HID,
                             compatible=("virtio,mmio",), node_name="virtio_mmio",
                             dma_coherent=True)]

    def kernel_cmdline(self) -> str:
        """How Linux finds this device without a device tree (``virtio_mmio.device=``)."""
        return f"virtio_mmio.device=512@{self.params['base']:#x}:{self.params['irq']}"

    def reset(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.broken = False
        self.queues = [Queue() for _ in range(self.num_queues)]
        self._update_irq()

    # --- features, interrupts, breakage -------------------------------------------------------

    @property
    def offered_features(self) -> int:
        return self.device_features | TRANSPORT_FEATURES

    def negotiated(self, feature: int) -> bool:
        return bool(self.driver_features & feature)

    def _update_irq(self) -> None:
        level = self.interrupt_status != 0
        self._irq_level = drive_irq(self.irq_line, level, self._irq_level, self.stats)

    def interrupt(self, bits: int = INT_USED_BUFFER) -> None:
        self.interrupt_status |= bits
        self._update_irq()

    def mark_broken(self, why: str) -> None:
        """The driver gave us something bad: need a reset, tell the driver, touch nothing."""
        self.stats["bad_descriptors"] += 1
        self.log.warning("%s: %s; device needs reset", self.name, why)
        self.broken = True
        self.status |= STATUS_NEEDS_RESET
        self.interrupt(INT_CONFIG_CHANGE)

    # --- register access ----------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        self.stats["reads"] += 1
        if offset >= REG_CONFIG:
            if size in (1, 2, 4, 8) and offset + size <= WINDOW_SIZE:
                return self.read_config(offset - REG_CONFIG, size)
        elif size == 4 and offset % 4 == 0:
            value = self._read_reg(offset)
            if value is not None:
                return to_bytes(value, 4)
        self.stats["bad_accesses"] += 1
        return ones(size)

    def _read_reg(self, offset: int) -> int | None:
        q = self.queues[self.queue_sel] if self.queue_sel < self.num_queues else None
        if offset == REG_MAGIC:
            return MAGIC
        if offset == REG_VERSION:
            return VERSION
        if offset == REG_DEVICE_ID:
            return self.device_id
        if offset == REG_VENDOR_ID:
            return VENDOR_ID
        if offset == REG_DEVICE_FEATURES:
            return (self.offered_features >> (32 * self.device_features_sel)) & 0xFFFFFFFF \
                if self.device_features_sel < 2 else 0
        if offset == REG_QUEUE_NUM_MAX:
            return QUEUE_NUM_MAX if q is not None else 0
        if offset == REG_QUEUE_READY:
            return int(q.ready) if q is not None else 0
        if offset == REG_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == REG_STATUS:
            return self.status
        if offset == REG_CONFIG_GENERATION:
            return self.config_generation
        if offset in _ADDR_REGS and q is not None:
            field, shift = _ADDR_REGS[offset]
            return (getattr(q, field) >> shift) & 0xFFFFFFFF
        if offset == REG_QUEUE_NUM and q is not None:
            return q.num
        return None

    def write(self, offset: int, data: bytes) -> None:
        self.stats["writes"] += 1
        size = len(data)
        if offset >= REG_CONFIG:
            if size in (1, 2, 4, 8) and offset + size <= WINDOW_SIZE:
                self.write_config(offset - REG_CONFIG, data)
                return
        elif size == 4 and offset % 4 == 0 and self._write_reg(offset, to_int(data)):
            return
        self.stats["bad_accesses"] += 1

    def _write_reg(self, offset: int, value: int) -> bool:
        q = self.queues[self.queue_sel] if self.queue_sel < self.num_queues else None
        if offset == REG_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == REG_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == REG_DRIVER_FEATURES:
            if self.driver_features_sel < 2 and not self.status & STATUS_FEATURES_OK:
                shift = 32 * self.driver_features_sel
                mask = 0xFFFFFFFF << shift
                self.driver_features = (self.driver_features & ~mask) | (value << shift)
        elif offset == REG_QUEUE_SEL:
            self.queue_sel = value
        elif offset == REG_QUEUE_NUM:
            if q is not None and not q.ready:
                if value <= QUEUE_NUM_MAX and _pow2(value):
                    q.num = value
                else:  # split rings wrap their 16-bit indices: only powers of two work
                    self.mark_broken(f"queue size {value} is not a power of two up to "
                                     f"{QUEUE_NUM_MAX}")
        elif offset == REG_QUEUE_READY:
            if q is not None:
                self._set_ready(q, bool(value & 1))
        elif offset == REG_QUEUE_NOTIFY:
            self.stats["notifications"] += 1
            if value < self.num_queues:
                self.notify(value)
        elif offset == REG_INTERRUPT_ACK:
            self.interrupt_status &= ~value
            self._update_irq()
        elif offset == REG_STATUS:
            self._write_status(value)
        elif offset in _ADDR_REGS:
            if q is not None and not q.ready:
                field, shift = _ADDR_REGS[offset]
                old = getattr(q, field)
                setattr(q, field, (old & ~(0xFFFFFFFF << shift)) | (value << shift))
        else:
            return False
        return True

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            self.device_reset()
            return
        if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK:
            accepted = self.driver_features & ~self.offered_features == 0 and \
                self.negotiated(VIRTIO_F_VERSION_1)
            if not accepted:
                value &= ~STATUS_FEATURES_OK  # the driver reads it back and gives up
        # DEVICE_NEEDS_RESET is the device's to set (when it is broken), never the driver's
        self.status = (value & 0xFF & ~STATUS_NEEDS_RESET) | (self.status & STATUS_NEEDS_RESET)

    def _rings_ok(self, q: Queue) -> bool:
        mem, n = self.ctx.memory, q.num
        return (_pow2(n) and n <= QUEUE_NUM_MAX and mem.contains(q.desc, DESC_SIZE * n)
                and mem.contains(q.avail, 6 + 2 * n) and mem.contains(q.used, 6 + 8 * n)
                and not (q.desc % 16 or q.avail % 2 or q.used % 4))

    def _set_ready(self, q: Queue, ready: bool) -> None:
        if ready and not q.ready and not self._rings_ok(q):
            self.mark_broken(f"queue rings outside guest RAM or misaligned "
                             f"(desc {q.desc:#x} avail {q.avail:#x} used {q.used:#x})")
            return
        q.ready = ready

    # --- virtqueue processing -----------------------------------------------------------------

    def notify(self, index: int) -> None:
        """The driver added buffers to queue ``index``; devices may override to defer."""
        self.process_queue(index)

    def queue_usable(self, index: int) -> bool:
        q = self.queues[index]
        return q.ready and not self.broken and bool(self.status & STATUS_DRIVER_OK)

    def pop_chain(self, index: int) -> tuple[int, list[Buffer]] | None:
        """The next available chain ``(head, buffers)``, every buffer checked; None if empty
        (or the device just broke)."""
        if not self.queue_usable(index):
            return None
        q, mem = self.queues[index], self.ctx.memory
        try:
            avail_idx = mem.read_u(q.avail + 2, 2)
            pending = (avail_idx - q.last_avail) & 0xFFFF
            if pending == 0:
                return None
            if pending > q.num:  # a driver can never have more than num chains outstanding
                raise BadDescriptor(f"available index jumped from {q.last_avail} to {avail_idx} "
                                    f"(queue size {q.num})")
            head = mem.read_u(q.avail + 4 + 2 * (q.last_avail % q.num), 2)
            q.last_avail = (q.last_avail + 1) & 0xFFFF
            if self.negotiated(VIRTIO_F_EVENT_IDX):
                # avail_event: "notify me when you make chain last_avail available"
                mem.write_u(q.used + 4 + 8 * q.num, 2, q.last_avail)
            return head, self._walk(q, head)
        except GuestMemoryError as exc:
            self.mark_broken(str(exc))
            return None

    def _walk(self, q: Queue, head: int) -> list[Buffer]:
        """The chain from ``head``: at most ``q.num`` ring descriptors, or one indirect
        table of at most :data:`MAX_INDIRECT` entries; at most :data:`MAX_CHAIN_BYTES`."""
        if head >= q.num:
            raise BadDescriptor(f"head descriptor index {head} >= queue size {q.num}")
        mem = self.ctx.memory
        addr, length, flags, _ = _DESC.unpack(mem.view(q.desc + DESC_SIZE * head, DESC_SIZE))
        if flags & DESC_F_INDIRECT:
            if not self.negotiated(VIRTIO_F_INDIRECT_DESC):
                raise BadDescriptor("indirect descriptor (not negotiated)")
            if flags & DESC_F_NEXT:
                raise BadDescriptor("indirect descriptor with NEXT set")
            if not length or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                raise BadDescriptor(f"indirect table of {length} bytes (a multiple of "
                                    f"{DESC_SIZE}, at most {MAX_INDIRECT} entries)")
            if not mem.contains(addr, length):
                raise BadDescriptor(f"indirect table [{addr:#x}, +{length:#x}) is outside "
                                    f"guest RAM")
            return self._walk_table(addr, length // DESC_SIZE, 0, head, indirect=True)
        return self._walk_table(q.desc, q.num, head, head, indirect=False)

    def _walk_table(self, table: int, count: int, first: int, head: int, *,
                    indirect: bool) -> list[Buffer]:
        mem, out, idx = self.ctx.memory, [], first
        seen_writable, total = False, 0
        for _ in range(count):  # each descriptor at most once: a longer chain is a loop
            if idx >= count:
                raise BadDescriptor(f"descriptor index {idx} >= table size {count}")
            addr, length, flags, nxt = _DESC.unpack(mem.view(table + DESC_SIZE * idx, DESC_SIZE))
            if flags & DESC_F_INDIRECT:
                raise BadDescriptor("nested indirect descriptor" if indirect else
                                    "indirect descriptor inside a chain")
            writable = bool(flags & DESC_F_WRITE)
            if seen_writable and not writable:
                raise BadDescriptor("readable descriptor after a writable one")
            if length and not mem.contains(addr, length):
                raise BadDescriptor(f"descriptor [{addr:#x}, +{length:#x}) is outside guest RAM")
            total += length
            if total > MAX_CHAIN_BYTES:
                raise BadDescriptor(f"chain from {head} describes more than {MAX_CHAIN_BYTES} "
                                    f"bytes")
            seen_writable |= writable
            out.append(Buffer(addr, length, writable))
            if not flags & DESC_F_NEXT:
                return out
            idx = nxt
        raise BadDescriptor(f"descriptor chain from {head} is longer than its table "
                            f"({count}; a loop?)")

    def push_used(self, index: int, head: int, written: int) -> None:
        """Return chain ``head`` with ``written`` bytes written; interrupt unless suppressed
        (``AVAIL_F_NO_INTERRUPT``, or with event idx unless ``used_event`` was passed)."""
        q, mem = self.queues[index], self.ctx.memory
        try:
            slot = q.used + 4 + 8 * (q.used_idx % q.num)
            mem.write(slot, struct.pack("<II", head, written))
            old, q.used_idx = q.used_idx, (q.used_idx + 1) & 0xFFFF
            mem.write_u(q.used + 2, 2, q.used_idx)
            if self.negotiated(VIRTIO_F_EVENT_IDX):
                used_event = mem.read_u(q.avail + 4 + 2 * q.num, 2)
                send = need_event(used_event, q.used_idx, old)
            else:
                send = not mem.read_u(q.avail, 2) & AVAIL_F_NO_INTERRUPT
        except GuestMemoryError as exc:
            self.mark_broken(str(exc))
            return
        self.stats["chains"] += 1
        if send:
            self.interrupt(INT_USED_BUFFER)

    def process_queue(self, index: int) -> None:
        """Handle every available chain of queue ``index`` with :meth:`handle_chain`."""
        while True:
            chain = self.pop_chain(index)
            if chain is None:
                return
            head, bufs = chain
            try:
                written = self.handle_chain(index, bufs)
            except GuestMemoryError as exc:  # checked already: only a racing region change
                self.mark_broken(str(exc))
            if self.broken:
                return
            self.push_used(index, head, written)

    # --- what a device provides -----------------------------------------------------------------

    def handle_chain(self, index: int, buffers: list[Buffer]) -> int:
        """Consume one chain of queue ``index``; return the bytes written into it."""
        return 0

    def read_config(self, offset: int, size: int) -> bytes:
        raw = self.config_bytes()
        return raw[offset:offset + size].ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        pass  # read-only unless the device says otherwise

    def config_bytes(self) -> bytes:
        return b""

    def device_reset(self) -> None:
        """The driver reset the device (Status written 0)."""

    # --- views of a chain for devices ----------------------------------------------------------

    def views(self, buffers: list[Buffer], writable: bool, skip: int = 0,
              limit: int | None = None) -> Iterator[memoryview]:
        """Zero-copy views of the chain's readable (or writable) bytes, after the first
        ``skip`` of them and at most ``limit`` in all. Use each at once; do not keep them
        (a live view pins the guest RAM mapping)."""
        mem, left = self.ctx.memory, MAX_CHAIN_BYTES if limit is None else limit
        for b in buffers:
            if b.writable != writable or not b.length:
                continue
            if skip >= b.length:
                skip -= b.length
                continue
            n = min(b.length - skip, left)
            if n <= 0:
                return
            view = mem.view(b.addr + skip, n)
            if writable:  # the device writes it: KVM's dirty log does not see that
                mem.mark_dirty(b.addr + skip, n)
            yield view
            left -= n
            skip = 0

    def gather(self, buffers: list[Buffer], limit: int) -> bytes:
        """A copy of at most ``limit`` device-readable bytes of a chain (for headers; bulk
        data goes through :meth:`views`)."""
        return b"".join(bytes(v) for v in self.views(buffers, False, limit=limit))

    def scatter(self, buffers: list[Buffer], data: bytes | bytearray | memoryview,
                skip: int = 0) -> int:
        """Write ``data`` into the chain's device-writable bytes (after ``skip``); returns
        the bytes written."""
        done = 0
        for view in self.views(buffers, True, skip=skip, limit=len(data)):
            view[:] = data[done:done + len(view)]
            done += len(view)
        return done

    # --- state ------------------------------------------------------------------------------------

    def is_drained(self) -> bool:
        """A doorbell rung but not yet served is an access in flight: serve it now."""
        if self.doorbells is not None:
            self.doorbells.serve_pending()
        return True

    def after_fork(self, child: int) -> None:
        """Doorbells move to the child's VM (:meth:`Doorbells.after_fork`); where KVM
        refuses, the child's notifications take the exit path."""
        if self.doorbells is not None and not self.doorbells.after_fork():
            self.doorbells.close()
            self.doorbells = None

    def close(self) -> None:
        if self.doorbells is not None:
            self.doorbells.close()
            self.doorbells = None

    def save(self) -> dict[str, Any]:
        return {"status": self.status, "device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel,
                "driver_features": self.driver_features, "queue_sel": self.queue_sel,
                "interrupt_status": self.interrupt_status,
                "config_generation": self.config_generation, "broken": self.broken,
                "queues": [q.as_dict() for q in self.queues]}

    def restore(self, state: dict[str, Any]) -> None:
        """Load :meth:`save` output; values are masked to their register widths and a
        queue whose size is not a power of two up to 256 is refused."""
        try:
            u32 = {k: int(state[k]) & 0xFFFFFFFF
                   for k in ("device_features_sel", "driver_features_sel", "queue_sel",
                             "interrupt_status", "config_generation")}
            queues = [Queue(num=int(q["num"]), ready=bool(q["ready"]),
                            desc=int(q["desc"]) & (2**64 - 1),
                            avail=int(q["avail"]) & (2**64 - 1),
                            used=int(q["used"]) & (2**64 - 1),
                            last_avail=int(q["last_avail"]) & 0xFFFF,
                            used_idx=int(q["used_idx"]) & 0xFFFF)
                      for q in list(state["queues"])[:self.num_queues]]
            status = int(state["status"]) & 0xFF
            features = int(state["driver_features"]) & (2**64 - 1)
            broken = bool(state["broken"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.name}: bad saved state ({exc!r})") from None
        for q in queues:
            if not (_pow2(q.num) and q.num <= QUEUE_NUM_MAX):
                raise CheckpointError(f"{self.name}: saved queue size {q.num} is not a power "
                                      f"of two up to {QUEUE_NUM_MAX}")
        for key, value in u32.items():
            setattr(self, key, value)
        self.status, self.driver_features, self.broken = status, features, broken
        self.queues = queues + [Queue() for _ in range(self.num_queues - len(queues))]
        self._irq_level = not self.interrupt_status  # force the line to match
        self._update_irq()
