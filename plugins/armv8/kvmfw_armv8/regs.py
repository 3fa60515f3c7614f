"""arm64 ONE_REG ids: encoding, decoding and names (pure logic, runs on any host).

A KVM register id is ``KVM_REG_ARM64 | size | coproc | index`` (``<asm/kvm.h>``):

* core registers (``KVM_REG_ARM_CORE``): the index is the offset of the field in
  ``struct kvm_regs`` divided by 4. The offsets are computed here from the arm64 layout
  (``user_pt_regs`` = 31 X + SP + PC + PSTATE; then SP_EL1, ELR_EL1, 5 SPSRs; then the
  16-byte aligned ``user_fpsimd_state`` = 32 V + FPSR + FPCR). The arm64 test environment
  checks every computed id against the real ``KVM_GET_REG_LIST``.
* system registers (``KVM_REG_ARM64_SYSREG``): op0/op1/CRn/CRm/op2 packed in 16 bits.
* firmware pseudo-registers (``KVM_REG_ARM_FW``), CCSIDR demux, SVE, feature bitmaps.
"""

from __future__ import annotations

from kvmfw.record import Frozen

KVM_REG_ARM64 = 0x6000000000000000
KVM_REG_ARCH_MASK = 0xFF00000000000000
KVM_REG_SIZE_SHIFT = 52
KVM_REG_SIZE_MASK = 0x00F0000000000000
KVM_REG_SIZE_U32 = 0x0020000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
KVM_REG_SIZE_U128 = 0x0040000000000000
KVM_REG_SIZE_U2048 = 0x0080000000000000

KVM_REG_ARM_COPROC_SHIFT = 16
KVM_REG_ARM_COPROC_MASK = 0x0FFF0000
KVM_REG_ARM_CORE = 0x0010 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM_DEMUX = 0x0011 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM64_SYSREG = 0x0013 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM_FW = 0x0014 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM64_SVE = 0x0015 << KVM_REG_ARM_COPROC_SHIFT
KVM_REG_ARM_FW_FEAT_BMAP = 0x0016 << KVM_REG_ARM_COPROC_SHIFT

# struct kvm_regs field offsets (bytes), arm64
_X0, _SP, _PC, _PSTATE = 0, 31 * 8, 32 * 8, 33 * 8
_SP_EL1, _ELR_EL1, _SPSR = 34 * 8, 35 * 8, 36 * 8
NR_SPSR = 5
SPSR_BANKS = ("SPSR_EL1", "SPSR_ABT", "SPSR_UND", "SPSR_IRQ", "SPSR_FIQ")
_FP = (_SPSR + NR_SPSR * 8 + 15) & ~15  # __uint128_t alignment
_VREGS = _FP
_FPSR = _VREGS + 32 * 16
_FPCR = _FPSR + 4
KVM_REGS_SIZE = (_FPCR + 4 + 8 + 15) & ~15  # + __reserved[2], padded to 16


def reg_size(reg_id: int) -> int:
    """Size in bytes encoded in a register id."""
    return 1 << ((reg_id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)


def core_reg(offset: int, size: int = KVM_REG_SIZE_U64) -> int:
    """The ONE_REG id of the ``struct kvm_regs`` field at byte ``offset``."""
    if offset % 4:
        raise ValueError(f"core register offset {offset} is not a multiple of 4")
    return KVM_REG_ARM64 | size | KVM_REG_ARM_CORE | (offset // 4)


X_IDS: tuple[int, ...] = tuple(core_reg(_X0 + 8 * i) for i in range(31))
SP_EL0_ID = core_reg(_SP)
PC_ID = core_reg(_PC)
PSTATE_ID = core_reg(_PSTATE)
SP_EL1_ID = core_reg(_SP_EL1)
ELR_EL1_ID = core_reg(_ELR_EL1)
SPSR_IDS: tuple[int, ...] = tuple(core_reg(_SPSR + 8 * i) for i in range(NR_SPSR))
V_IDS: tuple[int, ...] = tuple(core_reg(_VREGS + 16 * i, KVM_REG_SIZE_U128) for i in range(32))
FPSR_ID = core_reg(_FPSR, KVM_REG_SIZE_U32)
FPCR_ID = core_reg(_FPCR, KVM_REG_SIZE_U32)

CORE_NAMES: dict[int, str] = {
    **{rid: f"X{i}" for i, rid in enumerate(X_IDS)},
    SP_EL0_ID: "SP_EL0", PC_ID: "PC", PSTATE_ID: "PSTATE", SP_EL1_ID: "SP_EL1",
    ELR_EL1_ID: "ELR_EL1",
    **{rid: SPSR_BANKS[i] for i, rid in enumerate(SPSR_IDS)},
    **{rid: f"V{i}" for i, rid in enumerate(V_IDS)},
    FPSR_ID: "FPSR", FPCR_ID: "FPCR",
}
CORE_IDS: frozenset[int] = frozenset(CORE_NAMES)
GPR_IDS: tuple[int, ...] = (*X_IDS, SP_EL0_ID, PC_ID, PSTATE_ID)
EL1_IDS: tuple[int, ...] = (SP_EL1_ID, ELR_EL1_ID, *SPSR_IDS)
FP_IDS: tuple[int, ...] = (*V_IDS, FPSR_ID, FPCR_ID)


# --- system registers ---------------------------------------------------------------

def sysreg(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """``ARM64_SYS_REG(op0, op1, crn, crm, op2)``: a 64-bit system register id."""
    for v, bits, name in ((op0, 2, "op0"), (op1, 3, "op1"), (crn, 4, "CRn"), (crm, 4, "CRm"),
                          (op2, 3, "op2")):
        if not 0 <= v < (1 << bits):
            raise ValueError(f"{name}={v} does not fit {bits} bits")
    enc = (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG | enc


def sysreg_fields(reg_id: int) -> tuple[int, int, int, int, int]:
    """``(op0, op1, CRn, CRm, op2)`` of a system register id."""
    if reg_id & KVM_REG_ARM_COPROC_MASK != KVM_REG_ARM64_SYSREG:
        raise ValueError(f"{reg_id:#x} is not a system register id")
    e = reg_id & 0xFFFF
    return (e >> 14) & 3, (e >> 11) & 7, (e >> 7) & 15, (e >> 3) & 15, e & 7


_SYSREGS: dict[tuple[int, int, int, int, int], str] = {
    # identification
    (3, 0, 0, 0, 0): "MIDR_EL1", (3, 0, 0, 0, 5): "MPIDR_EL1", (3, 0, 0, 0, 6): "REVIDR_EL1",
    (3, 0, 0, 1, 0): "ID_PFR0_EL1", (3, 0, 0, 1, 1): "ID_PFR1_EL1",
    (3, 0, 0, 1, 2): "ID_DFR0_EL1", (3, 0, 0, 1, 3): "ID_AFR0_EL1",
    (3, 0, 0, 1, 4): "ID_MMFR0_EL1", (3, 0, 0, 1, 5): "ID_MMFR1_EL1",
    (3, 0, 0, 1, 6): "ID_MMFR2_EL1", (3, 0, 0, 1, 7): "ID_MMFR3_EL1",
    (3, 0, 0, 2, 0): "ID_ISAR0_EL1", (3, 0, 0, 2, 1): "ID_ISAR1_EL1",
    (3, 0, 0, 2, 2): "ID_ISAR2_EL1", (3, 0, 0, 2, 3): "ID_ISAR3_EL1",
    (3, 0, 0, 2, 4): "ID_ISAR4_EL1", (3, 0, 0, 2, 5): "ID_ISAR5_EL1",
    (3, 0, 0, 2, 6): "ID_MMFR4_EL1", (3, 0, 0, 2, 7): "ID_ISAR6_EL1",
    (3, 0, 0, 3, 0): "MVFR0_EL1", (3, 0, 0, 3, 1): "MVFR1_EL1", (3, 0, 0, 3, 2): "MVFR2_EL1",
    (3, 0, 0, 3, 4): "ID_PFR2_EL1", (3, 0, 0, 3, 5): "ID_DFR1_EL1",
    (3, 0, 0, 3, 6): "ID_MMFR5_EL1",
    (3, 0, 0, 4, 0): "ID_AA64PFR0_EL1", (3, 0, 0, 4, 1): "ID_AA64PFR1_EL1",
    (3, 0, 0, 4, 4): "ID_AA64ZFR0_EL1", (3, 0, 0, 4, 5): "ID_AA64SMFR0_EL1",
    (3, 0, 0, 5, 0): "ID_AA64DFR0_EL1", (3, 0, 0, 5, 1): "ID_AA64DFR1_EL1",
    (3, 0, 0, 5, 4): "ID_AA64AFR0_EL1", (3, 0, 0, 5, 5): "ID_AA64AFR1_EL1",
    (3, 0, 0, 6, 0): "ID_AA64ISAR0_EL1", (3, 0, 0, 6, 1): "ID_AA64ISAR1_EL1",
    (3, 0, 0, 6, 2): "ID_AA64ISAR2_EL1",
    (3, 0, 0, 7, 0): "ID_AA64MMFR0_EL1", (3, 0, 0, 7, 1): "ID_AA64MMFR1_EL1",
    (3, 0, 0, 7, 2): "ID_AA64MMFR2_EL1",
    (3, 1, 0, 0, 0): "CCSIDR_EL1", (3, 1, 0, 0, 1): "CLIDR_EL1", (3, 1, 0, 0, 7): "AIDR_EL1",
    (3, 2, 0, 0, 0): "CSSELR_EL1", (3, 3, 0, 0, 1): "CTR_EL0", (3, 3, 0, 0, 7): "DCZID_EL0",
    # system control, MMU, exceptions
    (3, 0, 1, 0, 0): "SCTLR_EL1", (3, 0, 1, 0, 1): "ACTLR_EL1", (3, 0, 1, 0, 2): "CPACR_EL1",
    (3, 0, 1, 2, 0): "ZCR_EL1", (3, 0, 1, 2, 1): "TRFCR_EL1",
    (3, 0, 2, 0, 0): "TTBR0_EL1", (3, 0, 2, 0, 1): "TTBR1_EL1", (3, 0, 2, 0, 2): "TCR_EL1",
    (3, 0, 2, 1, 0): "APIAKEYLO_EL1", (3, 0, 2, 1, 1): "APIAKEYHI_EL1",
    (3, 0, 2, 1, 2): "APIBKEYLO_EL1", (3, 0, 2, 1, 3): "APIBKEYHI_EL1",
    (3, 0, 2, 2, 0): "APDAKEYLO_EL1", (3, 0, 2, 2, 1): "APDAKEYHI_EL1",
    (3, 0, 2, 2, 2): "APDBKEYLO_EL1", (3, 0, 2, 2, 3): "APDBKEYHI_EL1",
    (3, 0, 2, 3, 0): "APGAKEYLO_EL1", (3, 0, 2, 3, 1): "APGAKEYHI_EL1",
    (3, 0, 4, 6, 0): "ICC_PMR_EL1",
    (3, 0, 5, 1, 0): "AFSR0_EL1", (3, 0, 5, 1, 1): "AFSR1_EL1", (3, 0, 5, 2, 0): "ESR_EL1",
    (3, 0, 5, 6, 0): "TFSR_EL1", (3, 0, 5, 6, 1): "TFSRE0_EL1",
    (3, 0, 6, 0, 0): "FAR_EL1", (3, 0, 7, 4, 0): "PAR_EL1",
    (3, 0, 9, 14, 1): "PMINTENSET_EL1", (3, 0, 9, 14, 2): "PMINTENCLR_EL1",
    (3, 0, 10, 2, 0): "MAIR_EL1", (3, 0, 10, 3, 0): "AMAIR_EL1",
    (3, 0, 10, 4, 0): "LORSA_EL1", (3, 0, 10, 4, 1): "LOREA_EL1",
    (3, 0, 10, 4, 2): "LORN_EL1", (3, 0, 10, 4, 3): "LORC_EL1",
    (3, 0, 10, 4, 7): "LORID_EL1",
    (3, 0, 12, 0, 0): "VBAR_EL1", (3, 0, 12, 1, 0): "ISR_EL1",
    (3, 0, 13, 0, 1): "CONTEXTIDR_EL1", (3, 0, 13, 0, 4): "TPIDR_EL1",
    (3, 0, 13, 0, 7): "SCXTNUM_EL1",
    (3, 0, 14, 1, 0): "CNTKCTL_EL1",
    # (SPSR_EL1, ELR_EL1, SP_EL0, FPCR, FPSR are core registers in KVM's API, not sysregs)
    (3, 3, 4, 2, 0): "NZCV", (3, 3, 4, 2, 1): "DAIF",
    (3, 3, 13, 0, 2): "TPIDR_EL0", (3, 3, 13, 0, 3): "TPIDRRO_EL0",
    (3, 3, 13, 0, 7): "SCXTNUM_EL0",
    # performance monitors
    (3, 3, 9, 12, 0): "PMCR_EL0", (3, 3, 9, 12, 1): "PMCNTENSET_EL0",
    (3, 3, 9, 12, 2): "PMCNTENCLR_EL0", (3, 3, 9, 12, 3): "PMOVSCLR_EL0",
    (3, 3, 9, 12, 4): "PMSWINC_EL0", (3, 3, 9, 12, 5): "PMSELR_EL0",
    (3, 3, 9, 12, 6): "PMCEID0_EL0", (3, 3, 9, 12, 7): "PMCEID1_EL0",
    (3, 3, 9, 13, 0): "PMCCNTR_EL0", (3, 3, 9, 13, 1): "PMXEVTYPER_EL0",
    (3, 3, 9, 13, 2): "PMXEVCNTR_EL0", (3, 3, 9, 14, 0): "PMUSERENR_EL0",
    (3, 3, 9, 14, 3): "PMOVSSET_EL0", (3, 3, 14, 15, 7): "PMCCFILTR_EL0",
    # generic timer. NB: KVM's KVM_REG_ARM_TIMER_CVAL and _CNT ids carry each other's
    # encodings (a historical mistake kept for ABI compatibility); named by meaning here.
    (3, 3, 14, 0, 0): "CNTFRQ_EL0", (3, 3, 14, 0, 1): "CNTPCT_EL0",
    (3, 3, 14, 0, 2): "CNTV_CVAL_EL0",  # KVM_REG_ARM_TIMER_CVAL (encoding of CNTVCT_EL0)
    (3, 3, 14, 2, 0): "CNTP_TVAL_EL0", (3, 3, 14, 2, 1): "CNTP_CTL_EL0",
    (3, 3, 14, 2, 2): "CNTP_CVAL_EL0", (3, 3, 14, 3, 0): "CNTV_TVAL_EL0",
    (3, 3, 14, 3, 1): "CNTV_CTL_EL0",
    (3, 3, 14, 3, 2): "CNTVCT_EL0",  # KVM_REG_ARM_TIMER_CNT (encoding of CNTV_CVAL_EL0)
    # AArch32 state kept at EL2 encodings
    (3, 4, 3, 0, 0): "DACR32_EL2", (3, 4, 5, 0, 1): "IFSR32_EL2", (3, 4, 5, 3, 0): "FPEXC32_EL2",
    # debug
    (2, 0, 0, 0, 2): "OSDTRRX_EL1", (2, 0, 0, 2, 0): "MDCCINT_EL1", (2, 0, 0, 2, 2): "MDSCR_EL1",
    (2, 0, 0, 3, 2): "OSDTRTX_EL1", (2, 0, 0, 6, 2): "OSECCR_EL1",
    (2, 0, 1, 0, 0): "MDRAR_EL1", (2, 0, 1, 0, 4): "OSLAR_EL1", (2, 0, 1, 1, 4): "OSLSR_EL1",
    (2, 0, 1, 3, 4): "OSDLR_EL1", (2, 0, 1, 4, 4): "DBGPRCR_EL1",
    (2, 0, 7, 8, 6): "DBGCLAIMSET_EL1", (2, 0, 7, 9, 6): "DBGCLAIMCLR_EL1",
    (2, 0, 7, 14, 6): "DBGAUTHSTATUS_EL1",
    (2, 3, 0, 1, 0): "MDCCSR_EL0", (2, 3, 0, 4, 0): "DBGDTR_EL0", (2, 3, 0, 5, 0): "DBGDTRRX_EL0",
    (2, 4, 0, 7, 0): "DBGVCR32_EL2",
}
for _n in range(16):
    _SYSREGS[(2, 0, 0, _n, 4)] = f"DBGBVR{_n}_EL1"
    _SYSREGS[(2, 0, 0, _n, 5)] = f"DBGBCR{_n}_EL1"
    _SYSREGS[(2, 0, 0, _n, 6)] = f"DBGWVR{_n}_EL1"
    _SYSREGS[(2, 0, 0, _n, 7)] = f"DBGWCR{_n}_EL1"
for _n in range(31):
    _SYSREGS[(3, 3, 14, 8 + (_n >> 3), _n & 7)] = f"PMEVCNTR{_n}_EL0"
    _SYSREGS[(3, 3, 14, 12 + (_n >> 3), _n & 7)] = f"PMEVTYPER{_n}_EL0"

SYSREG_BY_NAME: dict[str, int] = {name: sysreg(*f) for f, name in _SYSREGS.items()}

# Registers named by KVM's own API
KVM_REG_ARM_TIMER_CTL = sysreg(3, 3, 14, 3, 1)
KVM_REG_ARM_TIMER_CNT = sysreg(3, 3, 14, 3, 2)
KVM_REG_ARM_TIMER_CVAL = sysreg(3, 3, 14, 0, 2)
MPIDR_EL1 = SYSREG_BY_NAME["MPIDR_EL1"]

# Values that move on their own: a pull/push round trip cannot keep them equal.
VOLATILE_IDS: frozenset[int] = frozenset(
    {KVM_REG_ARM_TIMER_CNT, SYSREG_BY_NAME["CNTPCT_EL0"], SYSREG_BY_NAME["PMCCNTR_EL0"],
     SYSREG_BY_NAME["CNTV_TVAL_EL0"], SYSREG_BY_NAME["CNTP_TVAL_EL0"]}
    | {SYSREG_BY_NAME[f"PMEVCNTR{n}_EL0"] for n in range(31)})

# --- firmware pseudo-registers, demux, SVE ---------------------------------------------

_FW_NAMES = {0: "KVM_REG_ARM_PSCI_VERSION", 1: "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_1",
             2: "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_2", 3: "KVM_REG_ARM_SMCCC_ARCH_WORKAROUND_3"}
_FW_BMAP_NAMES = {0: "KVM_REG_ARM_STD_BMAP", 1: "KVM_REG_ARM_STD_HYP_BMAP",
                  2: "KVM_REG_ARM_VENDOR_HYP_BMAP"}


def fw_reg(index: int) -> int:
    """A firmware pseudo-register id (``KVM_REG_ARM_FW_REG(index)``)."""
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW | (index & 0xFFFF)


KVM_REG_ARM_PSCI_VERSION = fw_reg(0)


class RegInfo(Frozen):
    """What a register id means: ``kind`` is core, sysreg, fw, fw_bmap, demux, sve or
    unknown; ``name`` is printable for every id (unknown ones by their hex id)."""

    id: int
    kind: str
    name: str
    size: int


def decode(reg_id: int) -> RegInfo:
    """Decode any arm64 ONE_REG id to a :class:`RegInfo`; never fails."""
    size = reg_size(reg_id)
    if reg_id & KVM_REG_ARCH_MASK != KVM_REG_ARM64:
        return RegInfo(reg_id, "unknown", f"REG_{reg_id:#018x}", size)
    coproc = reg_id & KVM_REG_ARM_COPROC_MASK
    idx = reg_id & 0xFFFF
    if coproc == KVM_REG_ARM_CORE:
        name = CORE_NAMES.get(reg_id)
        if name is not None:
            return RegInfo(reg_id, "core", name, size)
        return RegInfo(reg_id, "core", f"CORE_OFF_{idx * 4:#x}", size)
    if coproc == KVM_REG_ARM64_SYSREG:
        f = sysreg_fields(reg_id)
        name = _SYSREGS.get(f) or "S{}_{}_C{}_C{}_{}".format(*f)
        return RegInfo(reg_id, "sysreg", name, size)
    if coproc == KVM_REG_ARM_FW:
        return RegInfo(reg_id, "fw", _FW_NAMES.get(idx, f"KVM_REG_ARM_FW_REG({idx})"), size)
    if coproc == KVM_REG_ARM_FW_FEAT_BMAP:
        return RegInfo(reg_id, "fw_bmap",
                       _FW_BMAP_NAMES.get(idx, f"KVM_REG_ARM_FW_FEAT_BMAP_REG({idx})"), size)
    if coproc == KVM_REG_ARM_DEMUX:
        if (reg_id >> 8) & 0xFF == 0:  # KVM_REG_ARM_DEMUX_ID_CCSIDR
            return RegInfo(reg_id, "demux", f"CCSIDR[{reg_id & 0xFF}]", size)
        return RegInfo(reg_id, "demux", f"DEMUX_{idx:#x}", size)
    if coproc == KVM_REG_ARM64_SVE:
        return RegInfo(reg_id, "sve", _sve_name(reg_id), size)
    return RegInfo(reg_id, "unknown", f"REG_{reg_id:#018x}", size)


KVM_REG_SIZE_U512 = 0x0060000000000000
KVM_REG_ARM64_SVE_VLS = KVM_REG_ARM64 | KVM_REG_ARM64_SVE | KVM_REG_SIZE_U512 | 0xFFFF


def _sve_name(reg_id: int) -> str:
    idx = reg_id & 0xFFFF
    if reg_id == KVM_REG_ARM64_SVE_VLS:
        return "KVM_REG_ARM64_SVE_VLS"
    n, slice_ = (idx >> 5) & 0x1F, idx & 0x1F
    if idx >= 0x600:
        return f"FFR[{slice_}]"
    if idx >= 0x400:
        return f"P{n}[{slice_}]"
    return f"Z{n}[{slice_}]"


def name_of(reg_id: int) -> str:
    """The printable name of a register id."""
    return decode(reg_id).name


def id_of(name: str) -> int:
    """The id of a named core or system register (``"X3"``, ``"PC"``, ``"SCTLR_EL1"``)."""
    for rid, n in CORE_NAMES.items():
        if n == name:
            return rid
    try:
        return SYSREG_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown arm64 register name {name!r}") from None
