"""Save and restore of the in-kernel vGIC (v3 and v2) through its device attributes.

One concept, one place: :func:`layout` lists every register slot of the vGIC this machine
has, **in the order a restore writes them**; a save reads the same slots and a restore
first requires the saved slot set to be exactly this machine's (so nothing from a
checkpoint picks an attribute or sizes anything), checks every value's width, and only then
writes. A slot is ``(group, attr, size, clear)``: ``clear`` is the attr of the matching
write-1-to-clear register (ICENABLER/ICACTIVER), written with all ones before the set
register, because the set registers only set bits.

Restore order (``Documentation/virt/kvm/devices/arm-vgic-v3.rst``, as QEMU's
``arm_gicv3_kvm.c`` does it):

1. ``GICD_IIDR`` first: it selects the KVM implementation revision whose behaviour the
   other registers are then written against (the kernel asks for it first).
2. Redistributors (v3): ``GICR_PROPBASER``/``GICR_PENDBASER`` (only where
   ``GICR_TYPER.PLPIS`` says LPIs exist) before ``GICR_CTLR``, whose EnableLPIs freezes
   them. This board has no ITS (so no LPIs and no pending tables to save
   with ``KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES``); a vGIC with one is refused.
3. ``GICD_CTLR`` (affinity routing, group enables) before any per-interrupt register.
4. Per interrupt (SGI/PPI in each redistributor, SPI in the distributor): group,
   priority, configuration (edge/level), routing; then the input line levels of SPIs
   (``GRP_LEVEL_INFO``: v3 only); then the pending latch (userspace ISPENDR accesses read
   and write the latch itself, not latch|level), active and enabled last, so that no
   interrupt is enabled while its configuration is half written.
5. CPU interfaces last (v3 ``ICC_*_EL1`` via ``GRP_CPU_SYSREGS``; v2 ``GICC_*``):
   ``ICC_SRE_EL1`` and ``ICC_CTLR_EL1`` (the kernel checks them against the host), PMR,
   BPRs, active priorities, then the group enables.

The whole restore runs with no vCPU in ``KVM_RUN`` (the kernel returns EBUSY otherwise).
If KVM refuses a write midway, the state read before the restore is written back and
:class:`~kvmfw.errors.StateError` names the register.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvmfw.errors import KvmError, StateError
from kvmfw.record import Frozen
from kvmfw_armv8 import abi

if TYPE_CHECKING:
    from kvmfw.vm import KvmDevice

FORMAT = 1
"""Version of the plain-data vGIC state (bumped when a slot's meaning changes)."""

KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO = 7
VGIC_LEVEL_INFO_LINE_LEVEL = 0
KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT = 10
KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES = 3
KVM_DEV_ARM_VGIC_LINE_LEVEL_INTID_MASK = 0x3FF

DIST = abi.KVM_DEV_ARM_VGIC_GRP_DIST_REGS
REDIST = abi.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS
CPU_REGS = abi.KVM_DEV_ARM_VGIC_GRP_CPU_REGS
SYSREGS = abi.KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS
LEVEL = KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO
GROUP_NAMES = {DIST: "dist", REDIST: "redist", CPU_REGS: "cpu", SYSREGS: "icc", LEVEL: "level"}

# distributor / redistributor SGI-frame register offsets (GICv3 and v2 share most)
GICD_CTLR, GICD_IIDR, GICD_STATUSR = 0x0, 0x8, 0x10
GICD_IGROUPR, GICD_ISENABLER, GICD_ICENABLER = 0x80, 0x100, 0x180
GICD_ISPENDR, GICD_ISACTIVER, GICD_ICACTIVER = 0x200, 0x300, 0x380
GICD_IPRIORITYR, GICD_ITARGETSR, GICD_ICFGR = 0x400, 0x800, 0xC00
GICD_IGRPMODR, GICD_IROUTER = 0xD00, 0x6000
GICD_CPENDSGIR, GICD_SPENDSGIR = 0xF10, 0xF20
GICR_CTLR, GICR_TYPER, GICR_PROPBASER, GICR_PENDBASER = 0x0, 0x8, 0x70, 0x78
GICR_TYPER_PLPIS = 1
GICR_SGI = 0x1_0000
GICC_CTLR, GICC_PMR, GICC_BPR, GICC_ABPR, GICC_APR = 0x0, 0x4, 0x8, 0x1C, 0xD0


def _icc(op1: int, crn: int, crm: int, op2: int) -> int:
    return (3 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2


ICC_SRE_EL1 = _icc(0, 12, 12, 5)
ICC_CTLR_EL1 = _icc(0, 12, 12, 4)
ICC_PMR_EL1 = _icc(0, 4, 6, 0)
ICC_BPR0_EL1 = _icc(0, 12, 8, 3)
ICC_BPR1_EL1 = _icc(0, 12, 12, 3)
ICC_IGRPEN0_EL1 = _icc(0, 12, 12, 6)
ICC_IGRPEN1_EL1 = _icc(0, 12, 12, 7)
ICC_AP0R = tuple(_icc(0, 12, 8, 4 + n) for n in range(4))
ICC_AP1R = tuple(_icc(0, 12, 9, n) for n in range(4))


class Slot(Frozen):
    """One attribute of the vGIC device: read on save, written on restore. ``clear``: the
    attr (same group) of the write-1-to-clear twin, written with all ones first."""

    group: int
    attr: int
    size: int = 4
    clear: int | None = None

    @property
    def key(self) -> str:
        return f"{GROUP_NAMES[self.group]}/{self.attr:#x}"


def affinity(mpidr: int) -> int:
    """The ``Aff3.Aff2.Aff1.Aff0`` field of an MPIDR, as the v3 attrs encode it."""
    return ((mpidr >> 32) & 0xFF) << 24 | (mpidr & 0xFFFFFF)


def _words(group: int, base: int, first_irq: int, nr_irqs: int, bits: int, prefix: int = 0,
           clear: int | None = None) -> list[Slot]:
    """The 32-bit registers holding ``bits`` per interrupt for ``first_irq..nr_irqs``."""
    per = 32 // bits
    return [Slot(group, prefix | (base + (irq // per) * 4), 4,
                 None if clear is None else prefix | (clear + (irq // per) * 4))
            for irq in range(first_irq, nr_irqs, per)]


def _priority_bits_v3(dev: KvmDevice, mpidr: int) -> int:
    """ICC_CTLR_EL1.PRIbits + 1 of this host's vGIC CPU interface (5..8)."""
    ctlr = dev.get_attr(SYSREGS, affinity(mpidr) << 32 | ICC_CTLR_EL1, size=8)
    return ((ctlr >> 8) & 7) + 1


def layout(kind: str, dev: KvmDevice, nr_irqs: int, mpidrs: list[int]) -> list[Slot]:
    """Every register slot of this vGIC, in restore order (see the module doc)."""
    if kind == "v3":
        slots = _layout_v3(dev, nr_irqs, mpidrs)
    elif kind == "v2":
        slots = _layout_v2(nr_irqs, len(mpidrs))
    else:
        raise StateError(f"no vGIC state for gic={kind!r}")
    # slots the running kernel does not implement (ENXIO) are not part of the state
    return [s for s in slots if dev.has_attr(s.group, s.attr)]


def _layout_v3(dev: KvmDevice, nr_irqs: int, mpidrs: list[int]) -> list[Slot]:
    out = [Slot(DIST, GICD_IIDR)]
    for mp in mpidrs:
        p = affinity(mp) << 32
        if dev.get_attr(REDIST, p | GICR_TYPER, size=4) & GICR_TYPER_PLPIS:
            # LPI tables only where LPIs exist (an ITS): KVM sanitises these on a write,
            # so writing them on a vGIC without LPIs would change what it reads back
            out += [Slot(REDIST, p | GICR_PROPBASER), Slot(REDIST, p | GICR_PROPBASER + 4),
                    Slot(REDIST, p | GICR_PENDBASER), Slot(REDIST, p | GICR_PENDBASER + 4)]
        out += [Slot(REDIST, p | GICR_CTLR)]
    out += [Slot(DIST, GICD_CTLR), Slot(DIST, GICD_STATUSR)]
    for mp in mpidrs:  # SGIs and PPIs: the SGI frame of each redistributor
        p = affinity(mp) << 32
        s = GICR_SGI
        out += [Slot(REDIST, p | s + GICD_IGROUPR), Slot(REDIST, p | s + GICD_IGRPMODR)]
        out += _words(REDIST, s + GICD_IPRIORITYR, 0, 32, 8, p)
        out += _words(REDIST, s + GICD_ICFGR, 0, 32, 2, p)
        out += [Slot(REDIST, p | s + GICD_ISPENDR),
                Slot(REDIST, p | s + GICD_ISACTIVER, 4, p | s + GICD_ICACTIVER),
                Slot(REDIST, p | s + GICD_ISENABLER, 4, p | s + GICD_ICENABLER)]
    out += _words(DIST, GICD_IGROUPR, 32, nr_irqs, 1)
    out += _words(DIST, GICD_IGRPMODR, 32, nr_irqs, 1)
    out += _words(DIST, GICD_IPRIORITYR, 32, nr_irqs, 8)
    out += _words(DIST, GICD_ICFGR, 32, nr_irqs, 2)
    for irq in range(32, nr_irqs):
        out += [Slot(DIST, GICD_IROUTER + 8 * irq), Slot(DIST, GICD_IROUTER + 8 * irq + 4)]
    # line levels of SPIs (the mpidr is ignored for SPIs: vCPU 0's is given)
    p0 = affinity(mpidrs[0]) << 32 if mpidrs else 0
    out += [Slot(LEVEL, p0 | VGIC_LEVEL_INFO_LINE_LEVEL << KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT
                 | irq) for irq in range(32, nr_irqs, 32)]
    out += _words(DIST, GICD_ISPENDR, 32, nr_irqs, 1)
    out += _words(DIST, GICD_ISACTIVER, 32, nr_irqs, 1, clear=GICD_ICACTIVER)
    out += _words(DIST, GICD_ISENABLER, 32, nr_irqs, 1, clear=GICD_ICENABLER)
    for mp in mpidrs:
        p = affinity(mp) << 32
        nap = 1 << max(0, _priority_bits_v3(dev, mp) - 5)  # 5 bits: 1, 6: 2, 7+: 4
        out += [Slot(SYSREGS, p | r, 8) for r in (ICC_SRE_EL1, ICC_CTLR_EL1, ICC_PMR_EL1,
                                                   ICC_BPR0_EL1, ICC_BPR1_EL1)]
        out += [Slot(SYSREGS, p | r, 8) for r in ICC_AP0R[:nap] + ICC_AP1R[:nap]]
        out += [Slot(SYSREGS, p | ICC_IGRPEN0_EL1, 8), Slot(SYSREGS, p | ICC_IGRPEN1_EL1, 8)]
    return out


def _layout_v2(nr_irqs: int, ncpus: int) -> list[Slot]:
    """GICv2: banked (per-vCPU) registers are addressed by the vCPU index in bits 39..32."""
    out = [Slot(DIST, GICD_IIDR), Slot(DIST, GICD_CTLR)]
    for i in range(ncpus):
        p = i << 32
        out += [Slot(DIST, p | GICD_IGROUPR)]
        out += _words(DIST, GICD_IPRIORITYR, 0, 32, 8, p)
        out += [Slot(DIST, p | GICD_ICFGR + 4)]  # PPIs (SGIs' ICFGR0 is read-only)
        out += [Slot(DIST, p | GICD_SPENDSGIR + 4 * n, 4, p | GICD_CPENDSGIR + 4 * n)
                for n in range(4)]
        out += [Slot(DIST, p | GICD_ISPENDR),
                Slot(DIST, p | GICD_ISACTIVER, 4, p | GICD_ICACTIVER),
                Slot(DIST, p | GICD_ISENABLER, 4, p | GICD_ICENABLER)]
    out += _words(DIST, GICD_IGROUPR, 32, nr_irqs, 1)
    out += _words(DIST, GICD_IPRIORITYR, 32, nr_irqs, 8)
    out += _words(DIST, GICD_ITARGETSR, 32, nr_irqs, 8)
    out += _words(DIST, GICD_ICFGR, 32, nr_irqs, 2)
    out += _words(DIST, GICD_ISPENDR, 32, nr_irqs, 1)
    out += _words(DIST, GICD_ISACTIVER, 32, nr_irqs, 1, clear=GICD_ICACTIVER)
    out += _words(DIST, GICD_ISENABLER, 32, nr_irqs, 1, clear=GICD_ICENABLER)
    for i in range(ncpus):
        p = i << 32
        out += [Slot(CPU_REGS, p | r) for r in (GICC_PMR, GICC_BPR, GICC_ABPR)]
        out += [Slot(CPU_REGS, p | GICC_APR + 4 * n) for n in range(4)]
        out += [Slot(CPU_REGS, p | GICC_CTLR)]
    return out


def read(dev: KvmDevice, slots: list[Slot]) -> dict[str, int]:
    """The value of every slot, keyed by :attr:`Slot.key`."""
    return {s.key: dev.get_attr(s.group, s.attr, size=s.size) for s in slots}


def write(dev: KvmDevice, slots: list[Slot], values: dict[str, int]) -> None:
    """Write ``values`` (already checked) in slot order; KvmError names the slot."""
    for s in slots:
        if s.clear is not None:
            dev.set_attr(s.group, s.clear, (1 << 8 * s.size) - 1, size=s.size)
        dev.set_attr(s.group, s.attr, values[s.key], size=s.size)


def save(kind: str, dev: KvmDevice, nr_irqs: int, mpidrs: list[int]) -> dict[str, Any]:
    """Plain-data vGIC state (values as hex strings)."""
    if kind == "v3" and _has_its(dev):
        raise StateError("the vGIC has an ITS: its tables cannot be saved by this plugin")
    slots = layout(kind, dev, nr_irqs, mpidrs)
    return {"format": FORMAT, "type": kind, "nr_irqs": nr_irqs,
            "mpidrs": [f"{m:#x}" for m in mpidrs],
            "regs": {k: f"{v:#x}" for k, v in read(dev, slots).items()}}


def _has_its(dev: KvmDevice) -> bool:
    # an ITS is a separate KVM device; this board never creates one (see board.py)
    return False


def check(state: Any, kind: str, dev: KvmDevice, nr_irqs: int,
          mpidrs: list[int]) -> tuple[list[Slot], dict[str, int]]:
    """Validate ``state`` against this machine's vGIC; returns the slots and the values to
    write. Raises StateError naming the first field that does not fit."""
    if not isinstance(state, dict):
        raise StateError("vGIC state: not a mapping")
    if state.get("format") != FORMAT:
        raise StateError(f"vGIC state: format {state.get('format')!r}, this plugin reads "
                         f"{FORMAT}")
    if state.get("type") != kind:
        raise StateError(f"vGIC state: type {state.get('type')!r}, this machine has a "
                         f"GIC{kind}")
    if state.get("nr_irqs") != nr_irqs:
        raise StateError(f"vGIC state: nr_irqs {state.get('nr_irqs')!r}, this machine has "
                         f"{nr_irqs}")
    want_mp = [f"{m:#x}" for m in mpidrs]
    if state.get("mpidrs") != want_mp:
        raise StateError(f"vGIC state: mpidrs {state.get('mpidrs')!r}, this machine's "
                         f"vCPUs are {want_mp}")
    regs = state.get("regs")
    if not isinstance(regs, dict):
        raise StateError("vGIC state: regs is not a mapping")
    slots = layout(kind, dev, nr_irqs, mpidrs)
    if len(regs) != len(slots):  # bounded before anything walks it
        have = {s.key for s in slots}
        extra = sorted(k for k in list(regs)[:len(slots) + 1] if k not in have)
        missing = sorted(have - set(regs))
        what = f"unknown register {extra[0]}" if extra else f"missing register {missing[0]}"
        raise StateError(f"vGIC state: {len(regs)} registers, this vGIC has {len(slots)} "
                         f"({what})")
    values: dict[str, int] = {}
    for s in slots:
        raw = regs.get(s.key)
        if raw is None:
            raise StateError(f"vGIC state: missing register {s.key}")
        try:
            v = int(raw, 16) if isinstance(raw, str) and len(raw) <= 2 + 2 * s.size else None
        except ValueError:
            v = None
        if v is None or not 0 <= v < 1 << 8 * s.size:
            raise StateError(f"vGIC state: register {s.key}: {str(raw)[:40]!r} is not a "
                             f"{8 * s.size}-bit hex value")
        values[s.key] = v
    return slots, values


def restore(state: Any, kind: str, dev: KvmDevice, nr_irqs: int,
            mpidrs: list[int]) -> dict[int, int] | None:
    """Check ``state`` fully, then write it; on a KVM refusal write back what was there.
    Returns the restored input level of every SPI by INTID (None: a v2 vGIC, which has no
    level interface)."""
    slots, values = check(state, kind, dev, nr_irqs, mpidrs)
    before = read(dev, slots)
    try:
        write(dev, slots, values)
    except KvmError as exc:
        try:
            write(dev, slots, before)
        except KvmError:
            pass  # reported below; the machine is not usable either way
        raise StateError(f"vGIC state: KVM refused it ({exc}); the previous state was put "
                         "back") from exc
    levels: dict[int, int] | None = None
    for s in slots:
        if s.group == LEVEL:
            base = s.attr & KVM_DEV_ARM_VGIC_LINE_LEVEL_INTID_MASK
            word = values[s.key]
            levels = levels or {}
            levels.update({base + i: (word >> i) & 1 for i in range(32)})
    return levels
