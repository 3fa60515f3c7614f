"""The hook contract between the kvmfw core and its plugins (pluggy, project name ``kvmfw``).

Exactly one architecture plugin is registered per machine, then device instances, in that
order. Hooks marked *bound* are resolved once at start-up (:class:`kvmfw.plugins.BoundHooks`)
and then called directly from the run loop, without pluggy's per-call machinery; the
machine rebinds them on every vCPU whenever a device is added, so a device added at any
time is called from the next entry on. Hooks marked *firstresult* stop at the first
non-None answer.

Two namespaces, enforced when a device is added (:func:`kvmfw.plugins.check_device_hooks`):

- *Device hooks* (``pre_run``, ``post_run``, ``machine_created``, ``dump_state``) are
  observers a device instance may implement too. Every implementation is called, the
  arch's first, then devices in the order they were added; ``dump_state`` answers are
  joined (the arch's register dump, then one section per device).
- Every other hook is the architecture plugin's alone. A device that implements one is
  refused with :class:`~kvmfw.errors.PluginError` (it would silently replace the arch's
  answer).

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
    ``always_sync``, at level FULL), and eagerly on take-over and restore. Push at least
    what changed; ``level`` FULL with ``cpu.always_sync`` means write every group to KVM
    (gem5's debugging aid). Return the number of KVM ioctls issued (an ``int``: 0 when
    nothing needed pushing); the core adds it to ``sync_ioctls_to_kvm`` and counts a sync
    only when it was nonzero. ``True`` (or None) means "not counted": one sync, unknown
    ioctls.
    """


@hookspec(firstresult=True)
def update_thread_context(cpu: KvmCPU, context: Any, level: SyncLevel) -> bool | None:
    """Pull KVM state into the thread context (gem5 ``updateThreadContext``). *Bound.*

    Called lazily: only when someone reads the context after KVM ran (``cpu.get_context``),
    with the level asked for, never twice for the same run and level; with
    ``cpu.always_sync`` after every exit at level FULL, which must then read every group
    from KVM. Return the number of KVM ioctls issued (``int``), counted in
    ``sync_ioctls_from_kvm`` as for ``update_kvm_state``.
    """


@hookspec
def pre_run(cpu: KvmCPU) -> None:
    """Just before each ``KVM_RUN`` (sync fields living in ``kvm_run``). *Bound*, *device
    hook*: the arch's implementation first, then each device's.

    Runs on the vCPU's thread; in parallel mode WITHOUT the machine lock (take
    ``cpu.machine.lock`` to touch devices or the event queue). Keep it short: it is paid on
    every entry. An exception ends the run as :class:`~kvmfw.errors.PluginHookError`.
    """


@hookspec
def post_run(cpu: KvmCPU, exit_reason: int) -> None:
    """Just after each ``KVM_RUN``, before the exit is dispatched. *Bound*, *device hook*.

    Same thread, locking and error rules as ``pre_run``; ``exit_reason`` is
    ``kvm_run.exit_reason`` (``KVM_EXIT_INTR`` for a kick or the run timer).
    """


@hookspec(firstresult=True)
def deliver_interrupts(cpu: KvmCPU) -> bool | None:
    """Inject pending userspace interrupts, or request an interrupt window. *Bound.*

    Called before an entry when ``cpu.interrupt_pending`` is set (a controller called
    ``cpu.post_interrupt()``) and on ``KVM_EXIT_IRQ_WINDOW_OPEN``. Clear
    ``cpu.interrupt_pending`` when nothing is left to deliver. Not called when the VM
    uses an in-kernel irqchip. Call ``cpu.count_interrupt()`` for each interrupt or NMI
    injected (the ``interrupts`` statistic).
    """


@hookspec(firstresult=True)
def handle_exit_io(cpu: KvmCPU, io: IoExit) -> bool | None:
    """Handle a ``KVM_EXIT_IO`` (port IO). *Bound.*

    ``io`` is a tuple ``(direction, size, port, count, data_offset)`` with those names as
    attributes too (unpacking it is the fastest); the data is at ``data_offset`` in the vCPU
    mapping ``cpu.vcpu.run_map`` (slice it for bytes, assign a slice to answer an IN).
    Route the access to ``cpu.machine.bus.pio`` (x86 adds string IO and PCI configuration).
    Return True if handled, None if not yours (the run then ends with
    :class:`~kvmfw.errors.UnhandledExitError`). An arch that does nothing else for a single
    access sets ``cpu.direct_port_io = True`` in ``vcpu_init``: those exits then go
    straight to the bus and only string IO and the ports it reserved
    (``bus.pio.reserve``) reach this hook.
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
def save_vm_state(machine: Machine) -> dict[str, Any] | None:
    """VM-wide architectural state as plain data (x86: in-kernel PIC and IO-APIC
    ``KVM_GET_IRQCHIP``, PIT ``KVM_GET_PIT2``, KVM clock ``KVM_GET_CLOCK``; ARMv8: the vGIC
    distributor, redistributors and CPU interfaces). JSON-serialisable (bytes as hex).

    Caller: checkpoint, snapshot and fork, on the thread that drained the machine, after
    :meth:`Machine.drain <kvmfw.machine.Machine.drain>` and after every vCPU's
    ``save_arch_state``, with no vCPU in ``KVM_RUN``. None: the arch has no VM-wide state.
    """


@hookspec(firstresult=True)
def restore_vm_state(machine: Machine, state: dict[str, Any]) -> bool | None:
    """Load ``save_vm_state`` output into a machine built from the same configuration.

    Caller: restore and ``reset_to``, after guest RAM is in place and before any vCPU's
    ``restore_arch_state`` (an arch whose per-vCPU state depends on VM state, e.g. the
    vGIC's redistributors, documents its order). Everything is checked before KVM sees it:
    raise :class:`~kvmfw.errors.StateError` naming the field, and change nothing. Return
    True; None: the arch cannot restore VM state.
    """


@hookspec
def fork_child(machine: Machine) -> None:
    """In a forked child, before its machine is rebuilt on a new VM: forget what the arch
    keeps per VM, so the set-up hooks build it again for the child's VM.

    Caller: :func:`kvmfw.fork.rebuild_in_child`, once, after the parent's VM, vCPU and
    in-kernel device fds were closed in the child and before ``machine_configure``,
    ``vcpu_init`` and ``create_thread_context`` per vCPU and ``machine_created`` run again,
    followed by ``restore_vm_state`` and ``restore_arch_state`` with the state captured at
    the fork. Drop handles of the parent's in-kernel devices, once-only initialisation
    flags, lists those hooks append to, and host resources bound to the parent's process or
    threads (perf counters: close the fd, never ``ioctl`` it, the event is the parent's
    too). Keep the configuration and what the guest sees (board options, device tree).
    No ioctl on the parent's objects. An arch keeping no per-VM state needs no
    implementation.
    """


@hookspec(firstresult=True)
def cpu_model(machine: Machine) -> dict[str, Any] | None:
    """What the guest sees of the CPU, as plain data for a checkpoint's manifest (x86: the
    CPUID entries given to the vCPUs; ARMv8: the ID registers and vCPU features).

    Caller: checkpoint, on the drained machine. None: nothing to record.

    On restore the model comes back as ``machine.cpu_model`` before any vCPU exists: an arch
    that can set what the guest sees gives the vCPUs that model, not this host's (x86: the
    CPUID table; a host that offers more shows the guest no more), after refusing with
    :class:`~kvmfw.errors.CheckpointError` a model this host cannot give. One that cannot
    set it (ARMv8: the ID registers are the host's) leaves it to ``check_cpu_model``.
    """


@hookspec(firstresult=True)
def check_cpu_model(machine: Machine, model: dict[str, Any]) -> str | None:
    """Whether this host's KVM can give the guest the CPU model ``model`` (from
    ``cpu_model`` on another run). Return None if it can, else a one-line reason naming
    the first field it cannot give (the restore is then refused before any state is
    loaded). Caller: restore, after the machine is built and before any state is loaded.
    """


@hookspec
def dump_state(cpu: KvmCPU) -> str | None:
    """A readable dump for error reports. *Device hook.*

    The arch returns the register dump (every group, bytes at the PC); a device may return
    a section about itself (None: nothing to add). :meth:`kvmfw.cpu.KvmCPU.dump_state`
    joins them, the arch's first. Called on the vCPU's thread after a fatal exit, with the
    context pulled in full; must not raise (a failure is shown in place of the section).
    """


# --- machine reset and wake-up -------------------------------------------------------

@hookspec(firstresult=True)
def vcpu_reset(cpu: KvmCPU) -> bool | None:
    """Put ``cpu`` back in its power-on state: registers, MSRs, FPU, local APIC and MP
    state as right after the vCPU was created (x86: the boot CPU runnable, the others
    waiting for INIT/SIPI).

    Caller: :meth:`Machine.reset <kvmfw.machine.Machine.reset>`, on the thread that runs
    the machine, for every vCPU in id order, with no vCPU inside ``KVM_RUN`` (any pending
    IO/MMIO was completed by a half entry first), the machine lock held, after the devices
    were reset (reboot only) and before ``reset_machine``. The new state may stay in the
    thread context (marked dirty); it is pushed before the next entry. Return True; None
    means the architecture cannot reset a vCPU (the reset then fails with
    :class:`~kvmfw.errors.StateError`).
    """


@hookspec(firstresult=True)
def reset_machine(machine: Machine, wakeup: bool) -> bool | None:
    """After every ``vcpu_reset``: put VM-wide architectural state back to power-on and
    give the boot CPU its entry state.

    ``wakeup`` False (a reboot: i8042 reset line, triple fault, reset control register,
    ACPI reset register): reset VM-wide arch state (x86: in-kernel PIC, IO-APIC, PIT) and
    load the guest again exactly as the last ``load_guest`` call did (same image, same
    options), firmware tables included. ``wakeup`` True (resume from a sleep state such as
    ACPI S3): RAM and device state are kept; enter the guest where its firmware would on
    wake-up (x86: real mode at the FACS firmware waking vector; a vector of 0 asks for a
    reboot instead, as SeaBIOS does: return False). Caller, thread and locking as
    ``vcpu_reset``. Return True when done; False to turn a wake-up into a reboot; None:
    the architecture cannot (:class:`~kvmfw.errors.StateError`).
    """


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


# --- emulated CPU (issue 12: hand-over to Unicorn, kvmfw.emu) ---------------------------
# The arch plugin provides the glue that moves a vCPU between KVM and the core's
# :class:`kvmfw.emu.EmulatedCPU`; the core owns the protocol (drain, map RAM and devices,
# count, trace, the interrupt rule). Both hooks are optional: without ``emu_glue`` a
# hand-over is refused with :class:`kvmfw.emu.HandoverError`.

@hookspec(firstresult=True)
def emu_glue(cpu: KvmCPU) -> Any:
    """A :class:`kvmfw.emu.EmuGlue` for ``cpu`` (a new one per hand-over: it may keep the
    mode it found), or None if this arch has no emulated CPU. Called after the machine is
    drained and the context pulled in full. The glue's ``verify`` refuses, with
    ``HandoverError`` and nothing changed, every state Unicorn cannot model; its ``load``/
    ``store`` move the whole architectural state the emulator models between the thread
    context and Unicorn and mark the context dirty (``store``), so the next KVM entry
    pushes it. Raise ``kvmfw.emu.EmuUnavailableError`` if Unicorn is missing."""


@hookspec
def emu_started(emu: Any) -> None:
    """An :class:`kvmfw.emu.EmulatedCPU` has just taken a vCPU over (``emu.cpu``); plugins
    may add per-instruction/memory hooks (``emu.add_instruction_hook``,
    ``emu.add_memory_hook``) or read ``emu.instructions``. Must not run the guest."""
