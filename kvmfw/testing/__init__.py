"""Test helpers for kvmfw plugin authors (and kvmfw's own tests).

Two levels:

* **Register level, no KVM**: :class:`DeviceHarness` builds a device with a real
  :class:`~kvmfw.device.DeviceContext` (guest RAM, event queue, recording IRQ lines, a
  recorded exit, console output in a buffer) and drives it with ``read``/``write`` at
  offsets, running its events with :meth:`DeviceHarness.advance`.
* **Real guests on /dev/kvm**: :func:`assemble` builds a guest from source text with GNU
  as/ld, :func:`run_guest` boots it on a :class:`~kvmfw.Machine` and returns a
  :class:`GuestRun` (the result, what it printed, its exit counts and a :class:`Trace` of
  every port and MMIO access).

The pytest plugin (:mod:`kvmfw.testing.plugin`, entry point ``pytest11``, so it is active
wherever kvmfw is installed) turns these into fixtures: ``kvmfw_machine``,
``kvmfw_machine_factory``, ``kvmfw_assemble``, ``kvmfw_run_guest`` and ``kvmfw_device``;
the KVM ones skip, with the reason, where ``/dev/kvm`` is missing or unusable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmfw.api import Console
from kvmfw.bus import AddressSpace, PendingAccess
from kvmfw.device import Device, DeviceContext, parse_device_spec
from kvmfw.eventq import EventQueue
from kvmfw.machine import Machine, RunResult
from kvmfw.memory import GuestMemory, MemoryRegion
from kvmfw.plugins import host_arch

__all__ = ["Access", "DeviceHarness", "GuestRun", "RecordingIrq", "Trace", "assemble",
           "kvm_usable", "run_guest", "toolchain_missing", "trace"]

MiB = 1 << 20
TRACE_LIMIT = 100_000
"""Accesses a :class:`Trace` keeps (the first ones; ``dropped`` counts the rest)."""


def kvm_usable(path: str = "/dev/kvm") -> tuple[bool, str]:
    """``(True, "")`` if ``path`` can run guests, else ``(False, why)``."""
    if not os.path.exists(path):
        return False, f"{path} does not exist (no KVM on this host)"
    if not os.access(path, os.R_OK | os.W_OK):
        return False, f"{path} is not readable and writable by this user (join its group)"
    try:
        from kvmfw.kvm import Kvm

        Kvm(path).close()
    except Exception as exc:
        return False, f"{path} cannot be opened by kvmfw: {exc}"
    return True, ""


# --- assembling guests -----------------------------------------------------------------

_LD_SCRIPT = """ENTRY(_start)
SECTIONS {
    . = 0x100000;
    .text : { *(.multiboot) *(.text*) }
    .rodata : { *(.rodata*) }
    .data : { *(.data*) }
    .bss : { *(.bss*) *(COMMON) }
    /DISCARD/ : { *(.note*) *(.comment) *(.eh_frame) }
}
"""
FLAT_LOAD_ADDR = 0x7C00

_TOOLS: dict[tuple[str, int], tuple[list[str], list[str]]] = {
    # (arch, bits): (as arguments, ld arguments)
    ("x86", 16): (["--32"], ["-m", "elf_i386"]),
    ("x86", 32): (["--32"], ["-m", "elf_i386"]),
    ("x86", 64): (["--64"], ["-m", "elf_x86_64"]),
    ("armv8", 64): ([], []),
}


def toolchain_missing(arch: str | None = None) -> str | None:
    """Why :func:`assemble` cannot build guests for ``arch`` here, or None if it can."""
    arch = arch or host_arch()
    if arch != host_arch():
        return f"assembling {arch} guests needs the host to be {arch} (this is {host_arch()})"
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            return f"GNU {tool} is not installed (binutils)"
    return None


def assemble(source: str, *, out_dir: str | os.PathLike[str] | None = None,
             name: str = "guest", arch: str | None = None, bits: int = 32,
             include: list[str | os.PathLike[str]] | None = None) -> Path:
    """Assemble and link a guest from GNU as ``source`` text; returns the image path.

    x86: ``bits`` 32 (an ELF32 at 1 MiB, entered in flat protected mode), 64 (an ELF64,
    entered in long mode with the first 4 GiB identity-mapped) or 16 (a flat binary for
    ``load_addr=0x7c00``, entered in real mode). The entry point is ``_start``.
    armv8: an ELF64 at 1 MiB (an arm64 host). Raises ``RuntimeError`` with the assembler's
    message if the source does not build.
    """
    arch = arch or host_arch()
    try:
        as_args, ld_args = _TOOLS[(arch, bits)]
    except KeyError:
        raise ValueError(f"cannot assemble {bits}-bit guests for {arch!r}") from None
    missing = toolchain_missing(arch)
    if missing:
        raise RuntimeError(missing)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="kvmfw-"))
    src, obj, script = out / f"{name}.S", out / f"{name}.o", out / f"{name}.ld"
    src.write_text(source if bits != 16 else ".code16\n" + source)
    script.write_text(_LD_SCRIPT)
    inc = [a for d in include or [] for a in ("-I", os.fspath(d))]
    _tool(["as", *as_args, *inc, "-o", str(obj), str(src)])
    if bits == 16:
        image = out / f"{name}.bin"
        _tool(["ld", *ld_args, f"-Ttext={FLAT_LOAD_ADDR:#x}", "--oformat", "binary",
               "-o", str(image), str(obj)])
    else:
        image = out / f"{name}.elf"
        _tool(["ld", *ld_args, "-T", str(script), "-nostdlib", "--build-id=none",
               *(["--no-warn-rwx-segments"] if _ld_knows_rwx() else []),
               "-o", str(image), str(obj)])
    return image


def _tool(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:1])} failed:\n{r.stderr.strip()}")


_rwx: list[bool] = []


def _ld_knows_rwx() -> bool:
    if not _rwx:
        r = subprocess.run(["ld", "--help"], capture_output=True, text=True, check=False)
        _rwx.append("--no-warn-rwx-segments" in r.stdout)
    return _rwx[0]


# --- tracing port and MMIO accesses -----------------------------------------------------

@dataclass(frozen=True)
class Access:
    """One bus access: ``space`` (``pio``/``mmio``), guest ``addr``, ``size``, ``write``,
    ``data`` (written, or read back; empty for a pending read) and ``device`` (the mapping's
    name; None for an access no device claims)."""

    space: str
    addr: int
    size: int
    write: bool
    data: bytes
    device: str | None

    @property
    def value(self) -> int:
        return int.from_bytes(self.data, "little")


@dataclass
class Trace:
    """Every port and MMIO access of a machine since :func:`trace` (the first
    :data:`TRACE_LIMIT`)."""

    accesses: list[Access] = field(default_factory=list)
    dropped: int = 0

    def add(self, a: Access) -> None:
        if len(self.accesses) < TRACE_LIMIT:
            self.accesses.append(a)
        else:
            self.dropped += 1

    def writes(self, space: str | None = None, addr: int | None = None) -> list[Access]:
        return [a for a in self.accesses if a.write and (space is None or a.space == space)
                and (addr is None or a.addr == addr)]

    def reads(self, space: str | None = None, addr: int | None = None) -> list[Access]:
        return [a for a in self.accesses if not a.write
                and (space is None or a.space == space) and (addr is None or a.addr == addr)]

    @property
    def pio(self) -> list[Access]:
        return [a for a in self.accesses if a.space == "pio"]

    @property
    def mmio(self) -> list[Access]:
        return [a for a in self.accesses if a.space == "mmio"]


class _Traced:
    """A bus device that records each access and passes it on."""

    def __init__(self, inner: Any, space: str, base: int, name: str, out: Trace) -> None:
        self.inner, self.space, self.base, self.name, self.out = inner, space, base, name, out

    def read(self, offset: int, size: int) -> Any:
        data = self.inner.read(offset, size)
        got = b"" if isinstance(data, PendingAccess) else bytes(data)
        self.out.add(Access(self.space, self.base + offset, size, False, got, self.name))
        return data

    def write(self, offset: int, data: bytes) -> Any:
        self.out.add(Access(self.space, self.base + offset, len(data), True, bytes(data),
                            self.name))
        return self.inner.write(offset, data)


def trace(machine: Machine) -> Trace:
    """Record every port and MMIO access of ``machine`` from now on (devices mapped so far,
    and accesses nobody claims). For tests: it costs a call per access, and it switches
    the compiled exit path off (:mod:`kvmfw.fastpath`), so every access reaches Python."""
    out = Trace()
    for cpu in machine.cpus:  # exits the compiled path answers never reach Python
        cpu.set_fastpath(False)
    for space in (machine.bus.pio, machine.bus.mmio):
        for m in space.mappings():
            space.unregister(m.base)
            space.register(m.base, m.size, _Traced(m.device, space.name, m.base, m.name, out),
                           m.name)
        _trace_unclaimed(space, out)
    return out


def _trace_unclaimed(space: AddressSpace, out: Trace) -> None:
    inner = space._unclaimed  # the bus's policy (ignore/fatal) still answers

    def unclaimed(addr: int, size: int, data: bytes | None) -> bytes:
        answer = inner(addr, size, data)
        out.add(Access(space.name, addr, size, data is not None,
                       bytes(data) if data is not None else bytes(answer), None))
        return answer

    space._unclaimed = unclaimed  # type: ignore[method-assign]


# --- running guests ---------------------------------------------------------------------

@dataclass
class GuestRun:
    """What :func:`run_guest` saw: ``result`` (a :class:`~kvmfw.RunResult`), ``console``
    (text), ``exits`` (the vCPUs' exit counters summed: ``vm_exits``, ``io``, ``mmio``,
    ``halt``, ...), ``trace`` (every port and MMIO access) and the closed ``machine``."""

    result: RunResult
    console: str
    exits: dict[str, int]
    trace: Trace
    machine: Machine

    @property
    def status(self) -> int:
        return self.result.status


def exit_counts(machine: Machine) -> dict[str, int]:
    """The vCPUs' integer counters, summed over vCPUs."""
    out: dict[str, int] = {}
    for cpu in machine.cpus:
        for k, v in cpu.stats.as_dict().items():
            if isinstance(v, int) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    return out


def run_guest(image: str | os.PathLike[str], *, devices: list[str] | None = None,
              timeout: float = 30, until: Any = None, load: dict[str, Any] | None = None,
              setup: Callable[[Machine], None] | None = None, **machine: Any) -> GuestRun:
    """Boot ``image`` on a fresh machine (keywords as :class:`~kvmfw.Machine`'s; no default
    board unless ``default_devices=True``), run it to its end and close it. ``load``:
    extra loader options (``load_addr``, ``cmdline``, ...); ``setup(machine)`` runs before
    the guest (map a test device, set registers). A timeout raises
    :class:`~kvmfw.errors.RunTimeoutError`."""
    machine.setdefault("memory", "64M")
    machine.setdefault("default_devices", False)
    with Machine(devices=list(devices or []), **machine) as m:
        if setup is not None:
            setup(m)
        t = trace(m)
        m.load(image, **(load or {}))
        result = m.run(timeout=timeout, until=until)
        return GuestRun(result, m.console.text, exit_counts(m), t, m)


# --- devices at register level, without KVM --------------------------------------------

class RecordingIrq:
    """An IRQ line that remembers its level and every transition."""

    def __init__(self) -> None:
        self.level = 0
        self.history: list[int] = []
        self.pulses = 0

    def raise_(self) -> None:
        self.level = 1
        self.history.append(1)

    def lower(self) -> None:
        self.level = 0
        self.history.append(0)

    def pulse(self) -> None:
        self.pulses += 1
        self.history += [1, 0]


class DeviceHarness:
    """One device on a bench: guest RAM (``ram`` bytes at 0), an event queue, recording
    IRQ lines (:meth:`irq`), recorded exits (``exits``), console output in ``console``
    and recorded service calls (``services_called``). ``read``/``write`` address the
    device's first range (or ``space``/``base`` given) by offset."""

    def __init__(self, device: type[Device] | str, *, ram: int = MiB,
                 options: dict[str, Any] | None = None, **params: Any) -> None:
        if isinstance(device, str):
            name, spec_params = parse_device_spec(device)
            from kvmfw.plugins import DeviceRegistry

            device = DeviceRegistry.from_entry_points().get(name)
            params = {**spec_params, **params}
        self.irqs: dict[int, RecordingIrq] = {}
        self.exits: list[tuple[int, str]] = []
        self.services_called: list[tuple[str, tuple[Any, ...]]] = []
        self.console = Console()
        self.memory = GuestMemory()
        self.memory.add(MemoryRegion.anonymous(0, ram))
        self.eventq = EventQueue()

        def service(name: str) -> Callable[..., None]:
            def call(*args: Any) -> None:
                self.services_called.append((name, args))
            return call

        self.ctx = DeviceContext(
            eventq=self.eventq, irq=self.irq, memory=self.memory,
            request_exit=lambda status, reason: self.exits.append((status, reason)),
            console_output=self.console,
            options={"memory": ram, "cpus": 1, **(options or {})},
            services={n: service(n) for n in ("dump_stats", "reset_stats", "checkpoint",
                                                "work_begin", "work_end", "kick", "reset")})
        self.device: Any = device(self.ctx, **params)

    def irq(self, number: int) -> RecordingIrq:
        return self.irqs.setdefault(number, RecordingIrq())

    def _range(self, space: str | None) -> tuple[str, int]:
        for r in self.device.ranges():
            if space is None or r.space == space:
                return r.space, r.base
        raise ValueError(f"device {self.device.name} has no {space or ''} range")

    def read(self, offset: int, size: int = 1) -> int:
        """Read ``size`` bytes at ``offset``; returns the little-endian value."""
        data = self.device.read(offset, size)
        if isinstance(data, PendingAccess):
            raise AssertionError("the device deferred the read (use read_raw)")
        assert len(data) == size, f"the device answered {len(data)} bytes, not {size}"
        return int.from_bytes(data, "little")

    def read_raw(self, offset: int, size: int) -> Any:
        return self.device.read(offset, size)

    def write(self, offset: int, value: int | bytes, size: int = 1) -> Any:
        """Write ``value`` (an int as ``size`` little-endian bytes, or bytes) at ``offset``."""
        data = value if isinstance(value, bytes | bytearray) else \
            int(value).to_bytes(size, "little")
        return self.device.write(offset, bytes(data))

    def advance(self, ticks: int) -> int:
        """Run the device's events due within ``ticks`` of simulated time; returns how many
        ran."""
        end = self.eventq.cur_tick + ticks
        n = 0
        while (nxt := self.eventq.next_tick()) is not None and nxt <= end:
            self.eventq.service_one()
            n += 1
        self.eventq.cur_tick = max(self.eventq.cur_tick, end)
        return n

    @property
    def output(self) -> bytes:
        """What the device printed on the console."""
        return self.console.data

    def close(self) -> None:
        self.device.close()

    def __enter__(self) -> DeviceHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
