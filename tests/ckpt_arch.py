"""The test arch of the core's checkpoint tests: :class:`RealModeArch` plus vCPU state
(``kvm_regs`` and ``kvm_sregs`` as hex) and a CPU model, so checkpoints of real guests run
without any plugin installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from realmode_arch import KVM_REGS_SIZE, REGS, RealModeArch, _fmt

from kvmfw import SyncLevel, hookimpl
from kvmfw.abi import IOC_READ, IOC_WRITE, address_of, define_ioctl, ffi
from kvmfw.device import ConfigKey, Device, Range
from kvmfw.errors import CheckpointError, StateError
from kvmfw.eventq import Event

KVM_SREGS_SIZE = 312
KVM_GET_SREGS = define_ioctl("KVM_GET_SREGS", IOC_READ, 0x83, KVM_SREGS_SIZE)
KVM_SET_SREGS = define_ioctl("KVM_SET_SREGS", IOC_WRITE, 0x84, KVM_SREGS_SIZE)
CKPT_GUEST = Path(__file__).parent / "guests" / "ckpt.bin"
MODEL = {"vendor": "kvmfw-test", "features": ["regs", "sregs"]}


class CkptArch(RealModeArch):
    """RealModeArch with ``save_arch_state``/``restore_arch_state`` and a CPU model.
    ``refuse_model``: a reason ``check_cpu_model`` gives (a host that cannot run it)."""

    def __init__(self, program: int = 0, guest: bytes | None = None) -> None:
        super().__init__(program, guest if guest is not None else CKPT_GUEST.read_bytes())
        self.refuse_model: str | None = None

    @hookimpl
    def arch_name(self) -> str:
        return "realmode-test"

    @hookimpl
    def memory_layout(self, size: int) -> list[tuple[int, int, str]]:
        """RAM at 0, and above 3 GiB moved to 4 GiB (the ROM sits below 4 GiB)."""
        low = 3 << 30
        if size <= low:
            return [(0, size, "ram")]
        return [(0, low, "ram"), (1 << 32, size - low, "ram-high")]

    @hookimpl
    def save_arch_state(self, cpu: Any) -> dict[str, Any]:
        ctx = cpu.get_context(SyncLevel.FULL)
        sregs = ffi.new("uint8_t[]", KVM_SREGS_SIZE)
        cpu.vcpu.ioctl(KVM_GET_SREGS, address_of(sregs))
        return {"regs": {r: ctx.regs[r] for r in REGS},
                "sregs": bytes(ffi.buffer(sregs)).hex()}

    @hookimpl
    def restore_arch_state(self, cpu: Any, state: dict[str, Any]) -> bool:
        regs = state.get("regs")
        if not isinstance(regs, dict) or set(regs) != set(REGS) or not all(
                isinstance(v, int) and 0 <= v < 1 << 64 for v in regs.values()):
            raise StateError("field regs: not the 18 general registers")
        raw = state.get("sregs")
        if not isinstance(raw, str) or len(raw) != 2 * KVM_SREGS_SIZE:
            raise StateError(f"field sregs: not {KVM_SREGS_SIZE} bytes of hex")
        try:
            sregs = ffi.new("uint8_t[]", bytes.fromhex(raw))
        except ValueError:
            raise StateError("field sregs: not hex") from None
        cpu.vcpu.ioctl(KVM_SET_SREGS, address_of(sregs))
        ctx = cpu.get_context(SyncLevel.FULL)
        ctx.regs.update(regs)
        cpu.mark_context_dirty()
        cpu.sync_kvm_state(SyncLevel.FULL)
        return True

    @hookimpl
    def cpu_model(self, machine: Any) -> dict[str, Any]:
        return dict(MODEL)

    @hookimpl
    def check_cpu_model(self, machine: Any, model: dict[str, Any]) -> str | None:
        if self.refuse_model:
            return self.refuse_model
        if model != MODEL:
            return f"cpu_model.vendor: {model.get('vendor')!r} is not {MODEL['vendor']!r}"
        return None


def regs_of(cpu: Any) -> dict[str, int]:
    """The general registers of a vCPU, read from KVM now."""
    buf = ffi.new("uint8_t[]", KVM_REGS_SIZE)
    from realmode_arch import KVM_GET_REGS
    cpu.vcpu.ioctl(KVM_GET_REGS, address_of(buf))
    return dict(zip(REGS, _fmt.unpack(ffi.buffer(buf)), strict=True))


# --- the machine of the checkpoint tests ----------------------------------------------------

ARCH = "realmode-test"
MEM = 0x100000


class Ticker(Device):
    """Counts the guest's progress writes (port 0x20); holds a pending event it saves as a
    delay; asks for a checkpoint (the ``checkpoint`` service, as the pseudo-op device does)
    at write number ``ckpt_at``."""

    name = "ticker"
    config = {"ckpt_at": ConfigKey(int, -1, "progress write that asks for a checkpoint")}

    def __init__(self, ctx: Any, **params: Any) -> None:
        super().__init__(ctx, **params)
        self.count = 0
        self.fired = 0
        self.ev = Event(self._fire, "ticker")
        ctx.eventq.schedule(self.ev, ctx.eventq.cur_tick + 10**15)

    def _fire(self) -> None:
        self.fired += 1

    def ranges(self) -> list[Range]:
        return [Range("pio", 0x20, 1, "ticker")]

    def write(self, offset: int, data: bytes) -> None:
        self.count += 1
        if self.count == self.params["ckpt_at"]:
            self.ctx.services["checkpoint"]()

    def save(self) -> dict[str, Any]:
        eq = self.ctx.eventq
        return {"count": self.count, "due_in": self.ev.when - eq.cur_tick}

    def restore(self, state: dict[str, Any]) -> None:
        count, due = state.get("count"), state.get("due_in")
        if type(count) is not int or type(due) is not int or due < 0 or count < 0:
            raise CheckpointError("ticker: saved state count/due_in invalid")
        self.count = count
        eq = self.ctx.eventq
        eq.reschedule(self.ev, eq.cur_tick + due)


class Rig:
    """A machine of the tests (CkptArch + Ticker + Recorder) and its recorder."""

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self.rec: Any = None

    @property
    def ticker(self) -> Ticker:
        return self.machine.devices[0]  # type: ignore[no-any-return]

    def result(self) -> bytes | None:
        """The guest's result (its dword write to port 0x10), None before it ends."""
        return next((d for off, d in self.rec.writes if off == 0), None)


def setup(machine: Any, ckpt_at: int = -1) -> Rig:
    """Add the devices the tests add in code (again, on a restored machine)."""
    from kvmtest import Recorder

    rig = Rig(machine)
    if not machine.devices:
        machine.add_device(Ticker(machine.device_context(), ckpt_at=ckpt_at))
    rig.rec = Recorder(machine)
    machine.map_device(Range("pio", 0x10, 4, "recorder"), rig.rec)
    return rig


def build(memory: int = MEM, ckpt_at: int = -1, arch: CkptArch | None = None) -> Rig:
    from kvmfw.machine import Machine, MachineConfig

    m = Machine(MachineConfig(memory=memory), arch_plugin=arch or CkptArch(), arch_name=ARCH)
    return setup(m, ckpt_at)


def restore(path: Any, arch: CkptArch | None = None, **kw: Any) -> Rig:
    from kvmfw.machine import Machine

    rigs: list[Rig] = []
    Machine.restore(path, arch_plugin=arch or CkptArch(), setup=lambda m: rigs.append(
        setup(m)), **kw)
    return rigs[0]
