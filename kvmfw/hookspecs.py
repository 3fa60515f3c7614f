"""The hook contract between the kvmfw core and its plugins (pluggy, project name ``kvmfw``).

Exactly one architecture plugin is registered per machine, then device instances, in that
order (pluggy calls the last registered first). Hooks marked *bound* are resolved once at
start-up (:class:`kvmfw.plugins.BoundHooks`) and then called directly from the run loop,
without pluggy's per-call machinery; a bound hook must therefore have one implementation
(the arch's) or none. Hooks marked *firstresult* stop at the first non-None answer.

Terms: ``cpu`` is a :class:`kvmfw.cpu.KvmCPU` (``cpu.vcpu`` holds the raw calls,
``cpu.machine`` the machine); ``context`` is the arch's thread context object (the cached
architectural state); ``level`` is a :class:`SyncLevel`. Every hook runs on the thread
that runs the vCPU unless stated otherwise.

A plugin module declares ``KVMFW_PLUGIN_API = (1, 0)``: the core refuses a different major.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from kvmfw.cpu import IoExit, KvmCPU
    from kvmfw.device import IrqLine
    from kvmfw.machine import Machine
    from kvmfw.plugins import DeviceRegistry
    from kvmfw.timer import CycleSource

PROJECT = "kvmfw"
PLUGIN_API = (1, 0)

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class SyncLevel(enum.IntEnum):
    """How much state a sync moves (QEMU's runtime/reset/full levels)."""

    NONE = 0
    RUNTIME = 1
    """What an exit handler needs: general registers, PC, flags, segments, control regs."""
    RESET = 2
    """Everything a reset changes."""
    FULL = 3
    """All state: FPU/vector state, every MSR or system register, pending events."""


# --- lifecycle ------------------------------------------------------------------------

@hookspec(firstresult=True)
def arch_name() -> str | None:  # type: ignore[empty-body]
    """The architecture this plugin implements (``"x86"``, ``"armv8"``).

    Called once when the plugin is registered; the core checks it against the machine.
    """


@hookspec(firstresult=True)
def memory_layout(machine: Machine, size: int) -> list[tuple[int, int, str]] | None:
    """Where guest RAM of ``size`` bytes goes: ``[(gpa, length, name), ...]``.

    x86 puts RAM at 0 with a hole below 4 GiB; ARM's ``virt`` board at 1 GiB. Called once;
    without an answer the core maps all RAM at guest-physical 0.
    """


@hookspec
def machine_configure(machine: Machine) -> None:
    """Prepare the VM before any vCPU exists (in-kernel irqchip, PIT, TSS, vGIC, ...).

    Called once, after memory is installed and before vCPUs are created (KVM requires
    some VM-wide devices to precede vCPUs).
    """


@hookspec(firstresult=True)
def create_thread_context(cpu: KvmCPU) -> Any:
    """Return the thread context for ``cpu`` (the arch's register cache), holding the
    vCPU's initial state.

    Called once per vCPU at start-up, after ``vcpu_init``. The object must expose ``pc``
    (int) for messages. Call ``cpu.mark_context_dirty()`` if you changed it from what KVM
    holds (an entry state), so it is pushed before the first entry.
    """


@hookspec
def vcpu_init(cpu: KvmCPU) -> None:
    """Initialise a freshly created vCPU (x86: CPUID; ARM: KVM_ARM_VCPU_INIT, MPIDR).

    Called once per vCPU, after the vCPU fd exists and before its first entry. Raise a
    :class:`kvmfw.errors.KvmfwError` subclass if a requested feature is missing.
    """


@hookspec(historic=True)
def machine_created(machine: Machine) -> None:
    """The machine is fully built (memory, vCPUs, devices); called once, historic."""


@hookspec
def register_devices(registry: DeviceRegistry) -> None:
    """Add device classes to ``registry`` (``registry.add(name, cls)``).

    An alternative to the ``kvmfw.devices`` entry-point group for plugins that provide
    devices computed at run time. Called once when the machine builds its device list.
    """


@hookspec(firstresult=True)
def irq_line(machine: Machine, number: int) -> IrqLine | None:
    """Return the :class:`~kvmfw.device.IrqLine` for platform interrupt input ``number``.

    The arch knows how inputs map to ``KVM_IRQ_LINE`` (x86 GSIs, ARM SPI encoding) or to a
    userspace interrupt controller. Called while devices are created.
    """


@hookspec(firstresult=True)
def load_guest(machine: Machine, image: str, options: dict[str, Any]) -> bool | None:
    """Load a guest image (kernel, ELF, flat binary) and set the boot CPU's entry state.

    ``options`` holds ``load_addr``, ``cmdline``, ``initrd`` and the like. Return True if
    this plugin recognised and loaded the image; raise :class:`kvmfw.errors.ImageError`
    for a bad image. Called once before the run.
    """


@hookspec(firstresult=True)
def default_guest(machine: Machine) -> str | None:
    """Path of the embedded guest ``kvmfw run`` uses when no kernel is given."""


@hookspec(firstresult=True)
def default_devices(machine: Machine) -> list[str] | None:
    """Device specs of the arch's default board (``["uart16550,port=0x3f8,irq=4", ...]``)."""


# --- the run loop -----------------------------------------------------------------------

@hookspec(firstresult=True)
def update_kvm_state(cpu: KvmCPU, context: Any, level: SyncLevel) -> bool | None:
    """Push the thread context into KVM (gem5 ``updateKvmState``). *Bound.*

    Called before an entry when the context was marked dirty (or before every entry with
    ``always_sync``), and eagerly on take-over and restore. Push at least what changed;
    ``level`` FULL means push everything. Return True.
    """


@hookspec(firstresult=True)
def update_thread_context(cpu: KvmCPU, context: Any, level: SyncLevel) -> bool | None:
    """Pull KVM state into the thread context (gem5 ``updateThreadContext``). *Bound.*

    Called lazily: only when someone reads the context after KVM ran (``cpu.get_context``),
    with the level asked for, never twice for the same run and level. Return True.
    """


@hookspec
def pre_run(cpu: KvmCPU) -> None:
    """Just before each ``KVM_RUN`` (sync fields living in ``kvm_run``). *Bound.*"""


@hookspec
def post_run(cpu: KvmCPU, exit_reason: int) -> None:
    """Just after each ``KVM_RUN``, before the exit is dispatched. *Bound.*"""


@hookspec(firstresult=True)
def deliver_interrupts(cpu: KvmCPU) -> bool | None:
    """Inject pending userspace interrupts, or request an interrupt window. *Bound.*

    Called before an entry when ``cpu.interrupt_pending`` is set (a controller called
    ``cpu.post_interrupt()``) and on ``KVM_EXIT_IRQ_WINDOW_OPEN``. Clear
    ``cpu.interrupt_pending`` when nothing is left to deliver. Not called when the VM
    uses an in-kernel irqchip.
    """


@hookspec(firstresult=True)
def handle_exit_io(cpu: KvmCPU, io: IoExit) -> bool | None:
    """Handle a ``KVM_EXIT_IO`` (port IO). *Bound.*

    ``io`` is a tuple ``(direction, size, port, count, data_offset)`` with those names as
    attributes too (unpacking it is the fastest); the data is at ``data_offset`` in the vCPU
    mapping ``cpu.vcpu.run_map`` (slice it for bytes, assign a slice to answer an IN).
    Route the access to ``cpu.machine.bus.pio`` (x86 adds string IO and PCI configuration).
    Return True if handled, None if not yours (the run then ends with
    :class:`~kvmfw.errors.UnhandledExitError`).
    """


@hookspec(firstresult=True)
def handle_arch_exit(cpu: KvmCPU, exit_reason: int) -> bool | None:
    """Handle an exit the core does not (DEBUG, HYPERCALL, X86_RDMSR, ...). *Bound.*

    Called for every exit reason without a core handler, and before the core turns
    UNKNOWN or EXCEPTION into an error. Return True if handled; None ends the run with a
    typed error carrying the exit and a register dump.
    """


@hookspec(firstresult=True)
def finalize_mmio_address(cpu: KvmCPU, address: int) -> int | None:
    """Rewrite an MMIO exit's guest-physical address (gem5 ``finalizePhysical``). *Bound.*

    Return the address to look up on the bus, or None to keep it. Only called when a
    plugin implements it.
    """


@hookspec(firstresult=True)
def get_host_cycles(cpu: KvmCPU) -> CycleSource | None:
    """Offer a host-cycle source (x86: the TSC) for time accounting without perf.

    Called once at start-up; the source's ``read`` is then called around every run.
    """


# --- drain, state, debug -------------------------------------------------------------

@hookspec(firstresult=True)
def arch_is_drained(cpu: KvmCPU) -> bool | None:
    """True if no exception, interrupt or NMI is injected or pending inside KVM.

    Called by drain; None counts as drained (an arch without such state).
    """


@hookspec(firstresult=True)
def kvm_run_drain(cpu: KvmCPU) -> bool | None:
    """Run the vCPU towards a drainable point with a bounded budget (gem5 ``kvmRunDrain``).

    Called by drain instead of a normal slice while ``arch_is_drained`` is False. Return
    True if it ran; None lets the core do a half entry (finish pending IO/MMIO only).
    """


@hookspec(firstresult=True)
def save_arch_state(cpu: KvmCPU) -> dict[str, Any] | None:
    """The vCPU's complete architectural state as plain data (for checkpoints/handover).

    Called on a drained vCPU.
    """


@hookspec(firstresult=True)
def restore_arch_state(cpu: KvmCPU, state: dict[str, Any]) -> bool | None:
    """Load state produced by ``save_arch_state`` in the arch's documented order."""


@hookspec(firstresult=True)
def dump_state(cpu: KvmCPU) -> str | None:
    """A readable register dump (every group, bytes at the PC) for error reports."""


# --- the GDB stub (kvmfw.gdb) ------------------------------------------------------------
#
# Called by the ISA-neutral stub only while the machine is stopped for the debugger: on
# the thread serving the stop (the vCPU thread that took the debug exit, the thread that
# services events for Ctrl-C, or the caller of ``Machine.start_gdb(wait=True)``), with
# every other vCPU out of KVM (in parallel mode, parked on ``machine.lock``, which the
# serving thread holds). ``cpu`` may therefore be a vCPU other than the calling thread's:
# use vCPU ioctls and the thread context, never thread-bound state. None of them is
# bound; all are optional (without ``gdb_target`` ``--gdb`` is refused with a message).
# Raise :class:`kvmfw.gdb.GdbError` for a request the target cannot honour: the stub
# answers GDB with an error and the run goes on.

@hookspec(firstresult=True)
def gdb_target(cpu: KvmCPU) -> Any:
    """The target description for ``cpu`` as it is now: a :class:`kvmfw.gdb.GdbTarget`
    (GDB architecture name, features with their registers in GDB's order, notes on what
    this KVM lacks). Called once, when the stub starts; None: the arch has no GDB support.
    """


@hookspec(firstresult=True)
def gdb_read_registers(cpu: KvmCPU) -> list[bytes] | None:
    """Every register of the target description, in its order, each as little-endian
    bytes of its size (``GdbTarget.sizes``). Called for ``g`` and ``p`` packets."""


@hookspec(firstresult=True)
def gdb_write_register(cpu: KvmCPU, regnum: int, value: bytes) -> bool | None:
    """Set register ``regnum`` (target-description order) to ``value`` (little-endian,
    exactly its size) in the thread context, marking it dirty so it is pushed before the
    next entry. Return True, or False for a register that cannot be written (the stub
    answers ``E01``; a ``G`` packet only writes registers whose value changed)."""


@hookspec(firstresult=True)
def gdb_set_guest_debug(cpu: KvmCPU, step: bool, breakpoints: list[Any]) -> bool | None:
    """Program ``KVM_SET_GUEST_DEBUG`` on ``cpu``: single-step if ``step``, and every
    :class:`kvmfw.gdb.Breakpoint` in ``breakpoints`` (software, hardware, write/read/
    access watchpoints; virtual addresses). Called for each vCPU with the same list after
    every ``Z``/``z`` packet and before resuming; an empty list and ``step`` False turn
    guest debugging off. Raise ``GdbError`` before changing anything when the list does
    not fit (e.g. more than the debug registers), ``GdbUnsupported`` for a kind the target
    lacks. Software breakpoints the KVM cannot report may be served by debug registers;
    say so in the target's notes. Return True."""


@hookspec(firstresult=True)
def gdb_translate(cpu: KvmCPU, vaddr: int) -> int | None:
    """The guest-physical address of virtual address ``vaddr`` as ``cpu`` sees it now
    (page-table walk or ``KVM_TRANSLATE``), or None if it is not mapped. The stub calls it
    once per 4 KiB page of an ``m``/``M``/``X`` access and bounds the access to RAM."""


@hookspec(firstresult=True)
def gdb_debug_exit(cpu: KvmCPU) -> Any:
    """Why ``cpu`` took ``KVM_EXIT_DEBUG``: a :class:`kvmfw.gdb.Stop` (``swbreak``,
    ``hwbreak``, ``step``, ``watch``/``rwatch``/``awatch`` with the data address, or
    ``trap``), read from the exit's arch details (``kvm_run.debug.arch``); ``guest`` when
    the exit was the guest's own breakpoint and the hook re-injected it (e.g.
    ``KVM_GUESTDBG_INJECT_BP``): the stub then does not stop. Called on the vCPU's thread
    from the core's exit table, before the machine is stopped; must not resume the vCPU."""
