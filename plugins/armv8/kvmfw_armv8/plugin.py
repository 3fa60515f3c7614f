"""The ARMv8 hook implementations (entry point ``kvmfw.arch: armv8``).

Per-machine state (vGIC, board configuration, secondary vCPUs waiting for PSCI CPU_ON) is
an :class:`ArmBoard` kept beside the machine; per-vCPU state (feature set, register list)
an :class:`ArmCpuState`.

Order of events: ``memory_layout`` (RAM at 1 GiB) -> ``machine_configure`` (create the
vGIC and set its addresses: KVM needs the device before the vCPUs) -> per vCPU
``vcpu_init`` (``KVM_ARM_PREFERRED_TARGET``, ``KVM_ARM_VCPU_INIT`` with PSCI 0.2 and the
requested features; secondaries start powered off) and ``create_thread_context`` ->
devices -> ``machine_created`` (vGIC ``CTRL_INIT`` once every vCPU exists, then the
PMU's interrupt and init) -> ``load_guest``.

PSCI is handled by the kernel, which tells userspace nothing about a CPU_ON. A secondary
vCPU starts active (``start_active``): its thread enters ``KVM_RUN`` at once and sleeps
there, powered off, until the kernel wakes it for a CPU_ON (and again after a CPU_OFF), as
QEMU's vCPU threads do, so a CPU_ON takes effect at once. (It was left idle in kvmfw until
the poll below saw it runnable: up to 64 ms late, the guest's boot CPU waiting meanwhile.)
A secondary stays listed as waiting until its first exit that is not a kick (drain does
not enter it; a fork keeps the list). One left idle in kvmfw (restored from a checkpoint
taken while it was) is brought up as before: a bring-up event polls its
``KVM_GET_MP_STATE`` under the machine lock, every 1 ms after a start or a bring-up and
backing off to every 64 ms, only while some vCPU runs; a vCPU inside ``KVM_RUN`` is
never polled (the ioctl would wait for it to leave). SYSTEM_OFF and SYSTEM_RESET arrive as
``KVM_EXIT_SYSTEM_EVENT`` and end the run in the core.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import weakref
from typing import TYPE_CHECKING, Any

from kvmfw import initramfs
from kvmfw.abi import IOCTLS, address_of, ffi, ioctl
from kvmfw.debug import get_logger
from kvmfw.device import CallbackIrqLine, IrqLine
from kvmfw.errors import ConfigError, ImageError, KvmError, KvmfwError, StateError
from kvmfw.eventq import Event
from kvmfw.hookspecs import SyncLevel, hookimpl
from kvmfw.imagefile import copy_into
from kvmfw.record import Record
from kvmfw.seed import draw, seed_option
from kvmfw_armv8 import KVMFW_PLUGIN_API, abi, board, loader, regs, vgic
from kvmfw_armv8.context import ArmV8Context, Group

if TYPE_CHECKING:
    from kvmfw.cpu import KvmCPU
    from kvmfw.machine import Machine
    from kvmfw.vm import KvmDevice

__all__ = ["KVMFW_PLUGIN_API", "ArmFeatureError", "ArmBoard", "ArmCpuState", "board_of"]

log = get_logger("kvmfw.armv8")

# What kvmfw.config checks before a machine is built (see its "declares" note).
machine_options = {"gic": ("v3", "v2", "auto", "none"), "arm_features": None, "psci": bool,
                   "decompress": ("host", "guest"), "kaslr": None}
host_machines = ("arm64", "aarch64")  # the first names the host in messages

BRING_UP_POLL_TICKS = 1_000_000_000
"""First interval (1 ms) of the bring-up poll, after a start or a bring-up."""
BRING_UP_POLL_MAX_TICKS = 64_000_000_000
"""Longest interval (64 ms) of the bring-up poll while no secondary comes up."""
DRAIN_SLICE_TICKS = 1_000_000_000
"""How long (1 ms) one drain step lets KVM run a vCPU to deliver a pending SError."""
A32_FEATURE = "el1_32bit"
"""``kvmfw_armv8.aarch32.FEATURE``: that module and ``state`` (checkpoints) are imported
when first needed, so a start-up of an AArch64 guest pays for neither."""


class ArmFeatureError(KvmfwError):
    """A requested vCPU feature (PMUv3, SVE, pointer auth, EL1_32BIT, GIC) is not offered
    by this kernel or host CPU."""

    exit_status = 8

    def __init__(self, feature: str, detail: str) -> None:
        self.feature = feature
        super().__init__(f"arm64 feature {feature!r} is not available: {detail}")


class RegisterSyncError(KvmfwError):
    """KVM refused to set one or more registers (names every one, unlike gem5's panic)."""

    def __init__(self, failures: list[tuple[str, KvmError]]) -> None:
        self.failures = failures
        shown = "; ".join(f"{n}: {e.errno and errno.errorcode.get(e.errno, e.errno)}"
                          for n, e in failures[:8])
        more = f" and {len(failures) - 8} more" if len(failures) > 8 else ""
        super().__init__(f"KVM_SET_ONE_REG failed for {len(failures)} register(s): {shown}{more}")


class ArmCpuState(Record):
    """What the plugin knows about one vCPU. ``other_ids``: reg-list ids outside the core
    groups (system, firmware, demux, SVE, unknown)."""

    def __init__(self, index: int, target: int = -1, features: int = 0, mpidr: int = 0,
                 reg_ids: list[int] | None = None, other_ids: list[int] | None = None,
                 sve: bool = False) -> None:
        self.index = index
        self.target = target
        self.features = features
        self.mpidr = mpidr
        self.reg_ids: list[int] = [] if reg_ids is None else reg_ids
        self.other_ids: list[int] = [] if other_ids is None else other_ids
        self.sve = sve


class ArmBoard(Record):
    """The ARMv8 side of one machine."""

    def __init__(self, config: board.BoardConfig, gic: str = "none") -> None:
        self.config = config
        self.gic = gic
        self.vgic: KvmDevice | None = None
        self.layout2 = False
        self.cpus: dict[int, ArmCpuState] = {}
        self.waiting: list[KvmCPU] = []
        """Secondary vCPUs powered off in KVM, activated when PSCI CPU_ON makes them
        runnable (changed only under the machine lock)."""
        self.bring_up: Event | None = None
        """The event that polls the waiting vCPUs' MP state (scheduled while some wait)."""
        self.poll_interval = BRING_UP_POLL_TICKS
        self.mp_state_polls = 0
        """``KVM_GET_MP_STATE`` calls made for bring-up (bounded by the poll's rate)."""
        self.dtb_addr: int | None = None
        self.dtb = b""
        self.initrd: tuple[int, int] | None = None
        self.vgic_ready = False
        self.spi_lines: dict[int, CallbackIrqLine] = {}
        """The platform IRQ lines handed out, by SPI: a vGIC restore sets their cached
        level to the restored input level, so a device's next ``lower()`` is not skipped."""
        self.spi_levels: dict[int, int] = {}
        """Input levels by INTID from the last vGIC restore (for lines handed out after
        it)."""
        self.inst_stops: dict[int, Any] = {}
        """Armed instruction stops by vCPU index (:func:`set_inst_stop`)."""
        self.forked_waiting: set[int] | None = None
        """In a forked child between ``fork_child`` and ``machine_created``: the indices of
        the secondaries that were waiting for CPU_ON at the fork."""


_BOARDS: weakref.WeakKeyDictionary[Any, ArmBoard] = weakref.WeakKeyDictionary()


def board_of(machine: Machine) -> ArmBoard:
    """The :class:`ArmBoard` of ``machine`` (created on first use)."""
    b = _BOARDS.get(machine)
    if b is None:
        b = ArmBoard(board.BoardConfig.from_options(machine.config.options))
        _BOARDS[machine] = b
    return b


def _vm_ioctl(machine: Machine, request: int, buf: Any = None, detail: str = "") -> int:
    assert machine.vm is not None
    return ioctl(machine.vm.fd, request, address_of(buf) if buf is not None else 0, detail)


# --- lifecycle -----------------------------------------------------------------------

@hookimpl
def arch_name() -> str:
    return "armv8"


@hookimpl
def emu_glue(cpu: KvmCPU) -> Any:
    """The emulated CPU's AArch64 glue (:mod:`kvmfw_armv8.emu`; Unicorn is optional)."""
    from kvmfw_armv8.emu import ArmV8EmuGlue

    return ArmV8EmuGlue()


@hookimpl
def memory_layout(machine: Machine, size: int) -> list[tuple[int, int, str]]:
    """RAM at 1 GiB, as on QEMU's virt board."""
    return [(board.RAM_BASE, size, "ram")]


@hookimpl
def machine_configure(machine: Machine) -> None:
    """Create the in-kernel vGIC (v3 by default) and set its addresses."""
    b = board_of(machine)
    vm = machine.vm
    assert vm is not None
    b.layout2 = vm.check_extension(abi.KVM_CAP_ARM_IRQ_LINE_LAYOUT_2) > 0
    want = b.config.gic
    if want == "none":
        b.gic = "none"
        return
    ncpus = machine.config.cpus
    order = ["v3", "v2"] if want == "auto" else [want]
    last: KvmError | None = None
    for kind in order:
        limit = board.MAX_CPUS_GICV3 if kind == "v3" else board.MAX_CPUS_GICV2
        if ncpus > limit:
            raise ConfigError(f"GIC{kind} on this board supports at most {limit} vCPUs")
        try:
            dev = vm.create_device(abi.KVM_DEV_TYPE_ARM_VGIC_V3 if kind == "v3"
                                   else abi.KVM_DEV_TYPE_ARM_VGIC_V2)
        except KvmError as exc:
            last = exc
            continue
        grp = abi.KVM_DEV_ARM_VGIC_GRP_ADDR
        if kind == "v3":
            dev.set_attr(grp, abi.KVM_VGIC_V3_ADDR_TYPE_DIST, board.GICD_BASE)
            dev.set_attr(grp, abi.KVM_VGIC_V3_ADDR_TYPE_REDIST, board.GICR_BASE)
        else:
            dev.set_attr(grp, abi.KVM_VGIC_V2_ADDR_TYPE_DIST, board.GICD_BASE)
            dev.set_attr(grp, abi.KVM_VGIC_V2_ADDR_TYPE_CPU, board.GICC_BASE)
        dev.set_attr(abi.KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, board.NR_IRQS, size=4)
        vm.enable_kernel_irqchip()
        b.gic, b.vgic = kind, dev
        return
    raise ArmFeatureError(f"gic {want}", f"KVM_CREATE_DEVICE failed ({last}); this host "
                          "has no such in-kernel GIC (try gic=auto or gic=none)")


_FEATURE_BITS = {
    "pmu": ([abi.KVM_ARM_VCPU_PMU_V3], [abi.KVM_CAP_ARM_PMU_V3], "KVM_CAP_ARM_PMU_V3"),
    "sve": ([abi.KVM_ARM_VCPU_SVE], [abi.KVM_CAP_ARM_SVE], "KVM_CAP_ARM_SVE"),
    "pauth": ([abi.KVM_ARM_VCPU_PTRAUTH_ADDRESS, abi.KVM_ARM_VCPU_PTRAUTH_GENERIC],
              [abi.KVM_CAP_ARM_PTRAUTH_ADDRESS, abi.KVM_CAP_ARM_PTRAUTH_GENERIC],
              "KVM_CAP_ARM_PTRAUTH_ADDRESS/GENERIC"),
    "el1_32bit": ([abi.KVM_ARM_VCPU_EL1_32BIT], [abi.KVM_CAP_ARM_EL1_32BIT],
                  "KVM_CAP_ARM_EL1_32BIT"),
}


def feature_word(cpu: KvmCPU, features: frozenset[str], psci: bool, power_off: bool) -> int:
    """features[0] of ``kvm_vcpu_init``; raises :class:`ArmFeatureError` for a feature
    whose capability the kernel does not report."""
    vm = cpu.machine.vm
    assert vm is not None
    word = (1 << abi.KVM_ARM_VCPU_PSCI_0_2) if psci else 0
    if power_off:
        word |= 1 << abi.KVM_ARM_VCPU_POWER_OFF
    for name in sorted(features):
        bits, caps, capname = _FEATURE_BITS[name]
        if not all(vm.check_extension(c) > 0 for c in caps):
            if name == A32_FEATURE:
                from kvmfw_armv8 import aarch32

                raise ArmFeatureError(name, aarch32.host_support(vm)[1])
            raise ArmFeatureError(name, f"the kernel does not report {capname}")
        for bit in bits:
            word |= 1 << bit
    if psci and vm.check_extension(abi.KVM_CAP_ARM_PSCI_0_2) <= 0:
        raise ArmFeatureError("psci", "the kernel does not report KVM_CAP_ARM_PSCI_0_2")
    return word


@hookimpl
def vcpu_init(cpu: KvmCPU) -> None:
    """``KVM_ARM_PREFERRED_TARGET`` + ``KVM_ARM_VCPU_INIT``; SVE finalisation; MPIDR."""
    machine = cpu.machine
    b = board_of(machine)
    st = ArmCpuState(index=cpu.id)
    buf = ffi.new("uint8_t[]", abi.VCPU_INIT.size)
    _vm_ioctl(machine, abi.KVM_ARM_PREFERRED_TARGET, buf)
    target = abi.VCPU_INIT.unpack(ffi.buffer(buf))[0]
    word = feature_word(cpu, b.config.features, b.config.psci,
                        power_off=cpu.id != 0 and b.config.psci)
    init = ffi.new("uint8_t[]", abi.VCPU_INIT.pack(target, word, 0, 0, 0, 0, 0, 0))
    try:
        cpu.vcpu.ioctl(abi.KVM_ARM_VCPU_INIT, address_of(init), f"features {word:#x}")
    except KvmError as exc:
        if b.config.features and exc.errno == errno.EINVAL:
            raise ArmFeatureError(",".join(sorted(b.config.features)),
                                  f"KVM_ARM_VCPU_INIT refused the feature set ({exc})") from exc
        raise
    if "sve" in b.config.features:
        fin = ffi.new("int *", abi.KVM_ARM_VCPU_SVE)
        cpu.vcpu.ioctl(abi.KVM_ARM_VCPU_FINALIZE, address_of(fin), "SVE")
        st.sve = True
    st.target, st.features = target, word
    st.mpidr = cpu.vcpu.get_one_reg(regs.MPIDR_EL1) & 0xFF00FFFFFF
    st.reg_ids = cpu.vcpu.reg_list()
    st.other_ids = [r for r in st.reg_ids if r not in regs.CORE_IDS]
    b.cpus[cpu.id] = st
    if word & (1 << abi.KVM_ARM_VCPU_POWER_OFF):
        b.waiting.append(cpu)
        if hasattr(cpu, "start_active"):
            # its thread enters KVM from the start and sleeps there (MP state STOPPED)
            # until the kernel's PSCI CPU_ON wakes it, as QEMU's vCPU threads do: the
            # guest's boot CPU, waiting for it, is not held up until the next poll
            cpu.start_active = True


@hookimpl
def machine_created(machine: Machine) -> None:
    """vGIC ``CTRL_INIT`` (needs every vCPU) and the PMU's interrupt per vCPU."""
    b = board_of(machine)
    if b.forked_waiting is not None:  # vcpu_init listed every secondary: the fork's only
        b.waiting = [c for c in b.waiting if c.id in b.forked_waiting]
        b.forked_waiting = None
    if b.waiting:
        with machine.lock:
            _schedule_bring_up(machine, b, BRING_UP_POLL_TICKS)
    if b.vgic is not None and not b.vgic_ready:
        b.vgic.set_attr(abi.KVM_DEV_ARM_VGIC_GRP_CTRL, abi.KVM_DEV_ARM_VGIC_CTRL_INIT)
        b.vgic_ready = True
    if "pmu" in b.config.features:
        for cpu in machine.cpus:
            if b.vgic is not None:
                _vcpu_set_attr(cpu, abi.KVM_ARM_VCPU_PMU_V3_CTRL, abi.KVM_ARM_VCPU_PMU_V3_IRQ,
                               ffi.new("int *", abi.PMU_PPI))
            _vcpu_set_attr(cpu, abi.KVM_ARM_VCPU_PMU_V3_CTRL, abi.KVM_ARM_VCPU_PMU_V3_INIT,
                           None)


@hookimpl
def fork_child(machine: Machine) -> None:
    """Forget the parent's VM so the hooks rebuild the board on the child's: the vGIC
    handle and its once-only ``CTRL_INIT``, the vCPUs' init results, the waiting list that
    ``vcpu_init`` fills again (trimmed in ``machine_created`` to the secondaries waiting at
    the fork: the others are running, their MP state comes with the restore), and armed
    instruction stops (perf counters on the parent's threads: the fds are closed only)."""
    b = board_of(machine)
    b.vgic, b.vgic_ready = None, False
    b.cpus = {}
    b.forked_waiting = {c.id for c in b.waiting}
    b.waiting = []
    for stop in b.inst_stops.values():
        stop.close()
    b.inst_stops = {}


def _vcpu_set_attr(cpu: KvmCPU, group: int, attr: int, buf: Any) -> None:
    a = ffi.new("struct kvm_device_attr *")
    a.group, a.attr = group, attr
    a.addr = address_of(buf) if buf is not None else 0
    cpu.vcpu.ioctl(IOCTLS.KVM_SET_DEVICE_ATTR, address_of(a), f"vcpu attr {group}/{attr}")


@hookimpl
def default_devices(machine: Machine) -> list[str]:
    """PL011 console and the pseudo-op window (from kvmfw-devices)."""
    return [f"pl011,base={board.UART_BASE:#x},irq={board.UART_SPI}",
            f"pseudo-op,base={board.PSEUDO_OP_BASE:#x}"]


# --- interrupts --------------------------------------------------------------------------

def spi_line_number(machine: Machine, spi: int) -> int:
    """``KVM_IRQ_LINE`` number of SPI ``spi`` (0-based, as in device-tree cells)."""
    return abi.irq_line_number(abi.KVM_ARM_IRQ_TYPE_SPI, abi.GIC_SPI_BASE + spi)


def ppi_line_number(machine: Machine, vcpu: int, intid: int) -> int:
    """``KVM_IRQ_LINE`` number of PPI ``intid`` (16..31) of vCPU ``vcpu``."""
    return abi.irq_line_number(abi.KVM_ARM_IRQ_TYPE_PPI, intid, vcpu, board_of(machine).layout2)


def cpu_line_number(machine: Machine, vcpu: int, fiq: bool = False) -> int:
    """``KVM_IRQ_LINE`` number of a vCPU's IRQ (or FIQ) input (no in-kernel GIC)."""
    return abi.irq_line_number(abi.KVM_ARM_IRQ_TYPE_CPU,
                               abi.KVM_ARM_IRQ_CPU_FIQ if fiq else abi.KVM_ARM_IRQ_CPU_IRQ,
                               vcpu, board_of(machine).layout2)


@hookimpl
def irq_line(machine: Machine, number: int) -> IrqLine:
    """Platform input ``number`` is SPI ``number`` (INTID 32 + number) on the vGIC; without
    a GIC every input drives vCPU 0's IRQ line."""
    vm = machine.vm
    assert vm is not None
    b = board_of(machine)
    line = (spi_line_number(machine, number) if b.gic != "none"
            else cpu_line_number(machine, 0))
    out = CallbackIrqLine(lambda level: vm.set_irq_line(line, level))
    if b.gic != "none":
        b.spi_lines[number] = out
        out.level = b.spi_levels.get(abi.GIC_SPI_BASE + number, 0)
    return out


@hookimpl
def post_run(cpu: KvmCPU, exit_reason: int) -> None:
    """Restart the bring-up poll if it stopped (every vCPU was idle) and one still waits.
    No ioctl here: the poll runs as an event, rate-limited, under the machine lock."""
    b = board_of(cpu.machine)
    if exit_reason == _EXIT_INTR and b.inst_stops:
        stop = b.inst_stops.get(cpu.id)
        if stop is not None and stop.check():
            cpu.machine.request_exit(0, "instruction stop")
    if b.waiting:
        _waiting_exit(cpu, b, exit_reason)


def _waiting_exit(cpu: KvmCPU, b: ArmBoard, exit_reason: int) -> None:
    """An exit while some secondary is listed as waiting for CPU_ON: one of them that
    exits for a reason other than a kick runs guest code (it started active and the
    kernel's CPU_ON woke it), so it waits no more; the poll restarts while an idle one
    waits (one left idle by a restored checkpoint)."""
    with cpu.machine.lock:
        if exit_reason != _EXIT_INTR and cpu.status.value != "Idle" and cpu in b.waiting:
            b.waiting.remove(cpu)
        if b.bring_up is not None and not b.bring_up.scheduled and _idle_waiting(b):
            _schedule_bring_up(cpu.machine, b, BRING_UP_POLL_TICKS)


def _idle_waiting(b: ArmBoard) -> bool:
    return any(c.status.value == "Idle" for c in b.waiting)


_EXIT_INTR = 10


def set_inst_stop(cpu: KvmCPU, instructions: int, tid: int | None = None) -> Any:
    """End the run (reason ``instruction stop``) once ``cpu`` has retired ``instructions``
    guest instructions, through a perf overflow (:mod:`kvmfw_armv8.perf`); returns the
    :class:`~kvmfw_armv8.perf.InstStop` (its ``overshoot`` once taken). Raises
    :class:`~kvmfw_armv8.perf.PerfUnavailable` where the PMU cannot count them."""
    from kvmfw_armv8 import perf

    b = board_of(cpu.machine)
    old = b.inst_stops.pop(cpu.id, None)
    if old is not None:
        old.close()
    stop = perf.open_inst_stop(cpu, instructions, tid)
    b.inst_stops[cpu.id] = stop
    return stop


def _schedule_bring_up(machine: Machine, b: ArmBoard, interval: int) -> None:
    """(Re)schedule the bring-up poll ``interval`` ticks from now (machine lock held)."""
    b.poll_interval = interval
    if b.bring_up is None:
        ref = weakref.ref(machine)  # the board must not keep its machine alive

        def poll() -> None:
            m = ref()
            if m is not None:
                bring_up_runnable(m)

        b.bring_up = Event(poll, "armv8.psci-bring-up")
    eq = machine.eventq
    if b.bring_up.scheduled:
        eq.reschedule(b.bring_up, eq.cur_tick + interval)
    else:
        eq.schedule(b.bring_up, eq.cur_tick + interval)


def bring_up_runnable(machine: Machine) -> int:
    """Activate the waiting secondaries that PSCI CPU_ON made runnable; reschedule the poll
    while some still wait and some vCPU runs. Returns how many came up."""
    b = board_of(machine)
    with machine.lock:
        started = 0
        for other in list(b.waiting):
            if other.status.value != "Idle":
                continue  # started active, inside KVM_RUN: an ioctl would wait for it
            b.mp_state_polls += 1
            if mp_state(other) == abi.KVM_MP_STATE_RUNNABLE:
                b.waiting.remove(other)
                other.activate()
                started += 1
        if _idle_waiting(b) and any(c.status.value != "Idle" for c in machine.cpus):
            _schedule_bring_up(machine, b, BRING_UP_POLL_TICKS if started
                               else min(b.poll_interval * 2, BRING_UP_POLL_MAX_TICKS))
        return started


def mp_state(cpu: KvmCPU) -> int:
    """``KVM_GET_MP_STATE`` of a vCPU (RUNNABLE, STOPPED, ...)."""
    buf = ffi.new("uint32_t *")
    cpu.vcpu.ioctl(abi.KVM_GET_MP_STATE, address_of(buf))
    return int(buf[0])


_EVENTS_SIZE = 64
KVM_GET_VCPU_EVENTS = None


@hookimpl
def arch_is_drained(cpu: KvmCPU) -> bool:
    """True when KVM holds no pending SError or external abort for the vCPU (interrupts
    pending in the vGIC are device state, saved with it)."""
    global KVM_GET_VCPU_EVENTS
    if KVM_GET_VCPU_EVENTS is None:
        from kvmfw.abi import IOC_READ, define_ioctl
        KVM_GET_VCPU_EVENTS = define_ioctl("KVM_GET_VCPU_EVENTS", IOC_READ, 0x9F, _EVENTS_SIZE)
    buf = ffi.new("uint8_t[]", _EVENTS_SIZE)
    try:
        cpu.vcpu.ioctl(KVM_GET_VCPU_EVENTS, address_of(buf))
    except KvmError:
        return True
    raw = bytes(ffi.buffer(buf))
    return not (raw[0] or raw[2])  # serror_pending, ext_dabt_pending


@hookimpl
def kvm_run_drain(cpu: KvmCPU) -> bool:
    """Let KVM run the vCPU for up to 1 ms: a pending SError or external abort is taken on
    entry (once the guest unmasks it), which is what ``arch_is_drained`` waits for. The exit
    is left for the next drain step to service. A powered-off secondary is not entered (KVM
    would only sleep in it until CPU_ON): drain then reports it as not drained."""
    if cpu in board_of(cpu.machine).waiting:
        return True
    cpu.run_slice(DRAIN_SLICE_TICKS)
    return True


# --- thread context -----------------------------------------------------------------------

def cpu_state(cpu: KvmCPU) -> ArmCpuState:
    st = board_of(cpu.machine).cpus.get(cpu.id)
    if st is None:
        raise StateError(f"vCPU {cpu.id} was not initialised by the armv8 plugin")
    return st


@hookimpl
def create_thread_context(cpu: KvmCPU) -> ArmV8Context:
    """A context holding the vCPU's initial state, every group pulled from KVM (the core
    treats a new context as pulled in full: an empty one would hide the reset values of
    the system registers until the first run)."""
    ctx = ArmV8Context(on_change=cpu.mark_context_dirty)
    pull(cpu, ctx, Group.ALL)
    return ctx


def pull(cpu: KvmCPU, ctx: ArmV8Context, groups: Group) -> None:
    """Read ``groups`` from KVM into ``ctx`` (no dirty marking)."""
    get = cpu.vcpu.get_one_reg
    st = cpu_state(cpu)
    if groups & Group.GPR:
        ctx.load_list("x", [get(r) for r in regs.X_IDS])
        ctx.load_scalar("sp_el0", get(regs.SP_EL0_ID))
        ctx.load_scalar("pc", get(regs.PC_ID))
        ctx.load_scalar("pstate", get(regs.PSTATE_ID))
    if groups & Group.EL1:
        ctx.load_scalar("sp_el1", get(regs.SP_EL1_ID))
        ctx.load_scalar("elr_el1", get(regs.ELR_EL1_ID))
        ctx.load_list("spsr", [get(r) for r in regs.SPSR_IDS])
    if groups & Group.FP:
        if not st.sve:
            ctx.load_list("v", [get(r) for r in regs.V_IDS])
        ctx.load_scalar("fpsr", get(regs.FPSR_ID))
        ctx.load_scalar("fpcr", get(regs.FPCR_ID))
    if groups & Group.SYS:
        values = {}
        for rid in st.other_ids:
            try:
                values[rid] = get(rid)
            except KvmError:  # listed but not readable now: keep the id, value unknown
                continue
        ctx.sysregs.load(values)
    ctx.set_valid(groups)


def push(cpu: KvmCPU, ctx: ArmV8Context, groups: Group, everything: bool = False) -> None:
    """Write ``groups`` of ``ctx`` to KVM. System registers: only the assigned ones, or all
    but the self-moving counters with ``everything``. Errors name every failed register."""
    st = cpu_state(cpu)
    put = cpu.vcpu.set_one_reg
    failures: list[tuple[str, KvmError]] = []

    def write(rid: int, value: int) -> None:
        try:
            put(rid, value)
        except KvmError as exc:
            failures.append((regs.name_of(rid), exc))

    if groups & Group.SYS and ctx.valid & Group.SYS:
        ids = (list(ctx.sysregs) if everything else list(ctx.dirty_sysregs))
        for rid in ids:
            if everything and rid in regs.VOLATILE_IDS and rid not in ctx.dirty_sysregs:
                continue
            if rid in ctx.sysregs:
                write(rid, ctx.sysregs[rid])
    if groups & Group.EL1 and ctx.valid & Group.EL1:
        write(regs.SP_EL1_ID, ctx.sp_el1)
        write(regs.ELR_EL1_ID, ctx.elr_el1)
        for rid, val in zip(regs.SPSR_IDS, ctx.spsr, strict=True):
            write(rid, val)
    if groups & Group.FP and ctx.valid & Group.FP:
        if not st.sve:
            for rid, val in zip(regs.V_IDS, ctx.v, strict=True):
                write(rid, val)
        write(regs.FPSR_ID, ctx.fpsr)
        write(regs.FPCR_ID, ctx.fpcr)
    if groups & Group.GPR and ctx.valid & Group.GPR:
        for rid, val in zip(regs.X_IDS, ctx.x, strict=True):
            write(rid, val)
        write(regs.SP_EL0_ID, ctx.sp_el0)
        write(regs.PSTATE_ID, ctx.pstate)
        write(regs.PC_ID, ctx.pc)
    ctx.clean(groups)
    if failures:
        raise RegisterSyncError(failures)


def _groups_for(level: SyncLevel) -> Group:
    if level >= SyncLevel.RESET:
        return Group.ALL
    return Group.GPR | Group.EL1


@hookimpl
def update_thread_context(cpu: KvmCPU, context: ArmV8Context, level: SyncLevel) -> bool:
    """Pull: RUNTIME reads the general and EL1 groups; RESET/FULL read everything."""
    pull(cpu, context, _groups_for(level))
    return True


@hookimpl
def update_kvm_state(cpu: KvmCPU, context: ArmV8Context, level: SyncLevel) -> bool:
    """Push the dirty groups; FULL pushes every valid group (all system registers)."""
    if level >= SyncLevel.FULL:
        push(cpu, context, Group.ALL, everything=True)
    else:
        push(cpu, context, context.dirty)
    return True


def init_features(cpu: KvmCPU) -> int:
    """The vCPU's ``KVM_ARM_VCPU_INIT`` features without POWER_OFF (a start condition)."""
    return cpu_state(cpu).features & ~(1 << abi.KVM_ARM_VCPU_POWER_OFF)


@hookimpl
def save_arch_state(cpu: KvmCPU) -> dict[str, Any]:
    """Every ONE_REG id of ``KVM_GET_REG_LIST`` (core, FP/SIMD or SVE, system, timer,
    firmware registers) and the MP state, as plain data (see ``state.py``)."""
    from kvmfw_armv8 import state as arm_state

    st = cpu_state(cpu)
    cpu.sync_kvm_state()  # context writes not yet pushed are part of the state
    values, unreadable, mp = arm_state.save(cpu.vcpu, st.reg_ids)
    return {"arch": "armv8", "format": arm_state.FORMAT, "mpidr": st.mpidr,
            "features": init_features(cpu), "mp_state": mp, "regs": values,
            "unreadable": unreadable}


@hookimpl
def restore_arch_state(cpu: KvmCPU, state: dict[str, Any]) -> bool:
    """Check everything, then write in ``state.restore_order`` (firmware, system, SVE,
    timer counter before compare before control, core registers, MP state last); the
    context is re-read from KVM afterwards."""
    from kvmfw_armv8 import state as arm_state

    st = cpu_state(cpu)
    values, mp = arm_state.check(state, st.reg_ids, st.mpidr, init_features(cpu))
    ctx: ArmV8Context = cpu.get_context(SyncLevel.FULL)  # pushes pending writes first
    arm_state.restore(cpu.vcpu, values, mp)
    pull(cpu, ctx, Group.ALL)
    ctx.clean(Group.ALL)
    return True


def _vgic_args(machine: Machine) -> tuple[str, KvmDevice, int, list[int]]:
    b = board_of(machine)
    assert b.vgic is not None
    nr = b.vgic.get_attr(abi.KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, size=4)
    return b.gic, b.vgic, nr, [b.cpus[c.id].mpidr for c in machine.cpus]


@hookimpl
def save_vm_state(machine: Machine) -> dict[str, Any]:
    """The vGIC (distributor, redistributors, CPU interfaces, SPI line levels)."""
    b = board_of(machine)
    return {"arch": "armv8", "gic": b.gic,
            "vgic": vgic.save(*_vgic_args(machine)) if b.vgic is not None else None}


@hookimpl
def restore_vm_state(machine: Machine, state: dict[str, Any]) -> bool:
    """Load ``save_vm_state`` output: checked whole first (``vgic.check``), then written in
    the kernel's order (``vgic.py``); before any vCPU's ``restore_arch_state``."""
    b = board_of(machine)
    if not isinstance(state, dict) or state.get("arch") != "armv8":
        raise StateError("VM state: not an armv8 VM state")
    if state.get("gic") != b.gic:
        raise StateError(f"VM state: gic {str(state.get('gic'))[:16]!r}, this machine has "
                         f"gic={b.gic} (start it with the checkpoint's gic option)")
    if b.vgic is not None:
        b.spi_levels = vgic.restore(state.get("vgic"), *_vgic_args(machine)) or {}
        for spi, line in b.spi_lines.items():
            line.level = b.spi_levels.get(abi.GIC_SPI_BASE + spi, line.level)
    return True


@hookimpl
def cpu_model(machine: Machine) -> dict[str, Any]:
    """What the guest sees of the CPU: ``KVM_ARM_VCPU_INIT`` target and features, SVE,
    the GIC, and vCPU 0's ID registers, cache geometry and firmware registers."""
    from kvmfw_armv8 import state as arm_state

    cpu = machine.cpus[0]
    st = cpu_state(cpu)
    return {"arch": "armv8", "target": st.target, "features": init_features(cpu),
            "sve": st.sve, "gic": board_of(machine).gic,
            "id_regs": arm_state.model(cpu.vcpu, st.reg_ids)}


@hookimpl
def check_cpu_model(machine: Machine, model: dict[str, Any]) -> str | None:
    """None if this host's KVM gives exactly ``model``, else the first field it cannot."""
    from kvmfw_armv8 import state as arm_state

    return arm_state.compare_model(model, cpu_model(machine))


# --- state dump --------------------------------------------------------------------------------

PSTATE_MODES = {0x0: "EL0t", 0x4: "EL1t", 0x5: "EL1h", 0x8: "EL2t", 0x9: "EL2h"}


def format_pstate(pstate: int) -> str:
    """``NZCV`` flags, DAIF mask and mode of a PSTATE value."""
    flags = "".join(c if pstate & (1 << b) else "-" for c, b in
                    (("N", 31), ("Z", 30), ("C", 29), ("V", 28)))
    daif = "".join(c if pstate & (1 << b) else "-" for c, b in
                   (("D", 9), ("A", 8), ("I", 7), ("F", 6)))
    mode = PSTATE_MODES.get(pstate & 0xF, f"mode{pstate & 0x1F:#x}")
    if pstate & 0x10:
        mode = "AArch32"
    return f"{flags} {daif} {mode}"


def format_context(ctx: ArmV8Context, sve: bool = False) -> str:
    """A readable dump of every group of ``ctx``."""
    lines = [f"PC {ctx.pc:#018x}  PSTATE {ctx.pstate:#010x} ({format_pstate(ctx.pstate)})"]
    for i in range(0, 31, 4):
        lines.append("  ".join(f"X{j:<2} {ctx.x[j]:#018x}" for j in range(i, min(i + 4, 31))))
    lines.append(f"SP_EL0 {ctx.sp_el0:#018x}  SP_EL1 {ctx.sp_el1:#018x}  "
                 f"ELR_EL1 {ctx.elr_el1:#018x}")
    lines.append("  ".join(f"{n} {v:#x}" for n, v in zip(regs.SPSR_BANKS, ctx.spsr,
                                                          strict=True)))
    lines.append(f"FPSR {ctx.fpsr:#010x}  FPCR {ctx.fpcr:#010x}")
    if not sve:
        for i in range(0, 32, 2):
            lines.append(f"V{i:<2} {ctx.v[i]:#034x}  V{i + 1:<2} {ctx.v[i + 1]:#034x}")
    for rid in sorted(ctx.sysregs):
        info = regs.decode(rid)
        lines.append(f"{info.name:<24} {ctx.sysregs[rid]:#x}")
    return "\n".join(lines)


@hookimpl
def dump_state(cpu: KvmCPU) -> str:
    """Every register group plus the instruction words at the PC."""
    ctx: ArmV8Context = cpu.context
    text = format_context(ctx, cpu_state(cpu).sve)
    from kvmfw_armv8 import aarch32

    if aarch32.is_aarch32(ctx):
        text += "\n" + aarch32.format_context(ctx)
    try:
        code = cpu.machine.memory.read(ctx.pc, 16)
        words = " ".join(f"{int.from_bytes(code[i:i + 4], 'little'):08x}"
                         for i in range(0, len(code), 4))
        text += f"\ncode at PC: {words}"
    except Exception:  # the PC may point outside RAM
        text += "\ncode at PC: (not in guest RAM)"
    return text


# --- loading -------------------------------------------------------------------------------

def _ram(machine: Machine) -> tuple[int, int]:
    return board.RAM_BASE, machine.config.memory


def _write(machine: Machine, addr: int, data: Any, what: str) -> None:
    """Copy ``data`` into guest RAM at ``addr`` after checking that it fits; a cached
    kernel (a :class:`~kvmfw.imagefile.FileMapping`) is read from its file instead, so
    no page of the mapping is faulted in."""
    base, size = _ram(machine)
    if addr < base or addr + len(data) > base + size:
        raise ImageError(f"{what} ({len(data)} bytes at {addr:#x}) does not fit guest RAM "
                         f"{base:#x}-{base + size:#x}: give the machine more memory")
    try:
        copy_into(machine.memory, addr, data, 0, len(data))
    except (OSError, EOFError) as exc:
        raise ImageError(f"cannot read {what} from its cached file: {exc}") from None


def _read_into(machine: Machine, addr: int, f: io.BufferedReader, what: str,
               length: int | None = None) -> int:
    """Read the open file ``f`` from its position to its end (``length`` bytes: its size,
    from ``fstat``) straight into guest RAM at ``addr``, after checking that it fits;
    returns the length. A file that shrinks while it is read is an :class:`ImageError`."""
    if length is None:
        length = os.fstat(f.fileno()).st_size - f.tell()
    base, size = _ram(machine)
    if addr < base or addr + length > base + size:
        raise ImageError(f"{what} ({length} bytes at {addr:#x}) does not fit guest RAM "
                         f"{base:#x}-{base + size:#x}: give the machine more memory")
    view = machine.memory.view(addr, length)
    got = 0
    while got < length:
        n = f.readinto(view[got:])
        if not n:
            raise ImageError(f"{what} {getattr(f, 'name', '')}: {length - got} bytes missing "
                             "(the file shrank while it was read)")
        got += n
    machine.memory.mark_dirty(addr, length)
    return length


def make_dtb(machine: Machine, cmdline: str = "", initrd: tuple[int, int] | None = None,
             virtio: list[int] | None = None, kaslr_seed: int | None = None) -> bytes:
    """The device tree of ``machine`` as booted (memory, vCPUs' MPIDRs, GIC, ...)."""
    b = board_of(machine)
    base, size = _ram(machine)
    spec = board.DeviceTreeSpec(
        ram_base=base, ram_size=size,
        mpidrs=[b.cpus[c.id].mpidr for c in machine.cpus if c.id in b.cpus],
        gic=b.gic, cmdline=cmdline, initrd=initrd, uart=not machine.devices,
        pmu="pmu" in b.config.features, virtio=virtio or [],
        devices=board.firmware_nodes(machine.devices), kaslr_seed=kaslr_seed)
    return board.build_dtb(spec)


def _kaslr_seed(options: dict[str, Any]) -> int | None:
    """The device tree's ``kaslr-seed`` as the ``kaslr`` option asks (random unless it
    gives a seed; None for ``off``): an arm64 kernel randomizes its own address with it,
    unless its command line says ``nokaslr``. Never 0, which the kernel reads as none."""
    seed = seed_option("kaslr", options.get("kaslr"))
    return None if seed is None else draw(seed, 1)[0] or 1


@hookimpl
def load_guest(machine: Machine, image: str, options: dict[str, Any]) -> bool:
    """Load an arm64 Image (optionally gzip-compressed), an AArch64 ELF or a flat binary;
    place the initrd and the generated device tree; set the boot vCPU's entry state.

    An uncompressed Image and the initrd are read straight into guest RAM (after their
    size is checked against it): no host copy of tens of MiB to fault in and copy again,
    which is most of the loading time on a slow host."""
    base, size = _ram(machine)
    b = board_of(machine)
    a32 = A32_FEATURE in b.config.features
    entry, end = _place_kernel(machine, image, options, base, a32)
    top = base + size
    dtb_addr = (top - board_len_2m()) & ~(loader.SZ_2M - 1)
    initrd = None
    if options.get("initrd"):
        initrd = _place_initrd(machine, options["initrd"], options, end, dtb_addr)
    dtb = make_dtb(machine, str(options.get("cmdline") or ""), initrd,
                   kaslr_seed=_kaslr_seed(options))
    if len(dtb) > loader.SZ_2M:
        raise ImageError("the generated device tree exceeds 2 MiB")
    _write(machine, dtb_addr, dtb, "device tree")
    b.dtb_addr, b.dtb, b.initrd = dtb_addr, dtb, initrd
    cpu = machine.cpus[0]
    ctx: ArmV8Context = cpu.get_context(SyncLevel.RUNTIME)
    if a32:
        from kvmfw_armv8 import aarch32

        aarch32.boot_registers(ctx, entry, dtb_addr)
        return True
    ctx.x[:] = [dtb_addr, 0, 0, 0] + [0] * 27
    ctx.pstate = loader.PSTATE_EL1H_DAIF
    ctx.pc = entry
    return True


def _place_initrd(machine: Machine, path: str, options: dict[str, Any], floor: int,
                  top: int) -> tuple[int, int]:
    """Put the initrd below ``top`` (64 KiB aligned) and above ``floor``; its guest range.
    Unless ``decompress=guest``, a Linux initramfs goes in with its compressed parts
    decompressed on the host, cached (:mod:`kvmfw.initramfs`), when that fits."""
    if (options.get("decompress") or "host") == "host":
        flat = initramfs.uncompressed(path, top - floor, log.info)
        if flat is not None:
            try:
                start = (top - len(flat)) & ~0xFFFF
                if start >= floor:
                    copy_into(machine.memory, start, flat, 0, len(flat))
                    return start, start + len(flat)
            finally:
                if isinstance(flat, mmap.mmap):
                    flat.close()
    with open(path, "rb") as f:
        n = os.fstat(f.fileno()).st_size
        start = (top - n) & ~0xFFFF
        if start < floor:
            raise ImageError("the initrd overlaps the kernel: give the machine more memory")
        _read_into(machine, start, f, "initrd", n)
    return start, start + n


def _place_kernel(machine: Machine, image: str, options: dict[str, Any], base: int,
                  a32: bool) -> tuple[int, int]:
    """Put the kernel in guest RAM; ``(entry, end of the kernel)``."""
    with open(image, "rb") as f:
        head = f.read(loader.IMAGE_HEADER_SIZE)
        if not a32 and loader.is_image(head):
            hdr = loader.parse_image_header(head)
            entry = loader.image_load_address(hdr, base)
            f.seek(0)
            length = _read_into(machine, entry, f, "kernel Image")
            return entry, entry + max(hdr.image_size, length)
        if head[:2] == loader.GZIP_MAGIC:
            # a vmlinuz: gunzipped once per kernel file and cached (every later boot maps
            # the cached Image; seconds per boot where the host is emulated)
            from kvmfw import cache

            limit = _ram(machine)[1]  # (nor is more than it of the compressed file read)
            data = cache.derived(image, "arm64-kernel", "gunzip-1",
                                 lambda: loader.maybe_decompress(head + f.read(limit), limit))
        else:  # (one byte more than RAM holds is enough for _write to refuse it)
            data = head + f.read(_ram(machine)[1] + 1)
    try:
        return _place_data(machine, data, options, base, a32)
    finally:
        if isinstance(data, mmap.mmap):
            data.close()


def _place_data(machine: Machine, data: Any, options: dict[str, Any], base: int,
                a32: bool) -> tuple[int, int]:
    from kvmfw_armv8 import aarch32  # (not for the common case above: an arm64 Image)

    if a32 and (loader.is_image(data) or (loader.is_elf(data) and not aarch32.is_elf32(data))):
        raise ImageError("a 64-bit kernel cannot boot on an el1_32bit vCPU: give a zImage, "
                         "an ARM ELF32 or a flat binary, or drop arm_features=el1_32bit")
    if not a32 and (aarch32.is_zimage(data) or aarch32.is_elf32(data)):
        raise ImageError("a 32-bit ARM image needs an AArch32 vCPU: add "
                         "--option arm_features=el1_32bit")
    if a32 and aarch32.is_zimage(data):
        aarch32.parse_zimage(data)
        entry = base + aarch32.ZIMAGE_LOAD_OFFSET
        _write(machine, entry, data, "zImage")
        end = entry + len(data)
    elif a32 and aarch32.is_elf32(data):
        entry, segs = aarch32.parse_elf32(data)
        end = base
        for s in segs:
            _write(machine, s.addr, s.data + bytes(s.memsz - len(s.data)), "ELF32 segment")
            end = max(end, s.addr + s.memsz)
    elif loader.is_image(data):
        hdr = loader.parse_image_header(data)
        entry = loader.image_load_address(hdr, base)
        _write(machine, entry, data, "kernel Image")
        end = entry + max(hdr.image_size, len(data))
    elif loader.is_elf(data):
        entry, segs = loader.parse_elf(data)
        end = base
        for s in segs:
            _write(machine, s.addr, s.data + bytes(s.memsz - len(s.data)), "ELF segment")
            end = max(end, s.addr + s.memsz)
    else:
        entry = int(options.get("load_addr") or base)
        _write(machine, entry, data, "flat binary")
        end = entry + len(data)
    return entry, end


def board_len_2m() -> int:
    """Room reserved at the top of RAM for the device tree."""
    return loader.SZ_2M


# --- GDB stub (kvmfw.gdb; the implementations are in kvmfw_armv8.gdb) -------------------------

@hookimpl
def gdb_target(cpu: KvmCPU) -> Any:
    from kvmfw_armv8 import gdb

    return gdb.target(cpu)


@hookimpl
def gdb_read_registers(cpu: KvmCPU) -> list[bytes]:
    from kvmfw_armv8 import gdb

    return gdb.read_registers(cpu)


@hookimpl
def gdb_write_register(cpu: KvmCPU, regnum: int, value: bytes) -> bool:
    from kvmfw_armv8 import gdb

    return gdb.write_register(cpu, regnum, value)


@hookimpl
def gdb_set_guest_debug(cpu: KvmCPU, step: bool, breakpoints: list[Any]) -> bool:
    from kvmfw_armv8 import gdb

    return gdb.set_guest_debug(cpu, step, breakpoints)


@hookimpl
def gdb_translate(cpu: KvmCPU, vaddr: int) -> int | None:
    from kvmfw_armv8 import gdb

    return gdb.translate(cpu, vaddr)


@hookimpl
def gdb_debug_exit(cpu: KvmCPU) -> Any:
    from kvmfw_armv8 import gdb

    return gdb.debug_exit(cpu)
