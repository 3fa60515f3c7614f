"""The ARMv8 thread context: a cache of the vCPU's architectural state, by group.

Groups (each with its own dirty bit, so a push moves only what changed):

* ``GPR``: X0-X30, SP_EL0, PC, PSTATE (what exit handlers need)
* ``EL1``: SP_EL1, ELR_EL1 and the five SPSR banks
* ``FP``: V0-V31 (128 bits each), FPSR, FPCR
* ``SYS``: every other register in ``KVM_GET_REG_LIST`` (system registers, firmware
  pseudo-registers, CCSIDR demux, SVE), keyed by ONE_REG id; unknown ids are kept too.
  Writes are tracked per id.

Assigning a field (``ctx.pc = ...``, ``ctx.x[3] = ...``, ``ctx.sysregs[id] = ...``) marks
its group dirty and tells the run loop (``cpu.mark_context_dirty``) through ``on_change``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any, SupportsIndex

from kvmfw_armv8 import regs


class Group(enum.IntFlag):
    """Register groups of :class:`ArmV8Context`."""

    NONE = 0
    GPR = 1
    EL1 = 2
    FP = 4
    SYS = 8
    ALL = GPR | EL1 | FP | SYS


_SCALARS = {"sp_el0": Group.GPR, "pc": Group.GPR, "pstate": Group.GPR,
            "sp_el1": Group.EL1, "elr_el1": Group.EL1, "fpsr": Group.FP, "fpcr": Group.FP}


class TrackedList(list[int]):
    """A fixed-length list of register values that reports item assignment."""

    def __init__(self, values: Iterable[int], on_set: Callable[[], None]) -> None:
        super().__init__(values)
        self._on_set = on_set

    def __setitem__(self, index: Any, value: Any) -> None:
        if isinstance(index, slice):
            old = len(self)
            super().__setitem__(index, value)
            if len(self) != old:
                raise ValueError("register lists have a fixed length")
        else:
            super().__setitem__(index, value)
        self._on_set()

    def __delitem__(self, index: SupportsIndex | slice) -> None:
        raise TypeError("register lists have a fixed length")


class TrackedRegs(dict[int, int]):
    """System registers by ONE_REG id; records which ids were assigned."""

    def __init__(self, on_set: Callable[[int], None]) -> None:
        super().__init__()
        self._on_set = on_set

    def __setitem__(self, reg_id: int, value: int) -> None:
        super().__setitem__(reg_id, value)
        self._on_set(reg_id)

    def load(self, values: dict[int, int]) -> None:
        """Replace the contents without marking anything dirty (a pull)."""
        dict.clear(self)
        dict.update(self, values)

    def by_name(self, name: str) -> int:
        """The value of a named register (``ctx.sysregs.by_name("SCTLR_EL1")``)."""
        return self[regs.id_of(name)]

    def set_by_name(self, name: str, value: int) -> None:
        self[regs.id_of(name)] = value


class ArmV8Context:
    """Cached arm64 vCPU state with per-group dirty tracking (see the module doc)."""

    x: TrackedList
    spsr: TrackedList
    v: TrackedList
    sysregs: TrackedRegs

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        object.__setattr__(self, "_on_change", on_change)
        object.__setattr__(self, "dirty", Group.NONE)
        object.__setattr__(self, "valid", Group.NONE)
        object.__setattr__(self, "dirty_sysregs", set())
        object.__setattr__(self, "x", TrackedList([0] * 31, lambda: self.mark(Group.GPR)))
        object.__setattr__(self, "spsr", TrackedList([0] * 5, lambda: self.mark(Group.EL1)))
        object.__setattr__(self, "v", TrackedList([0] * 32, lambda: self.mark(Group.FP)))
        object.__setattr__(self, "sysregs", TrackedRegs(self._sysreg_set))
        for name in _SCALARS:
            object.__setattr__(self, name, 0)

    _on_change: Callable[[], None] | None
    dirty: Group
    """Groups changed since the last push."""
    valid: Group
    """Groups that hold state (pulled from KVM or written)."""
    dirty_sysregs: set[int]
    sp_el0: int
    pc: int
    pstate: int
    sp_el1: int
    elr_el1: int
    fpsr: int
    fpcr: int

    def __setattr__(self, name: str, value: Any) -> None:
        group = _SCALARS.get(name)
        if group is None:
            if name in ("x", "spsr", "v", "sysregs"):
                getattr(self, name)[:] = value  # keep tracking: assign in place
                return
            object.__setattr__(self, name, value)
            return
        object.__setattr__(self, name, int(value))
        self.mark(group)

    def mark(self, group: Group) -> None:
        """Mark ``group`` changed (pushed before the next entry)."""
        object.__setattr__(self, "dirty", self.dirty | group)
        object.__setattr__(self, "valid", self.valid | group)
        cb = self._on_change
        if cb is not None:
            cb()

    def _sysreg_set(self, reg_id: int) -> None:
        self.dirty_sysregs.add(reg_id)
        self.mark(Group.SYS)

    def clean(self, group: Group) -> None:
        """Forget the dirty state of ``group`` (after a push)."""
        object.__setattr__(self, "dirty", self.dirty & ~group)
        if group & Group.SYS:
            self.dirty_sysregs.clear()

    # --- raw loads (pulls): no dirty marking ---------------------------------------

    def load_scalar(self, name: str, value: int) -> None:
        object.__setattr__(self, name, value)

    def load_list(self, name: str, values: Iterable[int]) -> None:
        list.__setitem__(getattr(self, name), slice(None), list(values))

    def set_valid(self, group: Group) -> None:
        """After a pull of ``group``: only it (and unpushed writes) hold current state;
        groups not re-read since KVM last ran are stale and never pushed wholesale."""
        object.__setattr__(self, "valid", group | self.dirty)

    # --- views --------------------------------------------------------------------------

    def get(self, name: str) -> int:
        """A register by name: ``X0``..``X30``, ``SP_EL0``, ``PC``, ``PSTATE``, ``SP_EL1``,
        ``ELR_EL1``, ``SPSR_EL1``.., ``V0``.., ``FPSR``, ``FPCR`` or a system register."""
        n = name.upper()
        if n.startswith("X") and n[1:].isdigit():
            return self.x[int(n[1:])]
        if n.startswith("V") and n[1:].isdigit():
            return self.v[int(n[1:])]
        if n in regs.SPSR_BANKS:
            return self.spsr[regs.SPSR_BANKS.index(n)]
        if n.lower() in _SCALARS:
            return int(getattr(self, n.lower()))
        return self.sysregs.by_name(n)

    def core_values(self) -> dict[int, int]:
        """Every core register by ONE_REG id (for pushes and state dumps)."""
        out = dict(zip(regs.X_IDS, self.x, strict=True))
        out.update({regs.SP_EL0_ID: self.sp_el0, regs.PC_ID: self.pc,
                    regs.PSTATE_ID: self.pstate, regs.SP_EL1_ID: self.sp_el1,
                    regs.ELR_EL1_ID: self.elr_el1})
        out.update(zip(regs.SPSR_IDS, self.spsr, strict=True))
        out.update(zip(regs.V_IDS, self.v, strict=True))
        out.update({regs.FPSR_ID: self.fpsr, regs.FPCR_ID: self.fpcr})
        return out

    def as_dict(self) -> dict[str, Any]:
        """Plain data (names for core registers, ids for the rest) for checkpoints."""
        return {
            "x": list(self.x), "sp_el0": self.sp_el0, "pc": self.pc, "pstate": self.pstate,
            "sp_el1": self.sp_el1, "elr_el1": self.elr_el1, "spsr": list(self.spsr),
            "v": [f"{v:#x}" for v in self.v], "fpsr": self.fpsr, "fpcr": self.fpcr,
            "sysregs": {f"{k:#x}": f"{v:#x}" for k, v in self.sysregs.items()},
        }

    def load_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`as_dict` data; marks every group dirty."""
        self.x[:] = state["x"]
        self.spsr[:] = state["spsr"]
        self.v[:] = [int(v, 0) for v in state["v"]]
        for name in _SCALARS:
            setattr(self, name, state[name])
        for k, v in state["sysregs"].items():
            self.sysregs[int(k, 0)] = int(v, 0)
