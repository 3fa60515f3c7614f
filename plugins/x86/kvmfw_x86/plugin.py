"""The x86 architecture plugin: the hook implementations the kvmfw core calls.

Registered under the ``kvmfw.arch`` entry point ``x86`` as :data:`plugin`. One plugin
object serves every machine; per-machine state lives in :class:`X86Machine`
(``X86Plugin.state(machine)``), per-vCPU state in the thread context.

Machine options (``MachineConfig.options``): ``irqchip`` (``kernel`` — the default,
in-kernel PIC/IOAPIC/LAPIC + PIT — or ``userspace``: interrupts injected with
``KVM_INTERRUPT``/``KVM_NMI``, with userspace local APICs for IPIs and INIT/SIPI),
``acpi`` (``on``/``off``: the ACPI tables beside the MP tables for ELF, multiboot and
bzImage guests; default on, as QEMU's firmware always provides them), ``reboot``
(``on``, the default, as QEMU: a guest reset — i8042 reset line with ``reboot=k``, triple
fault, reset control register 0xCF9, the ACPI reset register — resets the vCPUs, the
devices and the in-kernel irqchip and loads the guest again; ``off``, the CLI's
``--no-reboot``: the run ends with status 0; ``reboot_limit``, default 100, ends a reset
loop; resets are counted in ``system.reset``), ``cpuid`` (a
:class:`~kvmfw_x86.cpuid.CpuidModel` or its dict; ``hyperv`` in it adds Hyper-V
enlightenments, :mod:`kvmfw_x86.hyperv`; every guest sees the hypervisor bit and KVM's PV
leaf, :func:`~kvmfw_x86.cpuid.paravirt`), ``x86_sync`` (``lazy`` — per-group —
or ``eager``: gem5's all-or-nothing pull), ``decompress`` (``host``, the default: a
bzImage's kernel proper is decompressed on the host, cached, and entered directly,
:mod:`kvmfw_x86.vmlinux`; ``guest``: the bzImage decompresses itself).
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from kvmfw.abi import Cap
from kvmfw.debug import get_logger
from kvmfw.errors import CheckpointError, ConfigError, KvmError, StateError
from kvmfw.hookspecs import SyncLevel, hookimpl
from kvmfw.timer import CycleSource

from kvmfw_x86 import KVMFW_PLUGIN_API as KVMFW_PLUGIN_API
from kvmfw_x86 import cpuid as cpuid_mod
from kvmfw_x86 import irqrouting
from kvmfw_x86.abi import X, addr, ffi, lib
from kvmfw_x86.context import (
    MSR_MTRR_CAP,
    MSR_MTRR_DEF_TYPE,
    MTRR_FIXED,
    MTRR_VAR_BASE,
    MTRR_VAR_MAX,
    CpuInfo,
    X86Context,
)
from kvmfw_x86.interrupts import UserspaceInterrupts
from kvmfw_x86.lapic import LAPIC_ADDR, LAPIC_SIZE, UserspaceLapics, per_cpu_address
from kvmfw_x86.pio import PCI_ADDR_PORT, PortIo

log = get_logger("kvmfw.x86")

GUESTS = os.path.join(os.path.dirname(__file__), "guests")
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000
PCI_HOLE = 0xC0000000
"""RAM above 3 GiB is mapped above 4 GiB (the PCI/MMIO hole of a PC)."""
MSR_IA32_TSC = 0x10
MSR_TSC_DEADLINE = 0x6E0
MP_STATE_MAX = 8
"""The highest ``KVM_MP_STATE_*`` (AP_RESET_HOLD)."""


class X86Machine:
    """Per-machine x86 state: options, supported CPUID, MSR list, port IO, interrupts."""

    def __init__(self, machine: Any) -> None:
        opts = machine.config.options
        self.machine = machine
        self.irqchip = str(opts.get("irqchip", "kernel"))
        if self.irqchip not in ("kernel", "userspace"):
            raise ConfigError(f"irqchip must be 'kernel' or 'userspace', not {self.irqchip!r}")
        self.eager = str(opts.get("x86_sync", "lazy")) == "eager"
        model = opts.get("cpuid")
        self.cpuid_model = model if isinstance(model, cpuid_mod.CpuidModel) else \
            cpuid_mod.CpuidModel.from_options(model)
        self.pio = PortIo(machine)
        self.interrupts = UserspaceInterrupts(machine)
        self.lapics: UserspaceLapics | None = None
        # what handle_exit_io and finalize_mmio_address answer before the bus: never taken
        # for unclaimed by the compiled exit path (kvmfw.fastpath)
        machine.bus.pio.reserve(PCI_ADDR_PORT, 8, "pci-config")
        if self.irqchip == "userspace":
            self.lapics = UserspaceLapics(machine, self.interrupts, machine.config.cpus)
            machine.bus.mmio.reserve(LAPIC_ADDR, LAPIC_SIZE, "local-apic")
        self._cpuid: list[cpuid_mod.CpuidEntry] | None = None
        self._info: CpuInfo | None = None
        self.tsc_khz = 0
        self.power_on: Any = None
        """:class:`kvmfw_x86.reset.PowerOn`, recorded when the machine is built."""
        self.tsc_khz_source = ""
        """Where :attr:`tsc_khz` came from (``KVM_GET_TSC_KHZ``, or why it was measured)."""

    @property
    def cpuid(self) -> list[cpuid_mod.CpuidEntry]:
        """The CPUID table every vCPU gets (before per-vCPU APIC ids): a restored
        checkpoint's (``machine.cpu_model``), else this host's with the ``cpuid`` option."""
        if self._cpuid is None and getattr(self.machine, "cpu_model", None) is not None:
            self._cpuid = _checkpointed_cpuid(self, self.machine.cpu_model)
        if self._cpuid is None:
            kvm = self.machine.kvm
            entries = cpuid_mod.paravirt(
                cpuid_mod.supported_cpuid(kvm.fd), self.irqchip == "kernel",
                bool(kvm.check_extension(Cap.TSC_DEADLINE_TIMER)))
            if self.cpuid_model is not None:
                entries = self.cpuid_model.apply(entries)
                if self.cpuid_model.hyperv:
                    from kvmfw_x86 import hyperv

                    hv = hyperv.supported(self.machine.kvm, self.machine.vm.vcpus[0]
                                          if self.machine.vm.vcpus else None)
                    entries = hyperv.apply(entries, hv, self.cpuid_model.hyperv)
            self._cpuid = entries
        return self._cpuid

    def cpu_info(self, vcpu: Any) -> CpuInfo:
        if self._info is None:
            kvm = self.machine.kvm
            # the XSAVE2 size depends on the VM (guest XSTATE permissions taken at VM
            # creation): ask the VM fd, as the KVM API says, never the system fd
            xsave2 = self.machine.vm.check_extension(Cap.XSAVE2)
            offsets: dict[int, tuple[int, int]] = {}
            d0 = cpuid_mod.find(self.cpuid, 0xD, 0)
            xcr0_bits = d0.eax | (d0.edx << 32) if d0 else 3
            for e in self.cpuid:
                if e.function == 0xD and e.index >= 2 and xcr0_bits >> e.index & 1 and e.eax:
                    offsets[e.index] = (e.ebx, e.eax)
            self._info = CpuInfo(
                use_sregs2=bool(kvm.check_extension(Cap.SREGS2)),
                xsave_size=max(xsave2, 4096) if kvm.check_extension(Cap.XSAVE) else 4096,
                msr_indices=readable_msrs(kvm.fd, vcpu) + mtrr_msrs(self.cpuid, vcpu),
                xsave_offsets=offsets,
                has_xcrs=bool(kvm.check_extension(Cap.XCRS)),
                has_debugregs=bool(kvm.check_extension(Cap.DEBUGREGS)),
                has_events=bool(kvm.check_extension(Cap.VCPU_EVENTS)))
        return self._info


def _checkpointed_cpuid(st: X86Machine, model: Any) -> list[cpuid_mod.CpuidEntry]:
    """The CPUID table of a checkpoint's CPU model, once this host's KVM is known to give
    every feature in it: the restored guest sees the CPU it was saved on (vendor,
    family/model, cache and topology leaves, features), not whatever this host adds."""
    from kvmfw_x86 import state

    why = state.check_cpu_model(st, model)
    if why:
        raise CheckpointError(f"this host cannot give the guest its CPU: {why}")
    return [cpuid_mod.CpuidEntry(*e) for e in model["cpuid"]]


def msr_index_list(kvm_fd: int) -> list[int]:
    """``KVM_GET_MSR_INDEX_LIST``: every MSR KVM saves and restores."""
    from kvmfw.abi import ioctl

    n = 64
    while True:
        buf = ffi.new("uint32_t[]", n + 1)
        buf[0] = n
        try:
            ioctl(kvm_fd, X.KVM_GET_MSR_INDEX_LIST, addr(buf))
            return [int(buf[i + 1]) for i in range(int(buf[0]))]
        except KvmError as exc:
            if exc.errno != 7 or n > 65536:  # E2BIG
                raise
            n = max(int(buf[0]), n * 2)


_MSR_BATCH = 64
"""MSRs asked for per ``KVM_GET_MSRS`` while probing which ones read back."""


def _read_msrs(vcpu: Any, indices: list[int], batch: int = _MSR_BATCH) -> dict[int, int]:
    """The MSRs of ``indices`` that ``vcpu`` reads back, with their values.

    ``KVM_GET_MSRS`` reads its entries in order and stops at the first it refuses,
    returning how many it read: a batch that comes back short has its entry ``got``
    refused, and the probe goes on after it. Batched, the start-up probe is a couple of
    ioctls instead of one per MSR (~70 on a modern host)."""
    size = ffi.sizeof("struct kvm_msrs")
    ent_size = ffi.sizeof("struct kvm_msr_entry")
    buf = ffi.new("uint8_t[]", size + batch * ent_size)
    hdr = ffi.cast("struct kvm_msrs *", buf)
    ents = ffi.cast("struct kvm_msr_entry *", buf + size)
    out: dict[int, int] = {}
    pos = 0
    while pos < len(indices):
        todo = indices[pos:pos + batch]
        hdr.nmsrs = len(todo)
        for i, index in enumerate(todo):
            ents[i].index = index
            ents[i].data = 0
        try:
            got = vcpu.ioctl(X.KVM_GET_MSRS, addr(buf))
        except KvmError:
            got = 0  # the whole call refused: take its first entry as the refused one
        got = max(0, min(int(got), len(todo)))
        for i in range(got):
            out[todo[i]] = int(ents[i].data)
        # A short batch: entry ``got`` was refused; skip it. A full batch skips nothing.
        pos += got + (got < len(todo))
    return out


def _read_msr(vcpu: Any, index: int) -> int | None:
    """One MSR of ``vcpu`` (``KVM_GET_MSRS``), or None when KVM refuses it."""
    return _read_msrs(vcpu, [index], 1).get(index)


def readable_msrs(kvm_fd: int, vcpu: Any) -> list[int]:
    """The listed MSRs this vCPU reads back (KVM lists some it then refuses)."""
    listed = msr_index_list(kvm_fd)
    values = _read_msrs(vcpu, listed)
    out = [m for m in listed if m in values]
    skipped = len(listed) - len(out)
    if skipped:
        log.debug("%d listed MSRs do not read back and are not synced", skipped)
    return out


def mtrr_msrs(cpuid: list[cpuid_mod.CpuidEntry], vcpu: Any) -> list[int]:
    """The MTRR MSRs to sync and checkpoint, when the CPUID offers MTRRs (as QEMU does):
    the default type, the fixed ranges and MTRRcap.VCNT variable pairs (bounded by
    :data:`MTRR_VAR_MAX`), those this vCPU reads back. KVM emulates them (the guest's
    firmware, here the loader, enables them) but does not list them for saving. MTRRcap
    itself is read-only."""
    leaf1 = cpuid_mod.find(cpuid, 1)
    if leaf1 is None or not leaf1.edx >> cpuid_mod.FEATURES["mtrr"][3] & 1:
        return []
    cap = _read_msr(vcpu, MSR_MTRR_CAP)
    if cap is None:
        return []
    pairs = min(cap & 0xFF, MTRR_VAR_MAX)
    wanted = [MSR_MTRR_DEF_TYPE, *MTRR_FIXED, *range(MTRR_VAR_BASE, MTRR_VAR_BASE + 2 * pairs)]
    values = _read_msrs(vcpu, wanted)
    return [m for m in wanted if m in values]


class X86Plugin:
    """Hook implementations for x86-64 (see the module docstring)."""

    # What kvmfw.config checks before a machine is built (see its "declares" note).
    machine_options = {
        "irqchip": ("kernel", "userspace"),
        "acpi": ("auto", "on", "off", "1", "0", "true", "false", "yes", "no"),
        "cpuid": None, "x86_sync": ("lazy", "eager"),
        "format": ("flat", "elf", "multiboot", "bzimage"),
        "decompress": ("host", "guest"), "kaslr": None,
    }
    host_machines = ("x86_64", "amd64")
    max_cpus = 255
    max_cpus_why = ("x86 APIC ids in the MP table and the MADT are 8-bit and 0xff is the "
                    "broadcast id")
    min_memory = 1 << 20
    min_memory_why = "the x86 board keeps its MP and ACPI tables at 0xe0000-0xfffff"

    def __init__(self) -> None:
        self._machines: weakref.WeakKeyDictionary[Any, X86Machine] = weakref.WeakKeyDictionary()

    def state(self, machine: Any) -> X86Machine:
        st = self._machines.get(machine)
        if st is None:
            st = self._machines[machine] = X86Machine(machine)
        return st

    # --- lifecycle ----------------------------------------------------------------------

    @hookimpl
    def arch_name(self) -> str:
        return "x86"

    @hookimpl
    def memory_layout(self, machine: Any, size: int) -> list[tuple[int, int, str]]:
        if size <= PCI_HOLE:
            return [(0, size, "ram")]
        return [(0, PCI_HOLE, "ram-low"), (1 << 32, size - PCI_HOLE, "ram-high")]

    @hookimpl
    def machine_configure(self, machine: Any) -> None:
        st = self.state(machine)
        vm = machine.vm
        vm.set_tss_addr(TSS_ADDR)
        if st.irqchip == "kernel":
            vm.create_irqchip()
            irqrouting.install(machine)
            pit = ffi.new("struct kvm_pit_config *")
            pit.flags = lib.KVM_PIT_SPEAKER_DUMMY
            from kvmfw.abi import ioctl

            ioctl(vm.fd, X.KVM_CREATE_PIT2, addr(pit), "in-kernel PIT")
        elif st.lapics is not None:
            from kvmfw.device import Range

            from kvmfw_x86.lapic import PERCPU_BASE

            machine.map_device(Range("mmio", PERCPU_BASE, st.lapics.size, "lapic"), st.lapics)

    @hookimpl
    def machine_created(self, machine: Any) -> None:
        from kvmfw_x86 import reset

        st = self.state(machine)
        if st.irqchip == "kernel" and len(machine.cpus) > 1:
            refresh_apic_map(machine)
        st.power_on = reset.record(machine, st.irqchip == "kernel")

    @hookimpl
    def vcpu_reset(self, cpu: Any) -> bool:
        from kvmfw_x86 import reset

        st = self.state(cpu.machine)
        reset.reset_vcpu(cpu, st.power_on, st)
        return True

    @hookimpl
    def reset_machine(self, machine: Any, wakeup: bool) -> bool:
        """Reboot: in-kernel irqchip and PIT to power-on, the guest loaded again as the
        last ``load_guest`` did. Wake-up (ACPI S3): real mode at the FACS waking vector;
        none set: False (the core reboots instead, as SeaBIOS does)."""
        from kvmfw_x86 import loaders, reset

        st = self.state(machine)
        if wakeup:
            vector = reset.waking_vector(machine)
            if not vector:
                return False
            reset.enter_wake_vector(machine, vector)
            return True
        reset.reset_vm(machine, st.power_on)
        if st.irqchip == "kernel" and len(machine.cpus) > 1:
            refresh_apic_map(machine)
        boot = loaders.last_boot(machine)
        if boot is None:
            raise StateError("the guest reset, but no image was loaded through the x86 "
                             "loaders: there is nothing to load again (run with reboot=off)")
        loaders.load(machine, *boot)
        return True

    @hookimpl
    def vcpu_init(self, cpu: Any) -> None:
        st = self.state(cpu.machine)
        entries = cpuid_mod.for_vcpu(st.cpuid, cpu.id, cpu.machine.config.cpus)
        buf = cpuid_mod.pack_cpuid2(entries)
        cpu.vcpu.ioctl(X.KVM_SET_CPUID2, addr(buf), "KVM_SET_CPUID2")
        if st.cpuid_model is not None and st.cpuid_model.hyperv:
            from kvmfw_x86 import hyperv

            hyperv.enable_vcpu(cpu.vcpu, st.cpuid)
        if st.irqchip == "kernel" and hasattr(cpu, "start_active"):
            # APs wait inside KVM (MP state UNINITIALIZED) until the in-kernel LAPIC
            # delivers INIT/SIPI, so every vCPU thread enters KVM from the start
            cpu.start_active = True
        if not st.tsc_khz:
            st.tsc_khz, st.tsc_khz_source = vcpu_tsc_khz(cpu.vcpu)
        _exit_shortcuts(cpu, st)

    @hookimpl
    def create_thread_context(self, cpu: Any) -> X86Context:
        st = self.state(cpu.machine)
        return X86Context(cpu, st.cpu_info(cpu.vcpu), eager=st.eager)

    # --- sync ---------------------------------------------------------------------------

    @hookimpl
    def update_kvm_state(self, cpu: Any, context: X86Context, level: SyncLevel) -> int:
        """Push; returns the number of KVM ioctls issued (0: nothing needed writing)."""
        return context.push_dirty(level)

    @hookimpl
    def update_thread_context(self, cpu: Any, context: X86Context, level: SyncLevel) -> int:
        """Pull (lazy: invalidate only; eager/always_sync: every group); returns the number
        of KVM ioctls issued."""
        return context.pull(level)

    # --- exits ----------------------------------------------------------------------------

    @hookimpl
    def handle_exit_io(self, cpu: Any, io: Any) -> bool:
        handle = getattr(cpu, "x86_port_io", None) or self.state(cpu.machine).pio.handle
        return handle(cpu, io)  # type: ignore[no-any-return]

    @hookimpl
    def finalize_mmio_address(self, cpu: Any, address: int) -> int | None:
        """Userspace irqchip: the APIC page is per CPU (gem5's ``x86LocalAPICAddress``)."""
        if LAPIC_ADDR <= address < LAPIC_ADDR + LAPIC_SIZE and \
                self.state(cpu.machine).lapics is not None:
            return per_cpu_address(cpu.id, address)
        return None

    @hookimpl
    def deliver_interrupts(self, cpu: Any) -> bool:
        return self.state(cpu.machine).interrupts.deliver(cpu)

    @hookimpl
    def irq_line(self, machine: Any, number: int) -> Any:
        st = self.state(machine)
        if st.irqchip == "userspace":
            return st.interrupts.line(number)
        return None  # the core drives KVM_IRQ_LINE on the in-kernel irqchip

    @hookimpl
    def get_host_cycles(self, cpu: Any) -> CycleSource:
        """The host TSC at the rate KVM gives the vCPU (``KVM_GET_TSC_KHZ``; measured
        against ``CLOCK_MONOTONIC`` if KVM does not say). A source of host cycles: the
        core's compiled entry times each ``KVM_RUN`` and scales the time to this rate, so
        the exit path reads no counter (``read`` serves the occasional direct reading).

        Which clock each part follows: simulated time (the event queue) advances by the
        host TSC cycles spent inside ``KVM_RUN`` (times ``host_factor``). The guest's TSC
        is the host TSC plus KVM's offset (no scaling unless ``KVM_SET_TSC_KHZ``): it runs
        on while the host services an exit, while the vCPU is halted in userspace, and
        while the process is descheduled; kvmfw moves it only when the host sets the TSC
        MSR (``set_msr``, a restore), never by pushing back a value it read. The in-kernel
        LAPIC timer (TSC-deadline included), the PIT (which re-injects missed ticks) and
        kvmclock run on host ``CLOCK_MONOTONIC`` hrtimers. So all of them follow host time,
        and lead simulated time by the service and idle time. The userspace irqchip models
        no APIC timer: its timers are devices on the event queue (simulated time)."""
        st = self.state(cpu.machine)
        if not st.tsc_khz:
            st.tsc_khz, st.tsc_khz_source = vcpu_tsc_khz(cpu.vcpu)
        _exit_shortcuts(cpu, st)
        khz = st.tsc_khz
        return CycleSource("tsc", lib.kvmfw_x86_rdtsc, khz * 1000.0,
                           note=f"host TSC at {khz / 1000:.1f} MHz (rdtsc, no syscall; "
                                f"rate from {st.tsc_khz_source})")

    # --- guests ---------------------------------------------------------------------------

    @hookimpl
    def load_guest(self, machine: Any, image: str, options: dict[str, Any]) -> bool:
        from kvmfw_x86 import loaders

        return loaders.load(machine, image, options)

    @hookimpl
    def default_guest(self, machine: Any) -> str:
        return os.path.join(GUESTS, "default.elf")

    # no default_devices hook: the PC board is the ``kvmfw.boards`` entry point ``x86``
    # (kvmfw-devices publishes it; any package may), so this plugin imports no other

    # --- drain and state ---------------------------------------------------------------

    @hookimpl
    def arch_is_drained(self, cpu: Any) -> bool:
        ctx: X86Context = cpu.context
        if not ctx.info.has_events:
            return True
        ctx.invalidate()
        ev = ctx.events
        e = ev["exception"]
        if e["injected"] or e["pending"] or ev["interrupt"]["injected"] \
                or ev["nmi"]["injected"] or ev["nmi"]["pending"]:
            return False
        return True

    @hookimpl
    def kvm_run_drain(self, cpu: Any) -> bool:
        """Ask for an interrupt window and run up to 1 ms so KVM delivers what is pending."""
        cpu.vcpu.run.request_interrupt_window = 1
        try:
            cpu.run_slice(1_000_000_000)  # 1 ms in ticks
        finally:
            cpu.vcpu.run.request_interrupt_window = 0
        return True

    @hookimpl
    def save_arch_state(self, cpu: Any) -> dict[str, Any]:
        """Every register group, with the in-kernel irqchip this vCPU's local APIC
        (``KVM_GET_LAPIC``) and MP state, else the userspace irqchip's pending
        interrupts (see :mod:`kvmfw_x86.state`)."""
        from kvmfw_x86 import state

        return state.save_vcpu(self.state(cpu.machine), cpu)

    @hookimpl
    def restore_arch_state(self, cpu: Any, state: dict[str, Any]) -> bool:
        """Load :meth:`save_arch_state` output in the order :mod:`kvmfw_x86.state`
        documents. Everything is checked before KVM sees it (StateError: malformed,
        oversized, or from another irqchip mode or host)."""
        from kvmfw_x86 import state as state_mod

        state_mod.restore_vcpu(self.state(cpu.machine), cpu, state)
        return True

    @hookimpl
    def save_vm_state(self, machine: Any) -> dict[str, Any]:
        """PICs, IO-APIC and PIT (in-kernel irqchip) and the KVM clock."""
        from kvmfw_x86 import state

        return state.save_vm(self.state(machine))

    @hookimpl
    def restore_vm_state(self, machine: Any, state: dict[str, Any]) -> bool:
        from kvmfw_x86 import state as state_mod

        state_mod.restore_vm(self.state(machine), state)
        return True

    @hookimpl
    def cpu_model(self, machine: Any) -> dict[str, Any]:
        """The CPUID table the vCPUs were given, the TSC rate and the XSAVE size."""
        from kvmfw_x86 import state

        return state.cpu_model(self.state(machine))

    @hookimpl
    def check_cpu_model(self, machine: Any, model: dict[str, Any]) -> str | None:
        from kvmfw_x86 import state

        return state.check_cpu_model(self.state(machine), model)

    @hookimpl
    def dump_state(self, cpu: Any) -> str:
        from kvmfw_x86.dump import dump

        return dump(cpu)

    # --- emulated CPU (kvmfw.emu; the glue is kvmfw_x86.emu) -----------------------------

    @hookimpl
    def emu_glue(self, cpu: Any) -> Any:
        from kvmfw_x86.emu import X86EmuGlue  # Unicorn is optional: import on use
        return X86EmuGlue()

    # --- GDB stub (kvmfw.gdb; the implementations are in kvmfw_x86.gdb) -------------------

    @hookimpl
    def gdb_target(self, cpu: Any) -> Any:
        from kvmfw_x86 import gdb

        return gdb.target(cpu)

    @hookimpl
    def gdb_read_registers(self, cpu: Any) -> list[bytes]:
        from kvmfw_x86 import gdb

        return gdb.read_registers(cpu)

    @hookimpl
    def gdb_write_register(self, cpu: Any, regnum: int, value: bytes) -> bool:
        from kvmfw_x86 import gdb

        return gdb.write_register(cpu, regnum, value)

    @hookimpl
    def gdb_set_guest_debug(self, cpu: Any, step: bool, breakpoints: list[Any]) -> bool:
        from kvmfw_x86 import gdb

        return gdb.set_guest_debug(cpu, step, breakpoints)

    @hookimpl
    def gdb_translate(self, cpu: Any, vaddr: int) -> int | None:
        from kvmfw_x86 import gdb

        return gdb.translate(cpu, vaddr)

    @hookimpl
    def gdb_debug_exit(self, cpu: Any) -> Any:
        from kvmfw_x86 import gdb

        return gdb.debug_exit(cpu)


def refresh_apic_map(machine: Any) -> None:
    """Write each in-kernel local APIC back (``KVM_GET_LAPIC``/``KVM_SET_LAPIC``), as QEMU
    does at reset.

    KVM routes physically addressed IPIs (Linux's and the MP spec's INIT/SIPI) through an
    APIC-id map that it rebuilds when an APIC's id, base or enable bit changes. Each
    vCPU's reset rebuilds it while that vCPU is being created and not yet visible, so
    the last vCPU is never in the map: an INIT sent to it by APIC id is dropped silently
    (shorthand IPIs, which skip the map, still arrive). ``KVM_SET_LAPIC`` rebuilds it.
    """
    for cpu in machine.cpus:
        state = ffi.new("struct kvm_lapic_state *")
        cpu.vcpu.ioctl(X.KVM_GET_LAPIC, addr(state), "KVM_GET_LAPIC")
        cpu.vcpu.ioctl(X.KVM_SET_LAPIC, addr(state), "KVM_SET_LAPIC")


def vcpu_tsc_khz(vcpu: Any) -> tuple[int, str]:
    """The vCPU's TSC rate in kHz (``KVM_GET_TSC_KHZ``: the rate KVM gives the guest,
    the host's unless scaled) and where it came from; measured if KVM does not say."""
    try:
        kvm_khz = vcpu.ioctl(X.KVM_GET_TSC_KHZ)
    except KvmError as exc:
        why = f"KVM_GET_TSC_KHZ failed: {exc}"
    else:
        if kvm_khz > 0:
            return kvm_khz, "KVM_GET_TSC_KHZ"
        why = f"KVM_GET_TSC_KHZ gave {kvm_khz}"
    khz, how = host_tsc_khz()
    log.info("TSC rate %d kHz %s (%s)", khz, how, why)
    return khz, f"{how}; {why}"


def host_tsc_khz(window_s: float = 0.05) -> tuple[int, str]:
    """The host TSC's rate measured against ``CLOCK_MONOTONIC`` over ``window_s``, and a
    note saying so. (``cpu MHz`` in /proc/cpuinfo is a core's current clock, which
    frequency scaling moves; the invariant TSC does not follow it.)"""
    import time

    def pair() -> tuple[int, int]:
        # the tightest of a few (rdtsc, clock) pairs: a preemption between the two reads
        # would skew one pair, not the smallest gap
        best: tuple[int, int, int] | None = None
        for _ in range(5):
            t0 = time.monotonic_ns()
            c = lib.kvmfw_x86_rdtsc()
            t1 = time.monotonic_ns()
            if best is None or t1 - t0 < best[0]:
                best = (t1 - t0, c, (t0 + t1) // 2)
        assert best is not None
        return best[1], best[2]

    c0, t0 = pair()
    time.sleep(window_s)
    c1, t1 = pair()
    khz = int((c1 - c0) * 1_000_000 / max(t1 - t0, 1))
    if khz <= 0:
        return 2_000_000, "a guess of 2 GHz (the TSC did not advance)"
    return khz, f"measured against CLOCK_MONOTONIC over {window_s * 1000:.0f} ms"


plugin = X86Plugin()
"""The object the ``kvmfw.arch`` entry point ``x86`` names."""


def _exit_shortcuts(cpu: Any, st: Any) -> None:
    """The exit path's per-vCPU shortcuts: the machine's port IO handler without the
    weak-dictionary lookup; single port accesses straight to the bus (``direct_port_io``:
    :meth:`PortIo.handle` does nothing else for them outside the reserved PCI
    configuration ports); no ``finalize_mmio_address`` call when nothing remaps."""
    cpu.x86_port_io = st.pio.handle
    cpu.direct_port_io = True
    cpu.mmio_remap = st.lapics is not None
