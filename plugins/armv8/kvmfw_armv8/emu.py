"""AArch64 glue for the core's emulated CPU (:mod:`kvmfw.emu`): the thread context to and
from Unicorn's AArch64 registers.

Taken: AArch64 at EL1 (SP_EL0 or SP_EL1) or EL0, MMU on or off (the translation registers
move, Unicorn walks the guest's tables in the shared RAM). Refused with
:class:`~kvmfw.emu.HandoverError` (the vCPU stays on KVM): AArch32 state, EL2/EL3, and a
vCPU KVM has not initialised. What moves: X0-X30, SP_EL0, SP_EL1, PC, PSTATE (NZCV, DAIF,
EL, SPSel), ELR_EL1, SPSR_EL1, V0-V31, FPSR, FPCR and the EL1 system registers in
:data:`SYSREGS` (translation, vectors, thread ids, fault syndrome). Everything else (timers,
GIC CPU interface, debug and PMU registers) stays in the context untouched: the emulator
neither reads the generic timer nor takes interrupts (the core's rule: held until the switch
back). AArch64 has no port IO: devices are MMIO only, which the core maps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvmfw.emu import HandoverError, require_capstone, require_unicorn
from kvmfw_armv8 import regs

if TYPE_CHECKING:
    from kvmfw.emu import EmulatedCPU

SYSREGS = ("SCTLR_EL1", "TCR_EL1", "TTBR0_EL1", "TTBR1_EL1", "MAIR_EL1", "AMAIR_EL1",
           "VBAR_EL1", "CPACR_EL1", "TPIDR_EL0", "TPIDR_EL1", "TPIDRRO_EL0",
           "CONTEXTIDR_EL1", "ESR_EL1", "FAR_EL1", "PAR_EL1")
"""System registers the hand-over moves (written before PSTATE and PC: the MMU first)."""
SPSR_EL1_CP = (4, 0, 3, 0, 0)
"""SPSR_EL1 as Unicorn's (crn, crm, op0, op1, op2): a core register (``ctx.spsr[0]``) in
KVM's API, a system register in Unicorn's."""
PSTATE_NRW = 1 << 4  # M[4]: AArch32
WFI = (0xD503207F).to_bytes(4, "little")
WFE = (0xD503205F).to_bytes(4, "little")


def _fields(name: str) -> tuple[int, int, int, int, int] | None:
    try:
        rid = regs.id_of(name)
    except Exception:
        return None
    return regs.sysreg_fields(rid)


class ArmV8EmuGlue:
    """:class:`kvmfw.emu.EmuGlue` for AArch64 (works on any object with ``id`` and
    ``get_context()`` returning an :class:`~kvmfw_armv8.context.ArmV8Context`)."""

    arch = "armv8"

    def __init__(self) -> None:
        self.uc_mod = require_unicorn()
        from unicorn import arm64_const
        self.A = arm64_const

    def verify(self, cpu: Any) -> None:
        ctx = cpu.get_context()
        ps = int(ctx.pstate)
        if ps & PSTATE_NRW:
            raise HandoverError(f"vcpu {cpu.id}: AArch32 state (PSTATE {ps:#x}) is not "
                                "emulated; it stays on KVM")
        el = (ps >> 2) & 3
        if el > 1:
            raise HandoverError(f"vcpu {cpu.id}: EL{el} is not emulated (EL0/EL1 only)")
        for name in SYSREGS:
            f = _fields(name)
            if f is None:
                raise HandoverError(f"vcpu {cpu.id}: no id for system register {name}")

    def uc_key(self, cpu: Any) -> str:
        return "aarch64"

    def create(self, cpu: Any) -> Any:
        u = self.uc_mod
        return u.Uc(u.UC_ARCH_ARM64, u.UC_MODE_ARM)

    def _cp(self, name: str) -> tuple[int, int, int, int, int]:
        f = _fields(name)
        assert f is not None
        op0, op1, crn, crm, op2 = f
        return crn, crm, op0, op1, op2

    def load(self, uc: Any, cpu: Any) -> None:
        A = self.A
        ctx = cpu.get_context()
        for name in SYSREGS:
            try:
                v = ctx.sysregs.by_name(name)
            except (KeyError, Exception):
                continue  # not in this vCPU's register list: Unicorn keeps its reset value
            uc.reg_write(A.UC_ARM64_REG_CP_REG, (*self._cp(name), v))
        uc.reg_write(A.UC_ARM64_REG_PSTATE, ctx.pstate)
        uc.reg_write(A.UC_ARM64_REG_SP_EL0, ctx.sp_el0)
        uc.reg_write(A.UC_ARM64_REG_SP_EL1, ctx.sp_el1)
        for i in range(29):
            uc.reg_write(getattr(A, f"UC_ARM64_REG_X{i}"), ctx.x[i])
        uc.reg_write(A.UC_ARM64_REG_X29, ctx.x[29])
        uc.reg_write(A.UC_ARM64_REG_X30, ctx.x[30])
        for i in range(32):
            uc.reg_write(getattr(A, f"UC_ARM64_REG_Q{i}"), ctx.v[i])
        uc.reg_write(A.UC_ARM64_REG_FPSR, ctx.fpsr)
        uc.reg_write(A.UC_ARM64_REG_FPCR, ctx.fpcr)
        uc.reg_write(A.UC_ARM64_REG_ELR_EL1, ctx.elr_el1)
        uc.reg_write(A.UC_ARM64_REG_CP_REG, (*SPSR_EL1_CP, ctx.spsr[0]))
        uc.reg_write(A.UC_ARM64_REG_PC, ctx.pc)
        if uc.reg_read(A.UC_ARM64_REG_PC) != ctx.pc:
            raise HandoverError(f"vcpu {cpu.id}: Unicorn did not take PC {ctx.pc:#x}")

    def store(self, uc: Any, cpu: Any) -> None:
        A = self.A
        ctx = cpu.get_context()
        for i in range(31):
            v = uc.reg_read(getattr(A, f"UC_ARM64_REG_X{i}"))
            if v != ctx.x[i]:
                ctx.x[i] = v
        for i in range(32):
            v = uc.reg_read(getattr(A, f"UC_ARM64_REG_Q{i}"))
            if v != ctx.v[i]:
                ctx.v[i] = v
        for attr, reg in (("sp_el0", A.UC_ARM64_REG_SP_EL0), ("sp_el1", A.UC_ARM64_REG_SP_EL1),
                          ("pc", A.UC_ARM64_REG_PC), ("pstate", A.UC_ARM64_REG_PSTATE),
                          ("elr_el1", A.UC_ARM64_REG_ELR_EL1), ("fpsr", A.UC_ARM64_REG_FPSR),
                          ("fpcr", A.UC_ARM64_REG_FPCR)):
            v = uc.reg_read(reg)
            if v != getattr(ctx, attr):
                setattr(ctx, attr, v)
        spsr = uc.reg_read(A.UC_ARM64_REG_CP_REG, SPSR_EL1_CP)
        if spsr != ctx.spsr[0]:
            ctx.spsr[0] = spsr
        for name in SYSREGS:
            try:
                old = ctx.sysregs.by_name(name)
            except (KeyError, Exception):
                continue
            v = uc.reg_read(A.UC_ARM64_REG_CP_REG, self._cp(name))
            if v != old:
                ctx.sysregs.set_by_name(name, v)

    def install_io(self, uc: Any, emu: EmulatedCPU) -> None:
        return None  # no port IO on AArch64

    def pc(self, uc: Any) -> int:
        return int(uc.reg_read(self.A.UC_ARM64_REG_PC))

    def set_pc(self, uc: Any, address: int) -> None:
        uc.reg_write(self.A.UC_ARM64_REG_PC, address)

    def is_wait(self, code: bytes) -> bool:
        return code[:4] in (WFI, WFE)

    def mode(self, uc: Any) -> str:
        return f"el{(uc.reg_read(self.A.UC_ARM64_REG_PSTATE) >> 2) & 3}"

    def disassembler(self, uc: Any) -> Any:
        cs = require_capstone()
        arch = getattr(cs, "CS_ARCH_ARM64", None)
        if arch is None:
            arch = cs.CS_ARCH_AARCH64  # Capstone 6 renamed it
        return cs.Cs(arch, cs.CS_MODE_ARM)

    def registers(self, uc: Any) -> dict[str, int]:
        A = self.A
        out = {f"x{i}": uc.reg_read(getattr(A, f"UC_ARM64_REG_X{i}")) for i in range(31)}
        out["sp"] = uc.reg_read(A.UC_ARM64_REG_SP)
        out["nzcv"] = uc.reg_read(A.UC_ARM64_REG_NZCV)
        return out
