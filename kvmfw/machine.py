"""``Machine``: a VM with its memory, vCPUs, bus, devices, event queue and plugins.

Build order (and why): load the arch plugin -> open ``/dev/kvm`` and create the VM ->
install guest RAM (``memory_layout`` hook) -> ``machine_configure`` (VM-wide devices such
as an in-kernel irqchip must exist before vCPUs) -> create vCPUs and their ``KvmCPU`` run
loops (``vcpu_init``, thread context) -> devices (bus ranges, IRQ lines) ->
``machine_created``. :meth:`Machine.run` then services the event queue until the guest
or a device ends the run, the tick limit is reached, or the host timeout fires.

Time. Which clock each part follows:

* simulated time (``eventq.cur_tick``: events, device timers scheduled on the queue, the
  tick limit, ``sim_seconds``): host ``CLOCK_MONOTONIC`` x ``host_factor`` since the run
  (or drain) began, service time included; frozen between runs. An idle machine waits for
  its next event in host time (no fast-forward: the guest's own clocks would not see it).
* in-kernel LAPIC timer, PIT, kvmclock, the TSC: host time (the kernel's clocks); they also
  run between runs.
* RTC (``cmos-rtc``) and ACPI PM timer: host time with ``clock=host`` (the default), else
  simulated time (``clock=fixed``).

The bound (with ``host_factor`` 1; otherwise scale host time by it): simulated time never
runs ahead of host time, and at every KVM exit it catches up with it exactly, except that
it stops at an event that is due until that event has been serviced. A device therefore
sees simulated time behind the guest's clocks by at most the time since the current exit
(its own service) plus the service of the events due now. The run timer ends a slice at
the host instant that maps to the bounding event, computed from the run's fixed base, so
it is armed once per event (``timer_settime`` in the vCPU stats).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvmfw.abi import Cap
from kvmfw.api import Console, RunEnd
from kvmfw.bus import Bus
from kvmfw.config import check_host_factor, check_machine_config, parse_size
from kvmfw.cpu import KvmCPU
from kvmfw.debug import get_logger
from kvmfw.device import (
    CallbackIrqLine,
    Device,
    DeviceContext,
    IrqLine,
    NullIrqLine,
    Range,
    parse_device_spec,
)
from kvmfw.errors import ConfigError, KvmfwError, PluginError, RunTimeoutError, StateError
from kvmfw.eventq import PRIO_EXIT, TICKS_PER_SECOND, Event, EventQueue
from kvmfw.hookspecs import SyncLevel
from kvmfw.kvm import Kvm
from kvmfw.memory import GuestMemory
from kvmfw.plugins import (
    BoundHooks,
    DeviceRegistry,
    board_devices,
    check_api,
    check_device_hooks,
    load_arch,
    make_plugin_manager,
)
from kvmfw.record import Frozen, Record
from kvmfw.stats import StatsRegistry
from kvmfw.timer import CycleSource, select_cycle_source
from kvmfw.vm import VM

if TYPE_CHECKING:
    from pathlib import Path

    from kvmfw.dirty import DirtyTracker
    from kvmfw.gdb import GdbServer
    from kvmfw.snapshot import Snapshot

log = get_logger("kvmfw.cpu")

MiB = 1 << 20
STOP_GRACE = 5.0
"""Seconds a stop (timeout, guest exit) may take before kvmfw reports a stuck thread."""


def _where(thread: threading.Thread) -> str:
    """Where ``thread`` is: its innermost frame outside Python's standard library (the
    device or hook that blocks), as ``file:line in function``."""
    import sysconfig  # (only for this report: not at start-up)

    frame = sys._current_frames().get(thread.ident or -1)
    stdlib = sysconfig.get_paths()["stdlib"]
    inner = frame
    while frame is not None and frame.f_code.co_filename.startswith(stdlib):
        frame = frame.f_back
    frame = frame or inner
    if frame is None:
        return "no frame"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def _die_stuck(what: str) -> None:
    """Last resort of a hard timeout: say where every thread is, then exit with 124."""
    lines = [f"kvmfw: error: {what}; threads:"]
    for t in threading.enumerate():
        lines.append(f"  {t.name}: {_where(t)}")
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()
    os._exit(124)


class MachineConfig(Record):
    """Everything a machine is built from (the CLI and TOML config fill this in).

    ``devices``: device specs added to the board (``name,key=value,...``);
    ``default_devices``: start from the arch's default board (``default_devices`` hook),
    False: an empty board; ``options``: arch and device options (``irqchip``, ``console``,
    ``cmdline``, ...). :meth:`~kvmfw.record.Record.replace` gives a changed copy.
    """

    def __init__(self, arch: str | None = None, memory: int = 256 * MiB, cpus: int = 1,
                 devices: list[str] | None = None, default_devices: bool = True,
                 unclaimed: str = "ignore", always_sync: bool = False,
                 host_factor: float = 1.0, host_frequency_hz: float = 2e9,
                 use_perf: bool = True, use_coalesced_mmio: bool = False,
                 kvm_path: str = "/dev/kvm", options: dict[str, Any] | None = None) -> None:
        self.arch = arch
        self.memory = memory
        self.cpus = cpus
        self.devices: list[str] = [] if devices is None else devices
        self.default_devices = default_devices
        self.unclaimed = unclaimed
        self.always_sync = always_sync
        self.host_factor = host_factor
        self.host_frequency_hz = host_frequency_hz
        self.use_perf = use_perf
        self.use_coalesced_mmio = use_coalesced_mmio
        self.kvm_path = kvm_path
        self.options: dict[str, Any] = {} if options is None else options

    @classmethod
    def from_run(cls, cfg: dict[str, Any], arch: str, options: dict[str, Any]) -> MachineConfig:
        """The machine of checked ``kvmfw run`` keys (:func:`kvmfw.config.check_run_config`;
        the CLI and sweep tasks build theirs here)."""
        return cls(arch=arch, memory=cfg.get("memory", 256 * MiB), cpus=cfg.get("cpus", 1),
                   devices=list(cfg.get("device", [])),
                   default_devices=not cfg.get("no_default_devices", False),
                   unclaimed=cfg.get("unclaimed", "ignore"),
                   always_sync=bool(cfg.get("always_sync", False)),
                   host_factor=cfg.get("host_factor", 1.0), options=options)


class RunResult(Frozen):
    """How a run ended: ``end`` (why, a :class:`~kvmfw.api.RunEnd`), ``status`` (the
    guest's exit status: pseudo-op ``exit(n)``, debug-exit ``(v << 1) | 1``, 0 for a
    power-off, a halt, a tick limit or ``until``), ``reason`` (one line for people),
    ``ticks`` (simulated time at the end), ``host_seconds`` (this run's host time) and
    ``console`` (everything the guest printed, so far, on this machine)."""

    status: int
    reason: str
    ticks: int
    host_seconds: float
    end: RunEnd = RunEnd.GUEST
    console: str = ""

    @property
    def sim_seconds(self) -> float:
        return self.ticks / TICKS_PER_SECOND

    @property
    def seconds(self) -> float:
        """Host seconds the run took (``host_seconds``)."""
        return self.host_seconds

    @property
    def ok(self) -> bool:
        """True if the run ended with status 0."""
        return self.status == 0


UNTIL_POLL_TICKS = TICKS_PER_SECOND // 1000
"""How often (simulated time: 1 ms) a callable ``until`` is asked."""


class Machine:
    """A runnable guest machine; use as a context manager or call :meth:`close`.

    Build it from keywords (``Machine(arch="x86", memory="256M", cpus=1,
    devices=["debug-exit"])``: ``memory`` in bytes or as ``"64M"``/``"1G"``; ``devices``
    are added to the arch's default board unless ``default_devices=False``; ``options`` are
    the arch and device options of ``--option``; ``console`` a binary stream that also gets
    what the guest prints) or from a :class:`MachineConfig` (what the CLI builds); not both.
    """

    def __init__(self, config: MachineConfig | None = None, *, arch: str | None = None,
                 memory: int | str | None = None, cpus: int | None = None,
                 devices: list[str] | None = None, default_devices: bool | None = None,
                 options: dict[str, Any] | None = None, console: Any = None,
                 arch_plugin: Any = None, arch_name: str | None = None,
                 device_registry: DeviceRegistry | None = None,
                 kvm: Kvm | None = None, cpu_model: dict[str, Any] | None = None) -> None:
        cfg = _config_from(config, arch=arch, memory=memory, cpus=cpus, devices=devices,
                           default_devices=default_devices, options=options)
        # what the guest prints is kept (bounded) and passed on to the sink the caller gave
        sink = cfg.options.get("console_output", console)
        self.console = sink if isinstance(sink, Console) else Console(tee=sink)
        """What the guest printed (:class:`~kvmfw.api.Console`: ``.text``, ``.data``)."""
        self.config = cfg = cfg.replace(options={**cfg.options, "console_output": self.console})
        if cfg.cpus < 1:
            raise ConfigError("a machine needs at least one vCPU (--cpus >= 1)")
        self.cpu_model = cpu_model
        """The CPU the vCPUs are to get instead of this host's (a checkpoint's ``cpu_model``,
        given by restore; None: this host's). The arch applies it when it creates the vCPUs
        and refuses one this host's KVM cannot give (see the ``cpu_model`` hook)."""
        self.eventq = EventQueue()
        self.lock = self.eventq.lock
        """Held while devices, the bus or the event queue are used from a vCPU thread."""
        self._thread_error: BaseException | None = None
        self._main_wake = threading.Event()
        check_host_factor(cfg.host_factor)  # the clock below divides by it
        self._clock: tuple[int, int, float] = (time.monotonic_ns(), 0, 1000.0 * cfg.host_factor)
        """(host ns, tick) at which the current run (or drain) began, and simulated ticks per
        host ns: see "Time" in the module docstring."""
        self.bus = Bus(cfg.unclaimed)
        self.stats = StatsRegistry()
        self.cpus: list[KvmCPU] = []
        self.devices: list[Device] = []
        self.stop_requested = False
        self.exit_status = 0
        self.exit_reason = ""
        self._irq_lines: dict[int, IrqLine] = {}
        self.stats_dumps: list[dict[str, dict[str, Any]]] = []
        """Every dump taken during the run (guest pseudo-ops, the CLI's final one)."""
        self.checkpoints_taken: list[Path] = []
        """Checkpoint directories written by :meth:`checkpoint` or on request, in order."""
        self.checkpoints_refused: list[str] = []
        """Requested checkpoints not written, one reason each (:attr:`checkpoint_limit`,
        :attr:`checkpoint_min_free`)."""
        self.forks = 0
        """Children :meth:`fork` made of this machine in this process."""
        self.work_items: dict[tuple[int, int], int] = {}
        self._work = {"work_items_begun": 0, "work_items_ended": 0, "work_ticks": 0}
        self.arch_state: Any = None
        """A slot for the arch plugin's per-machine state (interrupt model, tables, ...)."""
        self.gdb: GdbServer | None = None
        """The attached GDB server (:meth:`start_gdb`); the exit table routes debug exits
        to it. None: a debug exit ends the run with an error, as any unexpected exit."""
        self._closed = False
        self._owns_kvm = kvm is None
        self.kvm: Kvm | None = None
        self.vm: VM | None = None
        # plugins
        if arch_plugin is None:
            self.arch, arch_plugin = load_arch(arch_name or cfg.arch)
        else:
            check_api(arch_name or "arch", arch_plugin)
            self.arch = arch_name or cfg.arch or "custom"
        self.pm = make_plugin_manager()
        try:
            self.pm.register(arch_plugin, name=f"arch:{self.arch}")
            self.pm.check_pending()
        except Exception as exc:
            raise PluginError(f"architecture plugin {self.arch!r} does not match the hook "
                              f"contract: {exc}") from exc
        self.hooks = BoundHooks(self.pm)
        self.registry = device_registry
        try:
            self.kvm = kvm or Kvm(cfg.kvm_path)
            check_machine_config(cfg, self.kvm, self.arch, arch_plugin)  # before the VM
            self.vm = self.kvm.create_vm()
            self.vm.on_coalesced_zone = self._coalesced_zone_added
            self._build()
        except BaseException:
            self.close()
            raise

    # --- building ------------------------------------------------------------------------

    def _build(self) -> None:
        cfg = self.config
        assert self.vm is not None
        layout = self.hooks.call("memory_layout", machine=self, size=cfg.memory) or [
            (0, cfg.memory, "ram")]
        for gpa, size, name in layout:
            self.vm.add_ram(gpa, size, name)
        self.hooks.call("machine_configure", machine=self)
        for _ in range(cfg.cpus):
            vcpu = self.vm.create_vcpu()
            cpu = KvmCPU(self, vcpu, self.hooks, always_sync=cfg.always_sync,
                         host_factor=cfg.host_factor, use_coalesced_mmio=cfg.use_coalesced_mmio)
            self.cpus.append(cpu)
            cpu.startup()
            self.stats.add(f"system.cpu{cpu.id}", cpu.stats_dict, cpu.reset_stats)
        self.stats.add("system", self._system_stats, None)
        self.stats.add("system.bus", self._bus_stats, self._reset_bus_stats)
        self.stats.add("system.work", lambda: dict(self._work), self._reset_work_stats)
        specs = self.default_board() if cfg.default_devices else []
        specs += cfg.devices
        for spec in specs:
            self.add_device_spec(spec)
        self.pm.hook.machine_created.call_historic(kwargs={"machine": self})

    def default_board(self) -> list[str]:
        """The device specs of the default board: the board the ``board`` option names
        (a ``kvmfw.boards`` entry point, from any package); else the arch's
        ``default_devices`` hook; else the board named after the arch, if one is
        installed; else none."""
        name = self.config.options.get("board")
        if name:
            return board_devices(str(name), self)
        return self.arch_board()

    def arch_board(self) -> list[str]:
        """The arch's own default board (what its embedded guest expects): its
        ``default_devices`` hook, else the ``kvmfw.boards`` entry point named after it."""
        specs = self.hooks.call("default_devices", machine=self)
        if specs is not None:
            return list(specs)
        return board_devices(self.arch, self, missing_ok=True)

    def _coalesced_zone_added(self) -> None:
        # writes to a zone wait in the VM's ring until someone replays them: every vCPU
        # drains it from now on, whatever ``use_coalesced_mmio`` said
        for cpu in self.cpus:
            cpu.use_coalesced_mmio = bool(cpu.vcpu.coalesced_ring_offset)

    @property
    def memory(self) -> GuestMemory:
        """Guest RAM."""
        assert self.vm is not None
        return self.vm.memory

    def dirty_tracker(self) -> DirtyTracker:
        """A new, independent subscriber to the pages dirtied from now on (the guest's
        through KVM's log, kvmfw's through ``GuestMemory.mark_dirty``); see
        :mod:`kvmfw.dirty`. Close it when done: the last one switches KVM's logging off."""
        from kvmfw.dirty import DirtyTracker

        if self._closed or self.vm is None:
            raise KvmfwError("this machine is closed")
        return DirtyTracker(self.vm)

    def snapshot(self) -> Snapshot:
        """Drain the machine and keep its state and RAM in this process, for
        :meth:`reset_to` (fuzzers, sweeps); see :mod:`kvmfw.snapshot`."""
        from kvmfw.snapshot import take

        return take(self)

    def reset_to(self, snap: Snapshot) -> int:
        """Put the machine back to ``snap``: CPU, irqchip, device and time state, and the
        pages dirtied since copied back; returns their number. See :mod:`kvmfw.snapshot`."""
        from kvmfw.snapshot import reset_to

        if self._closed:
            raise KvmfwError("this machine is closed")
        return reset_to(self, snap)

    def fork(self) -> int:
        """Drain and fork the process like :func:`os.fork` (child pid in the parent, 0 in
        the child); the child's machine runs on its own VM from the same state, guest RAM
        shared copy-on-write. See :mod:`kvmfw.fork`."""
        from kvmfw.fork import fork

        return fork(self)

    def fork_variants(self, values: Any, fn: Any, *,
                      max_parallel: int | None = None) -> list[Any]:
        """Fork one child per value, each running ``fn(machine, value)``; returns their
        :class:`kvmfw.fork.VariantResult` list. See :func:`kvmfw.fork.run_variants`."""
        from kvmfw.fork import run_variants

        return run_variants(self, values, fn, max_parallel=max_parallel)

    def irq(self, number: int) -> IrqLine:
        """The IRQ line for platform interrupt input ``number`` (arch hook, else KVM_IRQ_LINE
        on an in-kernel irqchip, else a line that goes nowhere)."""
        line = self._irq_lines.get(number)
        if line is None:
            line = self.hooks.call("irq_line", machine=self, number=number)
            if line is None:
                vm = self.vm
                if vm is not None and vm.irqchip_in_kernel:
                    line = CallbackIrqLine(lambda level: vm.set_irq_line(number, level))
                else:
                    line = NullIrqLine()
            self._irq_lines[number] = line
        return line

    def device_context(self) -> DeviceContext:
        return DeviceContext(
            eventq=self.eventq, irq=self.irq, memory=self.memory,
            request_exit=self.request_exit,
            console_output=self.config.options.get("console_output"),
            console_input=self.config.options.get("console_input"),
            options={"memory": self.config.memory, "cpus": self.config.cpus,
                     **self.config.options},
            services={"dump_stats": self.dump_stats, "reset_stats": self.stats.reset,
                      "work_begin": self.work_begin, "work_end": self.work_end,
                      "kick": self.kick_all, "reset": self.request_reset,
                      "checkpoint": self.request_checkpoint,
                      "ioeventfd": self._ioeventfd, "coalesced": self._coalesced,
                      "replay_coalesced": self.replay_coalesced})

    def _ioeventfd(self, fd: int, addr: int, length: int, **kw: Any) -> bool:
        """Device service: ``VM.ioeventfd`` (``deassign=True`` undoes it); False where KVM
        has none (the device keeps taking the exit)."""
        vm = self.vm
        if vm is None or vm.fd < 0 or not vm.check_extension(Cap.IOEVENTFD):
            return False
        vm.ioeventfd(fd, addr, length, **kw)
        return True

    def _coalesced(self, addr: int, size: int, pio: bool = False, *,
                   deassign: bool = False) -> bool:
        """Device service: queue writes to a range in the coalesced ring (replayed before
        the next exit is serviced); False where KVM has no such ring for ``pio``. The
        device's contract: a write it lets wait there changes nothing the compiled path
        answers (its live constants), since C goes on answering reads while writes wait.
        ``deassign=True``: writes to the range exit again (those already in the ring are
        still replayed before the next exit is serviced; :meth:`replay_coalesced` first
        delivers them now)."""
        vm = self.vm
        if vm is None or vm.fd < 0:
            return False
        if deassign:
            if (addr, size, pio) not in vm.coalesced_zones:
                return False
            vm.unregister_coalesced_mmio(addr, size, pio)
            return True
        if not vm.check_extension(Cap.COALESCED_PIO if pio else Cap.COALESCED_MMIO):
            return False
        vm.register_coalesced_mmio(addr, size, pio)
        return True

    def replay_coalesced(self) -> None:
        """Deliver the writes waiting in the VM's coalesced ring now, in order, to their
        devices (the run loop does it before it services each exit; a device whose posted
        writes must not wait that long, a console's output, calls it from an event).
        Takes the machine lock; any thread."""
        for cpu in self.cpus:
            if cpu.use_coalesced_mmio:
                cpu._drain_coalesced_mmio()  # the ring is VM-wide: one vCPU's view is enough
                return

    def add_device_spec(self, spec: str) -> Device:
        """Create a device from ``name,key=value,...`` and attach it."""
        name, params = parse_device_spec(spec)
        if self.registry is None:
            self.registry = DeviceRegistry.from_entry_points()
            self.hooks.call("register_devices", registry=self.registry)
        cls = self.registry.get(name)
        return self.add_device(cls(self.device_context(), **params))

    def add_device(self, device: Device) -> Device:
        """Attach a device instance: map its ranges on the bus, register its hooks."""
        label = f"dev:{device.name}:{len(self.devices) + 1}"
        check_device_hooks(device, label)  # before anything is mapped: a refusal leaves no trace
        for r in device.ranges():
            self.bus.space(r.space).register(r.base, r.size, r.handler or device,
                                             r.name or device.name)
        for fr in device.fast_ranges():  # the compiled exit path (kvmfw.fastpath)
            self.bus.space(fr.space).add_fast(fr)
        self.devices.append(device)
        self.pm.register(device, name=label)
        for cpu in self.cpus:  # a device's pre_run/post_run take part from the next entry
            cpu.bind_hooks()
        # "system.uart16550_0": the device's name, then its index on the board
        self.stats.add(f"system.{device.name}_{len(self.devices) - 1}",
                       functools.partial(_device_stats, device), None)
        return device

    def load_guest(self, image: str, **options: Any) -> None:
        """Load a guest image through the arch plugin (``load_guest`` hook) and set the boot
        CPU's entry state; ``options`` as the hook documents (``load_addr``, ``cmdline``,
        ``initrd``, ...). Raises :class:`~kvmfw.errors.ImageError` if no plugin takes it."""
        from kvmfw.errors import ImageError

        merged = {**self.config.options, **options}
        if not self.hooks.call("load_guest", machine=self, image=str(image), options=merged):
            raise ImageError(f"{image}: the {self.arch} plugin does not recognise this image "
                             "format (give load_addr to load a flat binary)")

    def load(self, kernel: str | os.PathLike[str] | None = None, *,
             initrd: str | os.PathLike[str] | None = None, cmdline: str | None = None,
             **options: Any) -> None:
        """Load a guest: ``kernel`` (an ELF, multiboot, bzImage or arm64 Image, or a flat
        binary with ``load_addr=``), an optional ``initrd`` and kernel ``cmdline``; no
        ``kernel``: the arch's embedded default guest (what ``kvmfw run`` runs). Raises
        :class:`~kvmfw.errors.ImageError` for a missing, unreadable or unknown image."""
        from kvmfw.errors import ImageError

        if kernel is None:
            kernel = self.hooks.call("default_guest", machine=self)
            if kernel is None:
                raise ImageError(f"the {self.arch} plugin has no default guest: give a kernel")
        if initrd is not None:
            options["initrd"] = os.fspath(initrd)
        if cmdline is not None:
            options["cmdline"] = cmdline
        path = os.fspath(kernel)
        if not os.path.isfile(path):
            raise ImageError(f"{path}: no such file (give the path of a guest image)")
        self.load_guest(path, **options)

    def map_device(self, range_: Range, device: Any) -> None:
        """Map any object with ``read``/``write`` on the bus (test devices, glue)."""
        self.bus.space(range_.space).register(range_.base, range_.size, device, range_.name)

    # --- stats ---------------------------------------------------------------------------

    def _system_stats(self) -> dict[str, Any]:
        return {"sim_ticks": self.eventq.cur_tick,
                "sim_seconds": self.eventq.cur_tick / TICKS_PER_SECOND,
                "host_seconds": getattr(self, "_host_seconds", 0.0)}

    def _fold_cpus(self) -> None:
        """Counts the C entry keeps (the unclaimed accesses it answered among them) into
        the stats, for every vCPU not running on its own thread now."""
        for c in self.cpus:
            if not c.parallel:
                c.fold_stats()

    def _bus_stats(self) -> dict[str, int]:
        self._fold_cpus()
        b = self.bus
        return {"pio_unclaimed_reads": b.pio.unclaimed_reads,
                "pio_unclaimed_writes": b.pio.unclaimed_writes,
                "mmio_unclaimed_reads": b.mmio.unclaimed_reads,
                "mmio_unclaimed_writes": b.mmio.unclaimed_writes}

    def _reset_bus_stats(self) -> None:
        self._fold_cpus()
        for s in (self.bus.pio, self.bus.mmio):
            s.unclaimed_reads = s.unclaimed_writes = 0

    def dump_stats(self, fmt: str = "text") -> str:
        """Dump every statistic (``text`` or ``json``); the dump is also kept in
        ``stats_dumps`` so the CLI writes guest-requested dumps to ``--stats``."""
        snap = self.stats.snapshot()
        self.stats.dumps += 1
        self.stats_dumps.append(snap)
        return self.stats.format(snap, fmt)

    def work_begin(self, work_id: int, thread_id: int = 0) -> None:
        """A guest work item starts (gem5's ``m5 workbegin``)."""
        self.work_items[(work_id, thread_id)] = self.eventq.cur_tick
        self._work["work_items_begun"] += 1

    def work_end(self, work_id: int, thread_id: int = 0) -> None:
        """A guest work item ends; its simulated duration is added to ``work_ticks``."""
        start = self.work_items.pop((work_id, thread_id), None)
        self._work["work_items_ended"] += 1
        if start is not None:
            self._work["work_ticks"] += self.eventq.cur_tick - start

    def _reset_work_stats(self) -> None:
        for k in self._work:
            self._work[k] = 0

    # --- running ---------------------------------------------------------------------------

    def request_exit(self, status: int, reason: str) -> None:
        """End the run after the current access/event (devices, guest events, host)."""
        if not self.stop_requested or not self.exit_reason:  # (a checkpoint's pause has none)
            self.exit_status = status
            self.exit_reason = reason
        self.stop_requested = True
        self._main_wake.set()

    def kick_all(self) -> None:
        for cpu in self.cpus:
            cpu.kick()

    def _cycle_source(self, cpu: KvmCPU) -> tuple[CycleSource, str]:
        plugin_src = self.hooks.call("get_host_cycles", cpu=cpu)
        return select_cycle_source(self.config.use_perf, self.config.host_frequency_hz,
                                   plugin_src)

    def run(self, *, max_ticks: int | None = None, timeout: float | None = None,
            until: str | bytes | re.Pattern[Any] | Callable[[Machine], bool] | None = None,
            hard_timeout: bool = False,
            until_instructions: int | None = None) -> RunResult:
        """Run until the guest or a device ends it, ``max_ticks`` simulated ticks pass
        (status 0), ``until`` is met (status 0), or ``timeout`` host seconds pass
        (:class:`RunTimeoutError`, whose ``result`` says how far it got).

        ``until``: text (or a compiled regular expression) the guest's console output
        must show, from this run on; or a callable ``until(machine) -> bool`` asked every
        millisecond of simulated time.

        ``until_instructions``: stop after exactly that many guest instructions of vCPU 0
        (status 0; see :func:`kvmfw.emu.stop.run_until_instructions` for how they are
        counted and which stats say so).

        ``hard_timeout`` (the CLI's choice): if the run has still not stopped
        ``STOP_GRACE`` seconds after the timeout (a device blocked in a host call, e.g. a
        console write to a pipe nobody reads), print where each thread is and end the
        process with status 124, rather than hang.
        """
        if self._closed:
            raise KvmfwError("this machine is closed")
        out = [c.id for c in self.cpus if c.switched_out]
        if out:
            raise StateError(f"vcpu {out[0]} is switched out (an emulated CPU runs it): "
                             "take it back with cpu.take_over_from(emu) first")
        if until_instructions is not None:
            from kvmfw.emu.stop import run_until_instructions

            try:
                return run_until_instructions(self, until_instructions, timeout=timeout)
            finally:
                self._flush_devices()
        eq = self.eventq
        self.stop_requested = self.checkpoint_pending  # (requested between runs: take it first)
        self.exit_status, self.exit_reason = 0, ""
        if self.cpus and all(c.status.value == "Idle" and not c.halted for c in self.cpus):
            for cpu in self.cpus:
                if cpu.start_active or cpu is self.cpus[0]:
                    cpu.activate()
        limit_event = None
        ended: list[RunEnd] = []

        def end(kind: RunEnd, reason: str) -> None:
            if not self.stop_requested:
                ended.append(kind)
            self.request_exit(0, reason)  # as a device ending the run does: no kick

        if max_ticks is not None:
            limit_event = Event(lambda: end(RunEnd.TICK_LIMIT, "simulated tick limit reached"),
                                "tick-limit", PRIO_EXIT)
            eq.schedule(limit_event, eq.cur_tick + max_ticks)
        until_event = self._watch_until(until, end)
        timed_out = threading.Event()
        watchdog = None
        if timeout is not None:
            def fire() -> None:
                timed_out.set()
                self.request_exit(124, f"host timeout of {timeout:g} s reached")
                self.kick_all()
                if hard_timeout and not finished.wait(STOP_GRACE):
                    _die_stuck(f"the run did not stop within {STOP_GRACE:g} s of its host "
                               f"timeout of {timeout:g} s")
            finished = threading.Event()
            watchdog = threading.Timer(timeout, fire)
            watchdog.daemon = True
            watchdog.start()
        t0 = time.monotonic()
        runner = threading.get_ident()

        def post_from_thread() -> None:
            # an event posted by another thread (a console reader, a host service) must
            # not wait for the guest's next exit: end the current slice (or the idle wait)
            if threading.get_ident() != runner:
                self._main_wake.set()
                self.kick_all()

        bound: list[KvmCPU] = []
        try:
            self._start_clock()
            if len(self.cpus) == 1:
                bound = self._bind_here()  # whichever thread calls run() runs the vCPU
                eq.on_post = post_from_thread
            while True:
                if len(self.cpus) > 1:
                    self._run_parallel()
                else:
                    self._run_serial()
                if not self.checkpoint_pending:
                    break
                # a requested checkpoint: the loop stopped between slices; take it here
                self._take_requested_checkpoint()
                if self.exit_reason:  # the run was ended meanwhile, or after the checkpoint
                    break
                self.stop_requested = False
                self._start_clock()  # writing it took host time, not simulated time
        except KeyboardInterrupt:
            self.request_exit(130, "interrupted")
            self.kick_all()
        finally:
            self._host_seconds = getattr(self, "_host_seconds", 0.0) + time.monotonic() - t0
            if watchdog is not None:
                finished.set()
                watchdog.cancel()
                # gone before run() returns: no thread outlives the run (a fork right after
                # it would copy a process Python calls multi-threaded)
                watchdog.join()
            for ev in (limit_event, until_event):
                if ev is not None and ev.scheduled:
                    eq.deschedule(ev)
            self.console.watch(None, lambda: None)  # (the run has ended: no until any more)
            self._flush_devices()  # before the result reads the console
            eq.on_post = None
            self._unbind(bound)
        kind = ended[0] if ended else RunEnd.GUEST
        if timed_out.is_set():
            kind = RunEnd.TIMEOUT
        elif self.exit_status == 130 and self.exit_reason == "interrupted":
            kind = RunEnd.INTERRUPTED
        elif not ended and self.exit_reason.startswith("all vCPUs halted"):
            kind = RunEnd.HALTED
        result = RunResult(self.exit_status, self.exit_reason, eq.cur_tick,
                           time.monotonic() - t0, kind, self.console.text)
        if timed_out.is_set():
            exc = RunTimeoutError(self.exit_reason)
            exc.result = result  # type: ignore[attr-defined]
            raise exc
        return result

    def _flush_devices(self) -> None:
        """Batched device output (consoles) is written out when a run ends, however."""
        # under the lock: a vCPU thread that did not stop may still be inside a device
        if not self.lock.acquire(timeout=1.0):
            log.warning("device output not flushed: a vCPU thread holds the machine lock")
            return
        try:
            for d in self.devices:
                try:
                    d.flush()
                except Exception as exc:  # flush the rest; the run's own outcome comes first
                    log.warning("device %s failed to flush: %s", d.name, exc)
        finally:
            self.lock.release()

    def _watch_until(self, until: Any, end: Callable[[RunEnd, str], None]) -> Event | None:
        """Arm ``run(until=...)``: a console watch, and for a callable a polling event."""
        if until is None:
            return None
        if not callable(until):
            self.console.watch(until, lambda: end(RunEnd.UNTIL, f"the console showed {until!r}"))
            return None
        eq = self.eventq

        def check() -> bool:
            if until(self):
                end(RunEnd.UNTIL, "the until condition was met")
                return True
            return False

        def poll() -> None:
            if not check():
                eq.schedule(ev, eq.cur_tick + UNTIL_POLL_TICKS)

        ev = Event(poll, "run-until", PRIO_EXIT)
        eq.schedule(ev, eq.cur_tick + UNTIL_POLL_TICKS)
        return ev

    def drain(self, max_steps: int = 1000) -> None:
        """Bring every vCPU and device to a point where no access, injected event or
        device event is in flight, with the thread contexts pulled in full (before a
        checkpoint, a fork or a hand-over). Raises :class:`StateError` if ``max_steps``
        drain steps per vCPU are not enough. Runs the vCPUs on the calling thread (bound
        to it for the drain: run timer and kicks follow), whichever thread ran them."""
        bound = self._bind_here()
        if bound:  # not inside a run on this thread: simulated time resumes here
            self._start_clock()
        try:
            self._drain_cpus(max_steps)
        finally:
            self._unbind(bound)
        busy = [d.name for d in self.devices if not d.is_drained()]
        if busy:
            raise StateError(f"devices not drained: {', '.join(busy)}")

    def _drain_cpus(self, max_steps: int) -> None:
        for cpu in self.cpus:
            # this thread's kick slot holds one kvm_run: point it at the vCPU it enters now,
            # or a timer signal landing just before KVM_RUN would mark another vCPU's
            cpu.vcpu.bind_thread()
            cpu.drain_pending = True
            steps = 0
            while not cpu.is_drained():
                if steps >= max_steps:
                    raise StateError(f"vcpu {cpu.id} did not drain within {max_steps} steps "
                                     f"(status {cpu.status.value})")
                if cpu.status.value == "RunningMMIOPending":
                    self._complete_pending_access(cpu)
                else:
                    cpu.run_drain()
                steps += 1
            cpu.drain_pending = False
            cpu.get_context(SyncLevel.FULL)

    def _complete_pending_access(self, cpu: KvmCPU) -> None:
        """Drain: run device events (never a vCPU's tick, which would run the guest) until
        the device completes ``cpu``'s pending MMIO access."""
        eq = self.eventq
        for c in self.cpus:
            if c.tick_event.scheduled:
                eq.deschedule(c.tick_event)
        try:
            while cpu.status.value == "RunningMMIOPending":
                if eq.service_one() is None:
                    raise StateError(f"vcpu {cpu.id} waits for a pending MMIO access that no "
                                     "scheduled event completes: the device lost it")
        finally:
            for c in self.cpus:  # every runnable vCPU ticks again when the run resumes
                if c.status.value != "Idle" and not c.parallel and not c.tick_event.scheduled:
                    eq.schedule(c.tick_event, eq.cur_tick)

    def _bind_here(self) -> list[KvmCPU]:
        """Bind every vCPU to the calling thread unless it already is (run timer, kick
        slot, cycle source): a machine may be run or drained from any thread. Returns the
        vCPUs it bound, for :meth:`_unbind`: a drain inside a run (a device asking for a
        checkpoint) must leave the run's own binding alone."""
        bound = []
        for cpu in self.cpus:
            if not cpu.bound_here:
                src, why = self._cycle_source(cpu)
                cpu.bind_thread(src, why)
                log.debug("cpu%d: cycles from %s", cpu.id, why)
                bound.append(cpu)
        return bound

    @staticmethod
    def _unbind(cpus: list[KvmCPU]) -> None:
        for cpu in cpus:
            if cpu.bound_here:
                cpu.unbind_thread()

    def _run_serial(self) -> None:
        """One vCPU on this thread: service events in order; when nothing is due (every
        vCPU idle), wait in host time for the next event, as the guest's clocks do."""
        eq = self.eventq
        while not self.stop_requested:
            nxt = eq.next_tick()
            if nxt is None:
                self.request_exit(0, "all vCPUs halted and no event is pending")
                break
            if nxt > eq.cur_tick:
                wait_ns = self.host_deadline(nxt) - time.monotonic_ns()
                if wait_ns > 0:
                    # a post from another thread or a stop wakes this early
                    self._main_wake.wait(min(wait_ns / 1e9, 0.05))
                    self._main_wake.clear()
                    continue
            eq.service_one()

    # --- time ------------------------------------------------------------------------------

    def _start_clock(self) -> None:
        """Simulated time resumes from its current tick at this host instant (host time
        between runs is not simulated)."""
        self._clock = (time.monotonic_ns(), self.eventq.cur_tick, self._clock[2])

    def host_deadline(self, tick: int) -> int:
        """The host ``CLOCK_MONOTONIC`` instant (ns) at which simulated time reaches
        ``tick`` in the current run (rounded up)."""
        host0, tick0, per_ns = self._clock
        return host0 - int((tick0 - tick) // per_ns)

    def sync_clock(self) -> None:
        """Advance simulated time to host time (times ``host_factor``) since the run
        began; it never goes back."""
        host0, tick0, per_ns = self._clock
        now = tick0 + int((time.monotonic_ns() - host0) * per_ns)
        if now > self.eventq.cur_tick:
            self.eventq.cur_tick = now

    # --- parallel mode: one host thread per vCPU -------------------------------------------

    def thread_failed(self, exc: BaseException) -> None:
        """A vCPU thread died: stop the machine and re-raise ``exc`` on the main thread."""
        with self.lock:
            if self._thread_error is None:
                self._thread_error = exc
        self.request_exit(1, f"vCPU thread failed: {exc}")
        self.kick_all()
        self._main_wake.set()

    def _run_parallel(self) -> None:
        """Each vCPU on its own thread (KVM_RUN without the lock, exits serviced under it);
        this thread services events when they fall due in host time."""
        eq = self.eventq
        self._thread_error = None
        for cpu in self.cpus:
            cpu.parallel = True
            if cpu.tick_event.scheduled:
                eq.deschedule(cpu.tick_event)
        eq.on_post = self._main_wake.set
        ready = threading.Barrier(len(self.cpus) + 1)

        def body(cpu: KvmCPU) -> None:
            try:
                if not cpu.bound_here:
                    src, why = self._cycle_source(cpu)
                    cpu.bind_thread(src, why)
            except BaseException as exc:
                self.thread_failed(exc)
            finally:
                ready.wait()
            try:
                cpu.run_thread()
            finally:
                cpu.unbind_thread()

        threads = [threading.Thread(target=body, args=(c,), name=f"vcpu{c.id}", daemon=True)
                   for c in self.cpus]
        for t in threads:
            t.start()
        ready.wait()
        try:
            while not self.stop_requested:
                # a bounded wait: a vCPU thread stuck in a device must not keep this thread
                # from seeing a stop
                if not self.lock.acquire(timeout=0.05):
                    continue
                try:
                    self.sync_clock()
                    eq.service_due()
                    nxt = eq.next_tick()
                    idle = all(c.status.value == "Idle" for c in self.cpus)
                finally:
                    self.lock.release()
                if idle and nxt is None:
                    self.request_exit(0, "all vCPUs halted and no event is pending")
                    break
                wait = 0.05
                if nxt is not None:
                    wait = min(wait, max(0.0, (self.host_deadline(nxt) -
                                               time.monotonic_ns()) / 1e9))
                self._main_wake.wait(wait)
                self._main_wake.clear()
        finally:
            self.kick_all()
            deadline = time.monotonic() + STOP_GRACE
            for t in threads:
                while t.is_alive():
                    self.kick_all()
                    t.join(0.05)
                    if time.monotonic() > deadline:
                        raise KvmfwError(
                            f"{t.name} did not stop within {STOP_GRACE:g} s "
                            f"({_where(t)}): a device or hook is blocked in a host call")
            eq.on_post = None
            for cpu in self.cpus:
                cpu.parallel = False  # (each thread unbound its vCPU: rebound next run)
        if self._thread_error is not None:
            raise self._thread_error

    # --- emulated CPU (kvmfw.emu) ---------------------------------------------------------

    def emulate(self, insts: int, *, cpu: int = 0, trace: Any = None) -> int:
        """Hand vCPU ``cpu`` to the emulated CPU (Unicorn), run exactly ``insts``
        instructions (fewer before a wait instruction or a stop), hand it back to KVM;
        returns how many ran. ``trace``: a :class:`kvmfw.emu.Trace`. Between runs."""
        from kvmfw.emu import emulate

        return emulate(self, insts, cpu=cpu, trace=trace)

    # --- checkpoints (kvmfw.checkpoint) --------------------------------------------------------

    def checkpoint(self, path: str | os.PathLike[str], *,
                   incremental: bool = False) -> Path:
        """Drain the machine and write a checkpoint to the new directory ``path``
        (:mod:`kvmfw.checkpoint`; ``incremental``: only the pages changed since this
        machine's previous checkpoint). Call it between runs or from an event."""
        from kvmfw.checkpoint.api import checkpoint

        return checkpoint(self, path, incremental=incremental)

    @classmethod
    def restore(cls, path: str | os.PathLike[str], **kwargs: Any) -> Machine:
        """A new machine built from the checkpoint at ``path``, in its state; see
        :func:`kvmfw.checkpoint.reader.restore` for ``kwargs``."""
        from kvmfw.checkpoint.reader import restore

        return restore(path, **kwargs)

    from_checkpoint = restore

    checkpoint_pending = False
    """A checkpoint was requested (:meth:`request_checkpoint`) and not yet taken."""
    checkpoint_dir: str | None = None
    """Where requested checkpoints go, one ``cpt.<tick>`` directory each (None: the
    current directory)."""
    exit_after_checkpoint = False
    """End the run after a requested checkpoint (gem5's default is to continue)."""
    checkpoint_incremental = False
    """Requested checkpoints after the first store only the pages changed since the
    previous one."""
    checkpoint_limit = 1000
    """At most this many requested checkpoints (tick, signal, guest) per machine: a guest
    asking for one in a loop must not fill the disk. Those past it are refused, logged and
    counted in :attr:`checkpoints_refused`; the run goes on. :meth:`checkpoint` called
    from Python is not limited."""
    checkpoint_min_free = 256 << 20
    """A requested checkpoint is refused (as past the limit) when the filesystem of
    :attr:`checkpoint_dir` has less than this many bytes free for this user."""
    def request_checkpoint(self) -> None:
        """Ask for a checkpoint at the next drainable point: the run loop stops between
        slices, writes it into :attr:`checkpoint_dir` and continues. The machine service
        ``checkpoint`` (pseudo-op device); safe from a signal handler (no locks)."""
        self.checkpoint_pending = True
        self.stop_requested = True
        self.kick_all()

    def _take_requested_checkpoint(self) -> None:
        from kvmfw.checkpoint.api import take_requested

        take_requested(self)

    # --- debugger ---------------------------------------------------------------------------

    def start_gdb(self, port: int = 1234, host: str = "127.0.0.1", *,
                  wait: bool = False) -> GdbServer:
        """Listen for GDB on ``host:port`` (0: any free port; the server's ``port`` says
        which) and return the :class:`kvmfw.gdb.GdbServer`. ``wait``: block until a client
        attaches and continues (QEMU's ``-S``); call it after loading the guest and before
        :meth:`run`. A client attaching later stops the running guest; closing the machine
        closes the server."""
        from kvmfw.gdb import GdbServer

        if self.gdb is not None:
            raise ConfigError("a GDB server is already attached to this machine")
        self.gdb = server = GdbServer(self, host, port, start=not wait)
        if wait:
            server.wait()
        return server

    # --- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Close devices, vCPUs, the VM and ``/dev/kvm`` (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.gdb is not None:
            self.gdb.close()
        emu = self.__dict__.get("_emulated_cpu")
        if emu is not None:  # its engines map guest RAM: drop them before the RAM goes
            emu.close()
        for d in self.devices:
            try:
                d.close()
            except Exception as exc:  # keep closing the rest
                log.warning("device %s failed to close: %s", d.name, exc)
        for cpu in self.cpus:
            cpu.close()
        if self.vm is not None:
            self.vm.close()
        if self.kvm is not None and self._owns_kvm:
            self.kvm.close()

    # --- reset and wake-up (a reboot of the guest, resume from ACPI S3) ---------------------

    RESET_LIMIT_DEFAULT = 100
    """Guest resets per run before kvmfw ends the run as a reset loop (``reboot_limit``)."""

    def reboot_enabled(self) -> bool:
        """The machine option ``reboot`` (QEMU's default: on): a guest reset reboots the
        machine; ``off``/False (the CLI's ``--no-reboot``, QEMU's ``-no-reboot``) ends the
        run instead, as a power-off would."""
        v = self.config.options.get("reboot", True)
        if isinstance(v, bool):
            return v
        t = str(v).lower()
        if t in ("1", "on", "true", "yes"):
            return True
        if t in ("0", "off", "false", "no"):
            return False
        raise ConfigError(f"option reboot must be on or off, not {v!r}")

    def can_reboot(self) -> bool:
        """True if a guest reset reboots this machine: ``reboot`` on, the architecture
        implements ``vcpu_reset`` and ``reset_machine``, and one vCPU (parallel vCPU
        threads cannot be stopped for a reset yet). Otherwise a reset ends the run as
        before (a triple fault with :class:`~kvmfw.errors.TripleFaultError`)."""
        return self.reboot_enabled() and self._arch_can_reset()

    def _arch_can_reset(self) -> bool:
        h = self.pm.hook
        return len(self.cpus) == 1 and bool(h.vcpu_reset.get_hookimpls()) \
            and bool(h.reset_machine.get_hookimpls())

    def _reset_limit(self) -> int:
        v = self.config.options.get("reboot_limit", self.RESET_LIMIT_DEFAULT)
        try:
            n = int(v)
        except (TypeError, ValueError):
            raise ConfigError(f"option reboot_limit must be an integer, not {v!r}") from None
        if n < 0:
            raise ConfigError(f"option reboot_limit must be >= 0 (0: no limit), not {n}")
        return n

    def _reset_stats(self) -> dict[str, int]:
        st = getattr(self, "_resets", None)
        if st is None:
            st = self._resets = {"reboots": 0, "wakeups": 0, "resets_ending_run": 0}
            self.stats.add("system.reset", lambda: dict(st), None)
        return st

    def request_reset(self, reason: str, *, wakeup: bool = False, status: int = 0) -> None:
        """A guest asked for a reset (``wakeup`` False: i8042 reset line, triple fault,
        reset control register) or to wake from a sleep state (``wakeup`` True: ACPI S3).

        Called from an exit handler or a device access. With ``reboot`` off, a reset ends
        the run with ``status`` (default 0) and ``reason``. Otherwise the reset
        (:meth:`reset`) runs as an event at the current tick, after the access completes
        and before the vCPU runs again. Each reset is counted (``system.reset``); past
        ``reboot_limit`` resets in one run (default 100; 0: no limit) the run ends as a
        reset loop, with status 0.
        A machine with more than one vCPU runs them on parallel threads, which cannot be
        stopped for a reset yet: its run ends (the reason says so).
        """
        st = self._reset_stats()
        if not wakeup and not self.reboot_enabled():
            st["resets_ending_run"] += 1
            self.request_exit(status, reason)
            return
        if not self._arch_can_reset():
            st["resets_ending_run"] += 1
            why = f"a machine with {len(self.cpus)} vCPUs" if len(self.cpus) > 1 else \
                f"with the {self.arch} plugin"
            self.request_exit(status, f"{reason}; kvmfw cannot yet "
                                      f"{'resume' if wakeup else 'reboot'} {why}: the run ends")
            return
        limit = self._reset_limit()
        done = st["reboots"] + st["wakeups"]
        if limit and done >= limit:
            st["resets_ending_run"] += 1
            self.request_exit(0, f"{reason}; reset loop: the guest reset {done} times in "
                                 f"this run (reboot_limit={limit})")
            return
        if getattr(self, "_reset_event", None) is not None:
            return  # one reset already pending: the second request is the same reset
        ev = Event(lambda: self._do_reset(reason, wakeup), "machine-reset")
        self._reset_event: Event | None = ev
        self._reset_args = {"reason": reason, "wakeup": wakeup}  # for a checkpoint
        self.eventq.post(ev)  # request_reset may come from any thread
        self.kick_all()

    def _do_reset(self, reason: str, wakeup: bool) -> None:
        self._reset_event = None
        if self.stop_requested:
            return
        log.info("%s: %s", "wake-up" if wakeup else "reboot", reason)
        self.reset(wakeup=wakeup)

    def reset(self, *, wakeup: bool = False) -> None:
        """Reset the machine now: every vCPU to its power-on state (``vcpu_reset``),
        devices to theirs (reboot only; a wake-up keeps device state), then the arch's
        ``reset_machine`` reloads the guest (reboot) or enters its wake-up vector.

        Call it while no vCPU runs (between runs, or from an event as
        :meth:`request_reset` does). RAM is kept, as on a PC. Raises
        :class:`~kvmfw.errors.StateError` if the architecture cannot reset.
        """
        if self._closed:
            raise KvmfwError("this machine is closed")
        st = self._reset_stats()
        with self.lock:
            for cpu in self.cpus:
                if cpu.status.value == "RunningServiceCompletion":
                    cpu.half_entry()  # finish the access that asked for the reset
                cpu.suspend()
                cpu.halted = False
                cpu.interrupt_pending = False
            if not wakeup:
                for d in self.devices:
                    d.reset()
            for cpu in self.cpus:
                if not self.hooks.call("vcpu_reset", cpu=cpu):
                    raise StateError(f"the {self.arch} plugin cannot reset a vCPU")
            done = self.hooks.call("reset_machine", machine=self, wakeup=wakeup)
            if done is False and wakeup:
                wakeup = False
                for d in self.devices:
                    d.reset()
                done = self.hooks.call("reset_machine", machine=self, wakeup=False)
            if not done:
                raise StateError(f"the {self.arch} plugin cannot reset the machine")
            st["wakeups" if wakeup else "reboots"] += 1
            for cpu in self.cpus:
                if cpu.start_active or cpu is self.cpus[0]:
                    cpu.activate()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _config_from(config: MachineConfig | None, **kw: Any) -> MachineConfig:
    """The machine's configuration: ``config``, or one built from the keywords given."""
    given = {k: v for k, v in kw.items() if v is not None}
    if config is not None:
        if given:
            raise ConfigError(f"give a MachineConfig or keywords ({', '.join(sorted(given))}), "
                              "not both")
        return config
    mem = given.get("memory")
    if isinstance(mem, str):
        given["memory"] = parse_size(mem, "memory")
    elif mem is not None and (isinstance(mem, bool) or not isinstance(mem, int)):
        raise ConfigError(f"memory must be bytes or a size such as 256M, not {mem!r}")
    for key, kind in (("devices", list), ("options", dict)):
        if key in given and not isinstance(given[key], kind):
            raise ConfigError(f"{key} must be a {kind.__name__}, not {given[key]!r}")
    if "devices" in given:
        given["devices"] = [str(d) for d in given["devices"]]
    return MachineConfig(**given)


def _device_stats(device: Device) -> dict[str, Any]:
    return dict(device.stats)
