"""Machine reset and ACPI S3 wake-up for x86 (the ``vcpu_reset`` and ``reset_machine``
hooks).

Power-on state is what KVM gave each vCPU at creation: it is recorded once, when the
machine is built (``machine_created``), before any guest state exists, and loaded back
at a reset: registers, MSRs, FPU/XSAVE, debug registers, events, the in-kernel local
APIC and the MP state (the boot CPU runnable, the others waiting for INIT/SIPI). With
the in-kernel irqchip the PICs, IO-APIC and PIT are recorded and reloaded the same way
(``KVM_GET/SET_IRQCHIP``, ``KVM_GET/SET_PIT2``); the userspace interrupt model and
local APICs are cleared. A reboot then loads the guest again with the arguments of the
last ``load_guest`` (as QEMU re-copies ``-kernel`` at every reset); an S3 wake-up keeps
RAM and devices and enters real mode at the FACS firmware waking vector, as SeaBIOS
does on resume (``CS = vector >> 4``, ``IP = vector & 0xF``).
"""

from __future__ import annotations

import struct
from typing import Any

from kvmfw.abi import IOC_READ, IOC_WRITE, ioctl, ioctl_number
from kvmfw.hookspecs import SyncLevel
from kvmfw.record import Record

from kvmfw_x86.abi import X, addr, ffi, lib

KVMIO_IRQCHIP_SIZE = 8 + 512  # struct kvm_irqchip: chip_id, pad, a 512-byte union
KVM_PIT_STATE2_SIZE = 3 * 24 + 4 + 9 * 4
KVM_GET_IRQCHIP = ioctl_number(IOC_READ | IOC_WRITE, 0x62, KVMIO_IRQCHIP_SIZE)
KVM_SET_IRQCHIP = ioctl_number(IOC_READ, 0x63, KVMIO_IRQCHIP_SIZE)  # (sic: _IOR in KVM)
KVM_GET_PIT2 = ioctl_number(IOC_READ, 0x9F, KVM_PIT_STATE2_SIZE)
KVM_SET_PIT2 = ioctl_number(IOC_WRITE, 0xA0, KVM_PIT_STATE2_SIZE)
IRQCHIPS = (0, 1, 2)  # PIC master, PIC slave, IO-APIC

FACS_SIGNATURE = b"FACS"


class PowerOn(Record):
    """What a reset loads back."""

    def __init__(self) -> None:
        self.contexts: dict[int, dict[str, Any]] = {}
        self.lapics: dict[int, bytes] = {}
        self.mp_states: dict[int, int] = {}
        self.irqchips: list[bytes] = []
        self.pit: bytes | None = None


def _buf(size: int, data: bytes | None = None) -> Any:
    b = ffi.new("uint8_t[]", size)
    if data is not None:
        ffi.memmove(b, data, min(size, len(data)))
    return b


def record(machine: Any, kernel_irqchip: bool) -> PowerOn:
    """The machine's power-on state (called before anything ran)."""
    p = PowerOn()
    for cpu in machine.cpus:
        p.contexts[cpu.id] = cpu.get_context(SyncLevel.FULL).save()
        mp = ffi.new("struct kvm_mp_state *")
        cpu.vcpu.ioctl(X.KVM_GET_MP_STATE, addr(mp), "KVM_GET_MP_STATE")
        p.mp_states[cpu.id] = int(mp.mp_state)
        if kernel_irqchip:
            st = ffi.new("struct kvm_lapic_state *")
            cpu.vcpu.ioctl(X.KVM_GET_LAPIC, addr(st), "KVM_GET_LAPIC")
            p.lapics[cpu.id] = bytes(ffi.buffer(st))
    if kernel_irqchip:
        for chip in IRQCHIPS:
            b = _buf(KVMIO_IRQCHIP_SIZE)
            struct.pack_into("<I", ffi.buffer(b), 0, chip)
            ioctl(machine.vm.fd, KVM_GET_IRQCHIP, addr(b), "KVM_GET_IRQCHIP")
            p.irqchips.append(bytes(ffi.buffer(b)))
        b = _buf(KVM_PIT_STATE2_SIZE)
        ioctl(machine.vm.fd, KVM_GET_PIT2, addr(b), "KVM_GET_PIT2")
        p.pit = bytes(ffi.buffer(b))
    return p


def reset_vcpu(cpu: Any, power_on: PowerOn, state: Any) -> None:
    """``cpu`` back to its recorded power-on state (pushed to KVM at once: the MP state
    and LAPIC must follow the registers)."""
    ctx = cpu.get_context(SyncLevel.FULL)
    ctx.load(power_on.contexts[cpu.id])
    cpu.sync_kvm_state(SyncLevel.FULL)
    lapic = power_on.lapics.get(cpu.id)
    if lapic is not None:
        st = ffi.new("struct kvm_lapic_state *")
        ffi.memmove(st, lapic, len(lapic))
        cpu.vcpu.ioctl(X.KVM_SET_LAPIC, addr(st), "KVM_SET_LAPIC")
    mp = ffi.new("struct kvm_mp_state *")
    mp.mp_state = power_on.mp_states.get(cpu.id, lib.KVM_MP_STATE_RUNNABLE)
    cpu.vcpu.ioctl(X.KVM_SET_MP_STATE, addr(mp), "KVM_SET_MP_STATE")
    ints = state.interrupts
    ints.pending.pop(cpu.id, None)
    ints.nmis.pop(cpu.id, None)
    ints.waiting_for_sipi.discard(cpu.id)
    ints._init_pending.discard(cpu.id)
    ints._sipi_pending.pop(cpu.id, None)
    if state.lapics is not None and cpu.id < len(state.lapics.regs):
        state.lapics.regs[cpu.id] = state.lapics._reset_regs(cpu.id)


def reset_vm(machine: Any, power_on: PowerOn) -> None:
    """In-kernel PICs, IO-APIC and PIT back to power-on."""
    for raw in power_on.irqchips:
        b = _buf(KVMIO_IRQCHIP_SIZE, raw)
        ioctl(machine.vm.fd, KVM_SET_IRQCHIP, addr(b), "KVM_SET_IRQCHIP")
    if power_on.pit is not None:
        b = _buf(KVM_PIT_STATE2_SIZE, power_on.pit)
        ioctl(machine.vm.fd, KVM_SET_PIT2, addr(b), "KVM_SET_PIT2")


def waking_vector(machine: Any) -> int:
    """The FACS firmware waking vector the guest set (0: none, or no FACS)."""
    from kvmfw_x86 import acpi

    facs = acpi.ACPI_BASE + acpi.FACS_OFFSET
    mem = machine.memory
    if not mem.contains(facs, 64) or mem.read(facs, 4) != FACS_SIGNATURE:
        return 0
    return int(struct.unpack("<I", mem.read(facs + 12, 4))[0])


def enter_wake_vector(machine: Any, vector: int) -> None:
    """Real mode at the waking vector, as SeaBIOS resumes: ``CS:IP = vector >> 4 :
    vector & 0xF``, interrupts off, stack undefined (the OS's wake code sets one)."""
    from kvmfw_x86.loaders import enter_real_mode

    enter_real_mode(machine, vector >> 4, vector & 0xF, sp=0)
