"""AArch32 (32-bit ARM) guests on an arm64 KVM: ``arm_features=el1_32bit``.

32-bit ARM KVM hosts left Linux in 5.7; an ARMv7 guest now runs on an arm64 host whose CPU
implements AArch32 at EL1 (``ID_AA64PFR0_EL1.EL1 == 2``; KVM then reports
``KVM_CAP_ARM_EL1_32BIT``), with the vCPU feature ``KVM_ARM_VCPU_EL1_32BIT``. Many recent
cores (Apple M1/M2, Neoverse V2, Cortex-X2 and later, A510/A715 and later) are AArch64-only at
EL1: there the feature is refused before any vCPU exists (:func:`check_host`).

The vCPU's state is the same ``struct kvm_regs`` as for AArch64 (``arch/arm64/kvm/regmap.c``):
r0-r12 and the user r13/r14 are X0-X14, the banked r13/r14 of each mode and FIQ's r8-r14 live
in X15-X30, CPSR is PSTATE and the five SPSR banks are SPSR_EL1 (svc), _ABT, _UND, _IRQ,
_FIQ. VFP/NEON D0-D31 are the low and high halves of V0-V15, FPSCR is FPSR | FPCR, and the
CP15 registers are the AArch64 system registers they map onto (``SCTLR`` = SCTLR_EL1[31:0],
``DACR`` = DACR32_EL2, ...). :class:`A32View` gives that view over an
:class:`~kvmfw_armv8.context.ArmV8Context`; saving and restoring the context saves it whole.

Boot (``Documentation/arch/arm/booting.rst``): a zImage (magic ``0x016f2818`` at 0x24) or an
ELF32 (EM_ARM) is loaded; r0 = 0, r1 = ~0 (machine type: "use the device tree"), r2 = the
device tree; SVC mode, A/I/F masked, MMU off; ARM or Thumb state from the entry address.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from kvmfw.errors import ImageError
from kvmfw_armv8 import abi
from kvmfw_armv8.loader import Segment

if TYPE_CHECKING:
    from kvmfw_armv8.context import ArmV8Context

FEATURE = "el1_32bit"
HOST_REQUIREMENT = ("the host CPU must implement AArch32 at EL1 (ID_AA64PFR0_EL1.EL1 = 2, "
                    "e.g. Cortex-A53/A57/A72/A76, Neoverse N1; AArch64-only cores such as "
                    "Apple M1/M2 or Neoverse V2 cannot run 32-bit guests) and the kernel "
                    "must report KVM_CAP_ARM_EL1_32BIT")

MODES = {0x10: "usr", 0x11: "fiq", 0x12: "irq", 0x13: "svc", 0x16: "mon", 0x17: "abt",
         0x1A: "hyp", 0x1B: "und", 0x1F: "sys"}
MODE_BITS = {name: bits for bits, name in MODES.items()}
CPSR_T = 1 << 5
CPSR_MODE_MASK = 0x1F
PSR_AA32_BIT = 0x10
"""PSTATE.nRW: set for AArch32 (every AArch32 mode number has bit 4 set)."""
CPSR_BOOT = 0x1D3
"""SVC mode with A, I and F masked, ARM state (what KVM's reset gives a 32-bit vCPU)."""

# banked r13/r14 (and FIQ's r8-r14) -> index into kvm_regs X (arch/arm64/kvm/regmap.c)
_BANKED: dict[str, dict[int, int]] = {
    "irq": {13: 17, 14: 16}, "svc": {13: 19, 14: 18}, "abt": {13: 21, 14: 20},
    "und": {13: 23, 14: 22}, "hyp": {13: 15},
    "fiq": {8: 24, 9: 25, 10: 26, 11: 27, 12: 28, 13: 29, 14: 30},
}
SPSR_MODES = ("svc", "abt", "und", "irq", "fiq")
"""The modes of the five SPSR banks, in ``kvm_regs.spsr[]`` order."""

FPSR_MASK = 0xF800009F
"""FPSCR bits held in FPSR (NZCV, QC, cumulative exception flags)."""
FPCR_MASK = 0x07FF9F00
"""FPSCR bits held in FPCR (AHP, DN, FZ, RMode, Stride, Len, trap enables)."""

CP15: dict[str, tuple[str, int, int]] = {
    "MIDR": ("MIDR_EL1", 0, 32), "MPIDR": ("MPIDR_EL1", 0, 32),
    "SCTLR": ("SCTLR_EL1", 0, 32), "CPACR": ("CPACR_EL1", 0, 32),
    "TTBR0": ("TTBR0_EL1", 0, 64), "TTBR1": ("TTBR1_EL1", 0, 64),
    "TTBCR": ("TCR_EL1", 0, 32), "DACR": ("DACR32_EL2", 0, 32),
    "DFSR": ("ESR_EL1", 0, 32), "IFSR": ("IFSR32_EL2", 0, 32),
    "DFAR": ("FAR_EL1", 0, 32), "IFAR": ("FAR_EL1", 32, 32),
    "ADFSR": ("AFSR0_EL1", 0, 32), "AIFSR": ("AFSR1_EL1", 0, 32),
    "PRRR": ("MAIR_EL1", 0, 32), "NMRR": ("MAIR_EL1", 32, 32),
    "AMAIR0": ("AMAIR_EL1", 0, 32), "AMAIR1": ("AMAIR_EL1", 32, 32),
    "PAR": ("PAR_EL1", 0, 64), "VBAR": ("VBAR_EL1", 0, 32),
    "CONTEXTIDR": ("CONTEXTIDR_EL1", 0, 32), "TPIDRURW": ("TPIDR_EL0", 0, 32),
    "TPIDRURO": ("TPIDRRO_EL0", 0, 32), "TPIDRPRW": ("TPIDR_EL1", 0, 32),
    "CSSELR": ("CSSELR_EL1", 0, 32), "CNTKCTL": ("CNTKCTL_EL1", 0, 32),
    "FPEXC": ("FPEXC32_EL2", 0, 32),
}
"""AArch32 CP15 (and FPEXC) registers -> (AArch64 register KVM exposes, bit offset, width)."""


def mode_name(cpsr: int) -> str:
    return MODES.get(cpsr & CPSR_MODE_MASK, f"mode{cpsr & CPSR_MODE_MASK:#x}")


def x_index(n: int, mode: str) -> int:
    """Index into ``kvm_regs.regs[]`` of AArch32 register ``r<n>`` as seen in ``mode``."""
    if not 0 <= n <= 14:
        raise ValueError(f"r{n}: AArch32 general registers are r0-r14 (pc is separate)")
    if mode not in MODE_BITS:
        raise ValueError(f"unknown AArch32 mode {mode!r}")
    return _BANKED.get(mode, {}).get(n, n)


class A32View:
    """The AArch32 register view of an :class:`ArmV8Context` (reads and writes go through
    it, so dirty tracking and pushes work unchanged)."""

    def __init__(self, ctx: ArmV8Context) -> None:
        self.ctx = ctx

    @property
    def cpsr(self) -> int:
        return self.ctx.pstate & 0xFFFFFFFF

    @cpsr.setter
    def cpsr(self, value: int) -> None:
        self.ctx.pstate = value & 0xFFFFFFFF

    @property
    def mode(self) -> str:
        """The current mode's name; ``usr`` for a mode number AArch32 does not define (so the
        view of a corrupt CPSR still reads)."""
        name = mode_name(self.cpsr)
        return name if name in MODE_BITS else "usr"

    @property
    def pc(self) -> int:
        return self.ctx.pc & 0xFFFFFFFF

    @pc.setter
    def pc(self, value: int) -> None:
        self.ctx.pc = value & 0xFFFFFFFF

    def r(self, n: int, mode: str | None = None) -> int:
        """``r<n>`` in ``mode`` (default: the current mode); r15 is the PC."""
        if n == 15:
            return self.pc
        return self.ctx.x[x_index(n, mode or self.mode)] & 0xFFFFFFFF

    def set_r(self, n: int, value: int, mode: str | None = None) -> None:
        if n == 15:
            self.pc = value
            return
        self.ctx.x[x_index(n, mode or self.mode)] = value & 0xFFFFFFFF

    def spsr(self, mode: str | None = None) -> int:
        """The SPSR of ``mode`` (default: current); usr/sys have none."""
        m = mode or self.mode
        if m not in SPSR_MODES:
            raise ValueError(f"mode {m} has no SPSR")
        return self.ctx.spsr[SPSR_MODES.index(m)] & 0xFFFFFFFF

    def set_spsr(self, value: int, mode: str | None = None) -> None:
        m = mode or self.mode
        if m not in SPSR_MODES:
            raise ValueError(f"mode {m} has no SPSR")
        self.ctx.spsr[SPSR_MODES.index(m)] = value & 0xFFFFFFFF

    def d(self, n: int) -> int:
        """VFP/NEON ``d<n>`` (0-31): half of V(n // 2)."""
        if not 0 <= n <= 31:
            raise ValueError(f"d{n}: VFP registers are d0-d31")
        return (self.ctx.v[n // 2] >> (64 * (n & 1))) & 0xFFFFFFFFFFFFFFFF

    def set_d(self, n: int, value: int) -> None:
        if not 0 <= n <= 31:
            raise ValueError(f"d{n}: VFP registers are d0-d31")
        shift = 64 * (n & 1)
        v = self.ctx.v[n // 2] & ~(0xFFFFFFFFFFFFFFFF << shift)
        self.ctx.v[n // 2] = v | ((value & 0xFFFFFFFFFFFFFFFF) << shift)

    def q(self, n: int) -> int:
        if not 0 <= n <= 15:
            raise ValueError(f"q{n}: NEON registers are q0-q15")
        return self.ctx.v[n]

    @property
    def fpscr(self) -> int:
        return (self.ctx.fpsr & FPSR_MASK) | (self.ctx.fpcr & FPCR_MASK)

    @fpscr.setter
    def fpscr(self, value: int) -> None:
        self.ctx.fpsr = value & FPSR_MASK
        self.ctx.fpcr = value & FPCR_MASK

    def cp15(self, name: str) -> int:
        """A CP15 register (or FPEXC) by its AArch32 name, from the system registers."""
        reg, shift, width = _cp15(name)
        return (self.ctx.sysregs.by_name(reg) >> shift) & ((1 << width) - 1)

    def set_cp15(self, name: str, value: int) -> None:
        reg, shift, width = _cp15(name)
        mask = ((1 << width) - 1) << shift
        old = self.ctx.sysregs.by_name(reg)
        self.ctx.sysregs.set_by_name(reg, (old & ~mask) | ((value << shift) & mask))

    def as_dict(self) -> dict[str, int]:
        """Every AArch32 register by name (banked ones as ``r13_irq``); CP15 ones present in
        the context only."""
        out: dict[str, int] = {f"r{i}": self.ctx.x[i] & 0xFFFFFFFF for i in range(15)}
        for mode, regs_ in _BANKED.items():
            for n, xi in regs_.items():
                out[f"r{n}_{mode}"] = self.ctx.x[xi] & 0xFFFFFFFF
        out["pc"], out["cpsr"], out["fpscr"] = self.pc, self.cpsr, self.fpscr
        for i, m in enumerate(SPSR_MODES):
            out[f"spsr_{m}"] = self.ctx.spsr[i] & 0xFFFFFFFF
        for i in range(32):
            out[f"d{i}"] = self.d(i)
        for name in CP15:
            try:
                out[name.lower()] = self.cp15(name)
            except (KeyError, ValueError):
                continue
        return out


def _cp15(name: str) -> tuple[str, int, int]:
    try:
        return CP15[name.upper()]
    except KeyError:
        raise ValueError(f"unknown CP15 register {name!r} (known: {', '.join(CP15)})") from None


def is_aarch32(ctx: ArmV8Context) -> bool:
    """True when the vCPU is executing in AArch32 state (PSTATE.nRW)."""
    return bool(ctx.pstate & PSR_AA32_BIT)


def format_cpsr(cpsr: int) -> str:
    flags = "".join(c if cpsr & (1 << b) else "-" for c, b in
                    (("N", 31), ("Z", 30), ("C", 29), ("V", 28), ("Q", 27)))
    mask = "".join(c if cpsr & (1 << b) else "-" for c, b in (("A", 8), ("I", 7), ("F", 6)))
    return f"{flags} {mask} {'T' if cpsr & CPSR_T else 'A'} {mode_name(cpsr)}"


def format_context(ctx: ArmV8Context) -> str:
    """A readable AArch32 dump (added to the AArch64 one when the vCPU is 32-bit)."""
    v = A32View(ctx)
    lines = [f"AArch32: PC {v.pc:#010x}  CPSR {v.cpsr:#010x} ({format_cpsr(v.cpsr)})  "
             f"FPSCR {v.fpscr:#010x}"]
    for i in range(0, 15, 5):
        lines.append("  ".join(f"r{j:<2} {v.r(j):#010x}" for j in range(i, i + 5)))
    for mode in ("svc", "abt", "und", "irq", "fiq"):
        banked = "  ".join(f"r{n}_{mode} {ctx.x[xi] & 0xFFFFFFFF:#010x}"
                           for n, xi in sorted(_BANKED[mode].items()) if n >= 13)
        lines.append(f"{banked}  spsr_{mode} {v.spsr(mode):#010x}")
    lines.append("  ".join(f"r{n}_fiq {ctx.x[xi] & 0xFFFFFFFF:#010x}"
                           for n, xi in sorted(_BANKED["fiq"].items()) if n < 13))
    for i in range(0, 32, 4):
        lines.append("  ".join(f"d{j:<2} {v.d(j):#018x}" for j in range(i, i + 4)))
    cp = []
    for name in CP15:
        try:
            cp.append(f"{name} {v.cp15(name):#x}")
        except (KeyError, ValueError):
            continue
    for i in range(0, len(cp), 6):
        lines.append("  ".join(cp[i:i + 6]))
    return "\n".join(lines)


# --- host support -----------------------------------------------------------------------------

def host_support(vm_or_kvm: Any) -> tuple[bool, str]:
    """Whether this host runs AArch32 EL1 guests, with a one-line reason (``check_extension``
    of a VM or of ``/dev/kvm``)."""
    if vm_or_kvm.check_extension(abi.KVM_CAP_ARM_EL1_32BIT) > 0:
        return True, "KVM_CAP_ARM_EL1_32BIT: the host CPU implements AArch32 at EL1"
    return False, f"no KVM_CAP_ARM_EL1_32BIT: {HOST_REQUIREMENT}"


# --- images -------------------------------------------------------------------------------------

ZIMAGE_MAGIC = 0x016F2818
ZIMAGE_MAGIC_OFFSET = 0x24
ZIMAGE_LOAD_OFFSET = 0x8000
"""Where a zImage goes above the start of RAM (32 KiB, the traditional TEXT_OFFSET)."""
EM_ARM = 40
_EHDR32 = struct.Struct("<16sHHIIIIIHHHHHH")
_PHDR32 = struct.Struct("<IIIIIIII")
PT_LOAD = 1
MAX_SEGMENTS = 64


def is_zimage(data: bytes) -> bool:
    return (len(data) >= ZIMAGE_MAGIC_OFFSET + 12 and
            struct.unpack_from("<I", data, ZIMAGE_MAGIC_OFFSET)[0] == ZIMAGE_MAGIC)


def parse_zimage(data: bytes) -> tuple[int, int]:
    """``(start, end)`` from a zImage header (link addresses; 0 for position independent).
    :class:`ImageError` if it is not one or the header lies."""
    if not is_zimage(data):
        raise ImageError(f"not an ARM zImage (no magic {ZIMAGE_MAGIC:#010x} at "
                         f"{ZIMAGE_MAGIC_OFFSET:#x})")
    start, end = struct.unpack_from("<II", data, ZIMAGE_MAGIC_OFFSET + 4)
    if end < start or (end - start) > len(data) + 0x10_0000:
        raise ImageError(f"zImage header start={start:#x} end={end:#x} does not describe "
                         f"this {len(data)}-byte file")
    if struct.unpack_from("<I", data, 0x30)[0] == 0x5A534C4B:  # big-endian marker word
        raise ImageError("big-endian zImage: kvmfw boots little-endian kernels only")
    return start, end


def is_elf32(data: bytes) -> bool:
    return data[:4] == b"\x7fELF" and len(data) > 4 and data[4] == 1


def parse_elf32(data: bytes) -> tuple[int, list[Segment]]:
    """``(entry, PT_LOAD segments at their physical addresses)`` of a little-endian ARM
    ELF32 (bit 0 of ``entry`` set: Thumb)."""
    if len(data) < _EHDR32.size or not is_elf32(data):
        raise ImageError("not an ELF32 file")
    if data[5] != 1:
        raise ImageError("only little-endian ELF32 images are supported")
    (_ident, _type, machine, _ver, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum,
     _shentsize, _shnum, _shstrndx) = _EHDR32.unpack_from(data)
    if machine != EM_ARM:
        raise ImageError(f"ELF machine {machine} is not ARM ({EM_ARM})")
    if phnum > MAX_SEGMENTS:
        raise ImageError(f"ELF32 has {phnum} program headers (at most {MAX_SEGMENTS})")
    if phentsize < _PHDR32.size or phoff + phnum * phentsize > len(data):
        raise ImageError("truncated ELF32 program headers")
    segs = []
    for i in range(phnum):
        p_type, off, _vaddr, paddr, filesz, memsz, _flags2, _align = _PHDR32.unpack_from(
            data, phoff + i * phentsize)
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz or off + filesz > len(data):
            raise ImageError(f"ELF32 segment {i} extends past the end of the file")
        segs.append(Segment(paddr, data[off:off + filesz], memsz))
    if not segs:
        raise ImageError("ELF32 image has no loadable segment")
    return entry, segs


def boot_registers(ctx: ArmV8Context, entry: int, dtb_addr: int) -> None:
    """The Linux ARM boot state: r0 = 0, r1 = ~0, r2 = device tree, SVC, A/I/F masked."""
    ctx.x[:] = [0, 0xFFFFFFFF, dtb_addr] + [0] * 28
    ctx.pstate = CPSR_BOOT | (CPSR_T if entry & 1 else 0)
    ctx.pc = entry & ~1
