"""The test arch of the core's checkpoint tests: :class:`RealModeArch` plus vCPU state
(``kvm_regs`` and ``kvm_sregs`` as hex) and a CPU model, so checkpoints of real guests run
without any plugin installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from realmode_arch import KVM_REGS_SIZE, REGS, RealModeArch, _fmt

from kvmfw import SyncLevel, hookimpl
from kvmfw.abi import IOC_READ, IOC_WRITE, address_of, define_ioctl, ffi
from kvmfw.errors import StateError

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
