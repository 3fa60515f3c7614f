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

Every guest-supplied address and length (the rings when a queue is made ready, each
descriptor of each chain) is checked against guest RAM before use. A bad one (outside RAM, a
head or next index out of range, a loop, an indirect descriptor, which is not offered, or
a readable descriptor after a writable one) marks the device broken: Status gets
DEVICE_NEEDS_RESET, a configuration-change interrupt is raised, and the device ignores the
queues until the driver resets it. The host never touches memory outside guest RAM.

Subclasses (one module per device) set ``device_id``, ``device_features``, ``num_queues`` and
implement :meth:`VirtioMmio.handle_chain` and the configuration space.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from kvmfw.device import ConfigKey, Device, DeviceContext, Range, parse_int
from kvmfw.errors import GuestMemoryError

from kvmfw_devices import KVMFW_PLUGIN_API as KVMFW_PLUGIN_API  # checked by the core
from kvmfw_devices._util import ones, to_bytes, to_int
from kvmfw_devices.irq import drive_irq

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x554D4551  # "QEMU", as QEMU's devices say
WINDOW_SIZE = 0x200

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

VIRTIO_F_VERSION_1 = 1 << 32

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
DESC_SIZE = 16
AVAIL_F_NO_INTERRUPT = 1
QUEUE_NUM_MAX = 256

_ADDR_REGS = {REG_QUEUE_DESC_LOW: ("desc", 0), REG_QUEUE_DESC_HIGH: ("desc", 32),
              REG_QUEUE_DRIVER_LOW: ("avail", 0), REG_QUEUE_DRIVER_HIGH: ("avail", 32),
              REG_QUEUE_DEVICE_LOW: ("used", 0), REG_QUEUE_DEVICE_HIGH: ("used", 32)}


class BadDescriptor(Exception):
    """The driver handed the device something it must not touch."""


@dataclass
class Queue:
    """One split virtqueue's transport state."""

    num: int = QUEUE_NUM_MAX
    ready: bool = False
    desc: int = 0
    avail: int = 0
    used: int = 0
    last_avail: int = 0
    used_idx: int = 0


@dataclass(frozen=True)
class Buffer:
    """One descriptor of a chain: guest-physical ``addr``, ``length``, device-writable?"""

    addr: int
    length: int
    writable: bool


class VirtioMmio(Device):
    """The virtio-mmio transport; a device subclass supplies the queues' meaning."""

    name: ClassVar[str] = "virtio-mmio"
    device_id: ClassVar[int] = 0
    device_features: ClassVar[int] = 0
    num_queues: ClassVar[int] = 1
    config: ClassVar[dict[str, ConfigKey]] = {
        "base": ConfigKey(parse_int, 0xD0000000, "MMIO base of the 512-byte window"),
        "irq": ConfigKey(parse_int, 5, "interrupt line (-1: none)"),
    }

    def __init__(self, ctx: DeviceContext, **params: Any) -> None:
        super().__init__(ctx, **params)
        self.stats.update(notifications=0, chains=0, interrupts=0, bad_descriptors=0)
        self.irq_line = self.optional_irq(self.params["irq"])
        self._irq_level = False
        self.reset()

    def ranges(self) -> list[Range]:
        return [Range("mmio", self.params["base"], WINDOW_SIZE, self.name)]

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
        return self.device_features | VIRTIO_F_VERSION_1

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
            if q is not None and not q.ready and 0 < value <= QUEUE_NUM_MAX:
                q.num = value
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
        self.status = value | (self.status & STATUS_NEEDS_RESET)

    def _set_ready(self, q: Queue, ready: bool) -> None:
        if ready and not q.ready:
            mem, n = self.ctx.memory, q.num
            if not (mem.contains(q.desc, DESC_SIZE * n) and mem.contains(q.avail, 6 + 2 * n)
                    and mem.contains(q.used, 6 + 8 * n)) or q.desc % 16 or q.avail % 2 \
                    or q.used % 4:
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
            if avail_idx == q.last_avail:
                return None
            if (avail_idx - q.last_avail) & 0xFFFF > q.num:
                raise BadDescriptor(f"available index jumped from {q.last_avail} to {avail_idx}")
            head = mem.read_u(q.avail + 4 + 2 * (q.last_avail % q.num), 2)
            q.last_avail = (q.last_avail + 1) & 0xFFFF
            return head, self._walk(q, head)
        except (BadDescriptor, GuestMemoryError) as exc:
            self.mark_broken(str(exc))
            return None

    def _walk(self, q: Queue, head: int) -> list[Buffer]:
        mem, out, idx = self.ctx.memory, [], head
        seen_writable = False
        for _ in range(q.num):
            if idx >= q.num:
                raise BadDescriptor(f"descriptor index {idx} >= queue size {q.num}")
            addr, length, flags, nxt = struct.unpack("<QIHH", mem.read(q.desc + DESC_SIZE * idx,
                                                                       DESC_SIZE))
            if flags & DESC_F_INDIRECT:
                raise BadDescriptor("indirect descriptor (not negotiated)")
            writable = bool(flags & DESC_F_WRITE)
            if seen_writable and not writable:
                raise BadDescriptor("readable descriptor after a writable one")
            if length and not mem.contains(addr, length):
                raise BadDescriptor(f"descriptor [{addr:#x}, +{length:#x}) is outside guest RAM")
            seen_writable |= writable
            out.append(Buffer(addr, length, writable))
            if not flags & DESC_F_NEXT:
                return out
            idx = nxt
        raise BadDescriptor(f"descriptor chain from {head} is longer than the queue (a loop?)")

    def push_used(self, index: int, head: int, written: int) -> None:
        """Return chain ``head`` with ``written`` bytes written; interrupt unless suppressed."""
        q, mem = self.queues[index], self.ctx.memory
        try:
            slot = q.used + 4 + 8 * (q.used_idx % q.num)
            mem.write(slot, struct.pack("<II", head, written))
            q.used_idx = (q.used_idx + 1) & 0xFFFF
            mem.write_u(q.used + 2, 2, q.used_idx)
            no_irq = mem.read_u(q.avail, 2) & AVAIL_F_NO_INTERRUPT
        except GuestMemoryError as exc:
            self.mark_broken(str(exc))
            return
        self.stats["chains"] += 1
        if not no_irq:
            self.interrupt(INT_USED_BUFFER)

    def process_queue(self, index: int) -> None:
        """Handle every available chain of queue ``index`` with :meth:`handle_chain`."""
        while True:
            chain = self.pop_chain(index)
            if chain is None:
                return
            head, bufs = chain
            written = self.handle_chain(index, bufs)
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

    # --- gathering helpers for devices ---------------------------------------------------------

    def gather(self, buffers: list[Buffer]) -> bytes:
        """All device-readable bytes of a chain (already checked against RAM)."""
        mem = self.ctx.memory
        return b"".join(mem.read(b.addr, b.length) for b in buffers
                        if not b.writable and b.length)

    def scatter(self, buffers: list[Buffer], data: bytes) -> int:
        """Write ``data`` into the chain's device-writable buffers; returns bytes written."""
        mem, done = self.ctx.memory, 0
        for b in buffers:
            if not b.writable or not b.length or done >= len(data):
                continue
            n = min(b.length, len(data) - done)
            mem.write(b.addr, data[done:done + n])
            done += n
        return done

    # --- state ------------------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        return {"status": self.status, "device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel,
                "driver_features": self.driver_features, "queue_sel": self.queue_sel,
                "interrupt_status": self.interrupt_status,
                "config_generation": self.config_generation, "broken": self.broken,
                "queues": [asdict(q) for q in self.queues]}

    def restore(self, state: dict[str, Any]) -> None:
        for key in ("status", "device_features_sel", "driver_features_sel", "driver_features",
                    "queue_sel", "interrupt_status", "config_generation"):
            setattr(self, key, int(state[key]))
        self.broken = bool(state["broken"])
        self.queues = [Queue(num=int(q["num"]), ready=bool(q["ready"]), desc=int(q["desc"]),
                             avail=int(q["avail"]), used=int(q["used"]),
                             last_avail=int(q["last_avail"]), used_idx=int(q["used_idx"]))
                       for q in state["queues"]][:self.num_queues]
        for q in self.queues:
            q.num = min(max(q.num, 1), QUEUE_NUM_MAX)
        self.queues += [Queue() for _ in range(self.num_queues - len(self.queues))]
        self._irq_level = not self.interrupt_status  # force the line to match
        self._update_irq()
