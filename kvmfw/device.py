"""The device contract: what a device plugin implements and what it is given.

A device is a small object with a narrow interface, in the spirit of rust-vmm:

* ``read(offset, size) -> bytes`` and ``write(offset, data)`` for guest accesses, with
  offsets relative to each of its ranges (declared by :meth:`Device.ranges`);
* ``reset()``, ``save() -> dict`` and ``restore(state)`` (plain data, for checkpoints);
* ``stats`` (a dict of counters) and ``is_drained()``;
* ``firmware() -> list[FirmwareNode]``: how it appears in the firmware tables an arch plugin
  generates (ACPI on x86, the device tree on ARMv8). The tables are built from these
  declarations alone, never from class or entry-point names, so a third-party device
  appears exactly like a built-in one.

It is constructed with a :class:`DeviceContext` (its IRQ lines, the event queue, guest
RAM for DMA, a way to end the run) and its configuration keys; it never sees ``kvm_run``,
the VM or another device. Device plugins publish classes under the ``kvmfw.devices``
entry-point group; the entry-point name is the name used on the command line
(``--device uart16550,port=0x3f8,irq=4``).

Timing-mode MMIO (gem5's ``RunningMMIOPending``): an MMIO ``read`` or ``write`` may
return a :class:`kvmfw.bus.PendingAccess` (``PendingAccess(size)`` for a read,
``PendingAccess(len(data), is_write=True)`` for a write) instead of answering at once. The
vCPU then waits in ``RunningMMIOPending`` without entering KVM, while simulated time, events
and other vCPUs go on; the device later calls ``pending.complete(data)`` (a read's ``size``
bytes; nothing for a write), normally from an :class:`~kvmfw.eventq.Event` it scheduled
``delay`` ticks ahead, and the vCPU's ``finish_mmio_pending()`` resumes it. Rules: complete
every access exactly once (twice, or with the wrong size, is a
:class:`~kvmfw.errors.DeviceError`); keep what you owe in ``is_drained()`` (False while an
access is outstanding) -- a drain runs device events until the access completes, and a
device that never completes it fails the drain with :class:`~kvmfw.errors.StateError`;
port IO and reads by devices or DMA (``AddressSpace.read``) cannot wait. The latency device
(``kvmfw_devices.latency_mmio``) is the reference implementation.

After a fork (:mod:`kvmfw.fork`), :meth:`Device.after_fork` runs in the child: the
default keeps everything; a device holding host resources applies its policy there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Protocol

from kvmfw.bus import PendingAccess
from kvmfw.debug import get_logger
from kvmfw.errors import CheckpointError, ConfigError
from kvmfw.eventq import EventQueue
from kvmfw.memory import GuestMemory
from kvmfw.record import Frozen, Record

log = get_logger("kvmfw.device")


class IrqLine(Protocol):
    """One interrupt line as a device sees it."""

    def raise_(self) -> None: ...

    def lower(self) -> None: ...

    def pulse(self) -> None: ...


class CallbackIrqLine:
    """An IRQ line that calls ``set_level(level)``, skipping calls that change nothing."""

    __slots__ = ("_set_level", "level", "raised_count")

    def __init__(self, set_level: Callable[[int], None]) -> None:
        self._set_level = set_level
        self.level = 0
        self.raised_count = 0

    def raise_(self) -> None:
        if not self.level:
            self.level = 1
            self.raised_count += 1
            self._set_level(1)

    def lower(self) -> None:
        if self.level:
            self.level = 0
            self._set_level(0)

    def pulse(self) -> None:
        self.raised_count += 1
        self._set_level(1)
        self._set_level(0)
        self.level = 0


class NullIrqLine(CallbackIrqLine):
    """An IRQ line that goes nowhere (for devices configured without an interrupt)."""

    def __init__(self) -> None:
        super().__init__(lambda level: None)


class Range(Frozen):
    """One address range of a device: ``space`` is ``"pio"`` or ``"mmio"``.

    ``handler`` (optional) is the object whose ``read``/``write`` serve this range, for a
    device with several ranges in one space that must tell them apart (e.g. a bound method
    pair wrapped in a small object); by default the device itself.
    """

    space: str
    base: int
    size: int
    name: str = ""
    handler: Any = None


class FirmwareNode(Frozen):
    """One device as firmware tables describe it (what :meth:`Device.firmware` returns).

    ``kind`` names the programming model (``"virtio-mmio"``, ``"uart-16550"``, ``"pl011"``,
    ``"fw-cfg"`` or a vendor's own); a table builder may treat kinds it knows specially
    (e.g. the console ``stdout-path``) and describes every other node generically:

    * ACPI (x86 DSDT): a ``Device`` under ``\\_SB_`` with ``_HID acpi_hid``, ``_UID`` and a
      ``_CRS`` of the window (``Memory32Fixed`` for ``mmio``, ``IO`` for ``pio``) and the
      interrupt; only nodes with an ``acpi_hid`` appear.
    * Device tree (ARMv8): a node ``{node_name or kind}@{base:x}`` with ``compatible``,
      ``reg`` and ``interrupts`` (SPI ``irq``, ``irq_trigger``); only ``mmio`` nodes with a
      ``compatible`` appear.

    ``irq`` is the platform interrupt input the device drives (-1: none). A table builder
    takes nodes through :func:`firmware_nodes`, which checks each one (:meth:`check`).
    """

    kind: str
    space: str
    base: int
    size: int
    irq: int = -1
    irq_trigger: str = "level"
    """``"level"`` (active high) or ``"edge"`` (rising)."""
    acpi_hid: str = ""
    compatible: tuple[str, ...] = ()
    node_name: str = ""
    dma_coherent: bool = False
    properties: tuple[tuple[str, int | str], ...] = ()
    """Extra device-tree properties: an int is one 32-bit cell, a str a string."""

    def check(self) -> None:
        """Raise :class:`~kvmfw.errors.ConfigError` if the node cannot be described."""
        if self.space not in ("pio", "mmio"):
            raise ConfigError(f"firmware node {self.kind}: space must be pio or mmio")
        if self.irq_trigger not in ("level", "edge"):
            raise ConfigError(f"firmware node {self.kind}: irq_trigger must be level or edge")
        if self.base < 0 or self.size <= 0:
            raise ConfigError(f"firmware node {self.kind}: bad window {self.base:#x}+{self.size}")


def firmware_nodes(devices: Iterable[Any]) -> list[FirmwareNode]:
    """What ``devices`` declare through :meth:`Device.firmware`, in order, each checked
    (a malformed node raises :class:`~kvmfw.errors.ConfigError` naming it). Table builders
    take nodes from here: never guessed from class or entry-point names, so a third-party
    device appears exactly as a built-in one."""
    out = []
    for d in devices:
        describe = getattr(d, "firmware", None)
        for node in describe() if callable(describe) else ():
            if not isinstance(node, FirmwareNode):
                raise ConfigError(f"device {type(d).__name__}: firmware() returned "
                                  f"{type(node).__name__}, not a FirmwareNode")
            node.check()
            out.append(node)
    return out


class DeviceContext(Record):
    """What the machine gives a device (and nothing more).

    - ``eventq``: the machine's :class:`~kvmfw.eventq.EventQueue` (simulated time);
    - ``irq(n)``: the line for interrupt input ``n`` of the platform's interrupt controller;
    - ``memory``: guest memory (:class:`~kvmfw.memory.GuestMemory`);
    - ``request_exit(status, reason)``: end the run after the current access;
    - ``console_output``: a binary file-like sink for console devices (None: the machine's
      default console); ``console_input``: its source;
    - ``options``: machine-wide options (memory size, CPU count, checkpoint directory, ...);
    - ``services``: named machine services a device may call (``dump_stats``,
      ``reset_stats``, ``kick``, ``ioeventfd``, ``coalesced`` and ``replay_coalesced``
      for KVM's coalesced ring, ...).
    """

    def __init__(self, eventq: EventQueue, irq: Callable[[int], IrqLine], memory: GuestMemory,
                 request_exit: Callable[[int, str], None], console_output: Any = None,
                 console_input: Any = None, options: dict[str, Any] | None = None,
                 services: dict[str, Callable[..., Any]] | None = None) -> None:
        self.eventq = eventq
        self.irq = irq
        self.memory = memory
        self.request_exit = request_exit
        self.console_output = console_output
        self.console_input = console_input
        self.options: dict[str, Any] = {} if options is None else options
        self.services: dict[str, Callable[..., Any]] = {} if services is None else services


class ConfigKey(Frozen):
    """One documented configuration key of a device."""

    type: Callable[[str], Any]
    default: Any
    help: str


def parse_int(text: str) -> int:
    """Integers in any base Python accepts (``0x3f8``, ``1016``, ``0o17``, ``0b1``)."""
    return int(str(text), 0)


def parse_bool(text: str) -> bool:
    t = str(text).lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


class Device:
    """Base class for devices; subclasses set ``name``, ``config`` and implement access."""

    name: ClassVar[str] = "device"
    config: ClassVar[dict[str, ConfigKey]] = {}
    """The documented configuration keys (``--device NAME,key=value``)."""

    def __init__(self, ctx: DeviceContext, **params: Any) -> None:
        self.ctx = ctx
        self.params = self.validate_params(params)
        self.stats: dict[str, int] = {"reads": 0, "writes": 0, "bad_accesses": 0}
        self.log = get_logger(f"kvmfw.device.{self.name}")

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults and convert values; unknown keys raise :class:`ConfigError`."""
        out: dict[str, Any] = {}
        for key in params:
            if key not in cls.config:
                known = ", ".join(sorted(cls.config)) or "none"
                raise ConfigError(f"device {cls.name}: unknown key {key!r} (known keys: {known})")
        for key, spec in cls.config.items():
            if key in params:
                value = params[key]
                try:
                    out[key] = spec.type(value) if isinstance(value, str) else value
                except (TypeError, ValueError) as exc:
                    raise ConfigError(
                        f"device {cls.name}: bad value {value!r} for {key}: {exc}") from None
            else:
                out[key] = spec.default
        return out

    def ranges(self) -> list[Range]:
        """The address ranges this device occupies."""
        return []

    def fast_ranges(self) -> list[Any]:
        """Registers answered without Python (:class:`kvmfw.fastpath.FastRange`: sinks,
        constant reads, coalescible writes), inside this device's ranges; none by default."""
        return []

    def read(self, offset: int, size: int) -> bytes:
        self.stats["bad_accesses"] += 1
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> PendingAccess | None:
        """Nothing, or a :class:`~kvmfw.bus.PendingAccess` completed later (MMIO only)."""
        self.stats["bad_accesses"] += 1
        return None

    def reset(self) -> None:
        """Return to the power-on state."""

    def save(self) -> dict[str, Any]:
        """Every guest-visible bit of state, as plain data (JSON-serialisable)."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Load a state produced by :meth:`save`."""

    def is_drained(self) -> bool:
        """True when no access or event is in flight (safe to checkpoint)."""
        return True

    def host_files(self) -> list[str]:
        """Host files whose contents the guest sees through this device and that a
        checkpoint names rather than copies (a disk image), as absolute paths.

        The checkpoint writer (machine drained) records each one's size and modification
        time; a restore refuses when one no longer matches, because the guest's RAM holds
        its view of the file (page cache, file system state) and a changed file would
        contradict it. Raise :class:`~kvmfw.errors.CheckpointError` when the file alone is
        not what the guest sees and :meth:`save_files` cannot hold the rest. The default:
        none."""
        return []

    def save_files(self, directory: str) -> None:
        """Write guest-visible state too large for :meth:`save`'s plain data (a disk's
        private overlay) as files in ``directory``, a new directory of the checkpoint
        being written (the machine drained). Names: up to 16 files of
        ``[a-z0-9][a-z0-9._-]{0,63}``; the checkpoint lists each with its size and
        sha256, and a restore verifies them before :meth:`load_files`. Leave the directory
        empty when there is nothing. The default writes nothing."""

    def load_files(self, directory: str) -> None:
        """Read back what :meth:`save_files` wrote, on the restored machine before its
        state is applied; ``directory`` holds exactly the files recorded (verified, but a
        file is as hostile as a guest: bound every length and count read from one, and
        raise :class:`~kvmfw.errors.CheckpointError`). Not called for a device that wrote
        none. The default accepts nothing: files it did not expect are refused."""
        names = sorted(os.listdir(directory))
        if names:
            raise CheckpointError(f"{self.name}: the checkpoint holds files for it "
                                  f"({', '.join(names)}) that this device does not read")

    def snapshot_take(self) -> Any:
        """An in-process snapshot (:meth:`Machine.snapshot <kvmfw.machine.Machine.snapshot>`)
        is being taken, the machine drained: return a handle to what
        :meth:`snapshot_reset` needs to put back guest-visible host state that
        :meth:`save` does not hold (a disk overlay's sectors), or None when there is none
        (the default). Every handle is released with :meth:`snapshot_release`."""
        return None

    def snapshot_reset(self, handle: Any) -> None:
        """``reset_to`` the snapshot :meth:`snapshot_take` gave ``handle`` for: put that
        host state back (called with the machine settled, before :meth:`restore`)."""

    def snapshot_release(self, handle: Any) -> None:
        """The snapshot of ``handle`` is closed: free what it holds."""

    def firmware(self) -> list[FirmwareNode]:
        """How this device appears in generated firmware tables; none by default."""
        return []

    def optional_irq(self, number: int) -> IrqLine:
        """The platform's interrupt input ``number``, or a line to nowhere if it is < 0
        (the convention for "irq=-1": no interrupt)."""
        return self.ctx.irq(number) if number >= 0 else NullIrqLine()

    def after_fork(self, child: int) -> None:
        """Called in a forked child (``child``: its pid, unique among live processes and
        known to the parent as ``fork()``'s result) before the child's machine runs.

        The device's guest-visible state is already the parent's; this is the place to
        decide what the child does with the host resources it inherited, which are
        otherwise shared with the parent: the policy of the built-in devices is console
        output to a per-child file (``<path>.<pid>``; a terminal stays shared), no console
        input (it stays with the parent), disk images copy-on-write in the child (its
        writes kept in the child's memory, never in the image), host files a guest writes
        to made per-child, listening or connected sockets closed. The default does
        nothing: a device without host resources needs nothing here."""

    def flush(self) -> None:
        """Write out host output the device holds back (a console's batched bytes); called
        when a run ends. The default does nothing."""

    def close(self) -> None:
        """Release host resources (files, sockets, terminal modes)."""


def split_options(text: str, what: str = "--device") -> list[tuple[str, str | None]]:
    """``a,key=value,...`` -> ``[("a", None), ("key", "value"), ...]``, with quoting.

    Fields are separated by commas and split at their first ``=``. A value (or key) may
    contain a comma, an ``=`` or surrounding spaces if it is quoted, ``file="a,b.img"`` or
    ``file='a,b.img'``, or if the character is escaped with a backslash, ``file=a\\,b.img``
    (``\\\\`` is a backslash, ``\\"`` a quote). Unquoted whitespace around fields, keys and
    values is dropped; empty fields are skipped. An unterminated quote or a trailing
    backslash is a :class:`ConfigError`.
    """
    fields: list[list[tuple[str, bool]]] = []
    cur: list[tuple[str, bool]] = []  # (character, protected by quoting or escaping)
    quote: str | None = None
    it = iter(text)
    for ch in it:
        if ch == "\\":
            nxt = next(it, None)
            if nxt is None:
                raise ConfigError(f"{what} {text}: trailing backslash (write \\\\ for one)")
            cur.append((nxt, True))
        elif quote is not None:
            if ch == quote:
                quote = None
            else:
                cur.append((ch, True))
        elif ch in "\"'":
            quote = ch
        elif ch == ",":
            fields.append(cur)
            cur = []
        else:
            cur.append((ch, False))
    if quote is not None:
        raise ConfigError(f"{what} {text}: unterminated {quote} quote")
    fields.append(cur)

    def strip(chars: list[tuple[str, bool]]) -> str:
        lo, hi = 0, len(chars)
        while lo < hi and not chars[lo][1] and chars[lo][0].isspace():
            lo += 1
        while hi > lo and not chars[hi - 1][1] and chars[hi - 1][0].isspace():
            hi -= 1
        return "".join(c for c, _ in chars[lo:hi])

    out: list[tuple[str, str | None]] = []
    for f in fields:
        eq = next((i for i, (c, protected) in enumerate(f) if c == "=" and not protected), None)
        if eq is None:
            if strip(f) or any(p for _, p in f):
                out.append((strip(f), None))
        else:
            out.append((strip(f[:eq]), strip(f[eq + 1:])))
    return out


def parse_device_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"uart16550,port=0x3f8,irq=4"`` -> ``("uart16550", {"port": "0x3f8", "irq": "4"})``.

    Values may be quoted or escaped to hold commas (``virtio-blk,file="disk,1.img"`` or
    ``file=disk\\,1.img``), as :func:`split_options` describes; dashes in keys become
    underscores."""
    parts = split_options(spec)
    if not parts:
        raise ConfigError("empty --device specification")
    (name, value), params = parts[0], {}
    if value is not None or not name:
        raise ConfigError(f"--device {spec}: the device name comes first (e.g. uart16550,...)")
    for k, v in parts[1:]:
        if v is None:
            raise ConfigError(f"--device {spec}: expected key=value, got {k!r} (quote a value "
                              f"that holds a comma: key=\"a,b\")")
        params[k.replace("-", "_")] = v
    return name, params
