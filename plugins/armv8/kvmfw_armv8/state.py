"""Complete arm64 vCPU state as plain data: every ONE_REG id of ``KVM_GET_REG_LIST`` and
the MP state; and the CPU model (ID registers, vCPU features) a checkpoint records.

Restore order (:func:`restore_order`), and why:

1. firmware pseudo-registers (``KVM_REG_ARM_FW``: PSCI version, SMCCC workarounds;
   ``KVM_REG_ARM_FW_FEAT_BMAP``: hypercall service bitmaps): they configure what the guest
   sees of the hypervisor; the bitmaps are writable only before the VM first runs (the same
   value is always accepted), so they go first.
2. system registers (ID registers, MMU/exception state, debug, PMU), CCSIDR demux: no
   ordering between them in KVM; ID registers are written with the value this host gives
   (checked by ``check_cpu_model``), which KVM accepts also after the VM has run.
3. SVE Z/P/FFR slices (the vector length ``KVM_REG_ARM64_SVE_VLS`` is fixed by
   ``KVM_ARM_VCPU_FINALIZE`` at vCPU init: it is compared, never written).
4. the arch timers: the counter (``KVM_REG_ARM_TIMER_CNT``; physical too where listed)
   first, since writing it sets the VM's counter offset; then the compare value, then
   the control register, so the timer is enabled against the restored counter and compare
   value, never a stale one (no spurious interrupt latched in between). TVAL views are
   derived from CVAL and the counter, so not written.
5. core registers: EL1 banked (SP_EL1, ELR_EL1, SPSRs), FP/SIMD, then the general
   registers with PSTATE before PC.
6. the MP state (``KVM_SET_MP_STATE``) last: a secondary powered off at init becomes
   runnable only once its registers hold the restored state (the bring-up poll of
   ``plugin.py`` then activates it).

Every id and value is checked before KVM sees any (the id set must be exactly the vCPU's
list, each value must fit the width its id encodes); if KVM refuses a write midway, the
values read before the restore are written back, so no half-restored vCPU runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvmfw.abi import address_of, ffi
from kvmfw.errors import KvmError, StateError
from kvmfw_armv8 import abi, regs

if TYPE_CHECKING:
    from kvmfw.vcpu import VCpu

FORMAT = 1
"""Version of the plain-data vCPU state."""

MP_STATES = {0: "RUNNABLE", 5: "STOPPED", 9: "SUSPENDED"}
"""MP states arm64 KVM reports and accepts (``KVM_MP_STATE_*``)."""

PTIMER_CTL = regs.sysreg(3, 3, 14, 2, 1)
PTIMER_CNT = regs.sysreg(3, 3, 14, 0, 1)
PTIMER_CVAL = regs.sysreg(3, 3, 14, 2, 2)
TIMER_ORDER: tuple[int, ...] = (regs.KVM_REG_ARM_TIMER_CNT, PTIMER_CNT,
                                regs.KVM_REG_ARM_TIMER_CVAL, PTIMER_CVAL,
                                regs.KVM_REG_ARM_TIMER_CTL, PTIMER_CTL)
NOT_WRITTEN: frozenset[int] = frozenset({regs.SYSREG_BY_NAME["CNTV_TVAL_EL0"],
                                         regs.SYSREG_BY_NAME["CNTP_TVAL_EL0"],
                                         regs.KVM_REG_ARM64_SVE_VLS})
"""Saved and compared, never written (derived views; the finalized SVE vector lengths)."""


def _rank(rid: int) -> tuple[int, int]:
    kind = regs.decode(rid).kind
    if rid in TIMER_ORDER:
        return 4, TIMER_ORDER.index(rid)
    if rid in regs.CORE_IDS:
        for n, ids in ((5, regs.EL1_IDS), (6, regs.FP_IDS)):
            if rid in ids:
                return n, 0
        return 7, 1 if rid == regs.PC_ID else 0
    return {"fw": 1, "fw_bmap": 1, "sysreg": 2, "demux": 2, "sve": 3}.get(kind, 2), 0


def restore_order(ids: list[int]) -> list[int]:
    """``ids`` in the order a restore writes them (see the module doc)."""
    return sorted(ids, key=lambda r: (*_rank(r), r))


def get_mp_state(vcpu: VCpu) -> int:
    buf = ffi.new("uint32_t *")
    vcpu.ioctl(abi.KVM_GET_MP_STATE, address_of(buf), "KVM_GET_MP_STATE")
    return int(buf[0])


def set_mp_state(vcpu: VCpu, value: int) -> None:
    buf = ffi.new("uint32_t *", value)
    vcpu.ioctl(abi.KVM_SET_MP_STATE, address_of(buf), f"KVM_SET_MP_STATE {value}")


def save(vcpu: VCpu, reg_ids: list[int]) -> tuple[dict[str, str], list[str], int]:
    """``(regs, unreadable, mp_state)``: every listed id's value as hex, the ids KVM
    lists but refuses to read now, and the MP state."""
    out: dict[str, str] = {}
    unreadable: list[str] = []
    for rid in reg_ids:
        try:
            out[f"{rid:#x}"] = f"{vcpu.get_one_reg(rid):#x}"
        except KvmError:
            unreadable.append(f"{rid:#x}")
    return out, unreadable, get_mp_state(vcpu)


def _hex_id(raw: Any, listed: set[int], what: str) -> int:
    if not isinstance(raw, str) or len(raw) > 18:
        raise StateError(f"{what}: register id {str(raw)[:24]!r} is not a 64-bit hex id")
    try:
        rid = int(raw, 16)
    except ValueError:
        raise StateError(f"{what}: register id {raw!r} is not hex") from None
    if rid not in listed:
        raise StateError(f"{what}: this vCPU has no register {regs.name_of(rid)} ({raw})")
    return rid


def check(state: Any, reg_ids: list[int], mpidr: int, features: int) -> tuple[
        dict[int, int], int]:
    """Validate a saved vCPU state against this vCPU; returns ``(values by id, mp_state)``.
    StateError names the first field that does not fit; nothing is written here."""
    what = f"vCPU state (MPIDR {mpidr:#x})"
    if not isinstance(state, dict):
        raise StateError(f"{what}: not a mapping")
    if state.get("arch") != "armv8":
        raise StateError(f"{what}: not an armv8 vCPU state (arch={state.get('arch')!r})")
    if state.get("format") != FORMAT:
        raise StateError(f"{what}: format {state.get('format')!r}, this plugin reads {FORMAT}")
    if state.get("mpidr") != mpidr:
        raise StateError(f"{what}: saved for MPIDR {state.get('mpidr')!r}")
    if state.get("features") != features:
        raise StateError(f"{what}: vCPU features {state.get('features')!r}, this vCPU was "
                         f"initialised with {features:#x}")
    mp = state.get("mp_state")
    if isinstance(mp, bool) or mp not in MP_STATES:
        raise StateError(f"{what}: mp_state {str(mp)[:24]!r} is not one of "
                         f"{sorted(MP_STATES)}")
    saved, unread = state.get("regs"), state.get("unreadable", [])
    if not isinstance(saved, dict) or not isinstance(unread, list):
        raise StateError(f"{what}: regs is not a mapping or unreadable not a list")
    listed = set(reg_ids)
    if len(saved) + len(unread) != len(listed):  # bounded before anything walks them
        raise StateError(f"{what}: {len(saved) + len(unread)} registers, this vCPU has "
                         f"{len(listed)} in KVM_GET_REG_LIST")
    values: dict[int, int] = {}
    for raw, val in saved.items():
        rid = _hex_id(raw, listed, what)
        size = regs.reg_size(rid)
        if not isinstance(val, str) or len(val) > 2 + 2 * size:
            raise StateError(f"{what}: {regs.name_of(rid)}: value is not hex of {size} bytes")
        try:
            v = int(val, 16)
        except ValueError:
            raise StateError(f"{what}: {regs.name_of(rid)}: {val[:40]!r} is not hex") from None
        if not 0 <= v < 1 << 8 * size:
            raise StateError(f"{what}: {regs.name_of(rid)}: value does not fit {size} bytes")
        values[rid] = v
    skipped = {_hex_id(raw, listed, what) for raw in unread}
    missing = listed - set(values) - skipped
    if missing:
        raise StateError(f"{what}: register {regs.name_of(min(missing))} is missing")
    return values, int(mp)


def restore(vcpu: VCpu, values: dict[int, int], mp_state: int) -> None:
    """Write checked ``values`` in :func:`restore_order`, then the MP state. On a KVM
    refusal the previous values are written back and StateError names every refusal."""
    for rid in NOT_WRITTEN & values.keys():
        if rid == regs.KVM_REG_ARM64_SVE_VLS and vcpu.get_one_reg(rid) != values[rid]:
            raise StateError("SVE vector lengths (KVM_REG_ARM64_SVE_VLS) differ from this "
                             "vCPU's: start the machine with the checkpoint's sve setting")
    order = [r for r in restore_order(list(values)) if r not in NOT_WRITTEN]
    before = {r: vcpu.get_one_reg(r) for r in order}
    before_mp = get_mp_state(vcpu)
    failures: list[tuple[str, KvmError]] = []
    for rid in order:
        try:
            vcpu.set_one_reg(rid, values[rid])
        except KvmError as exc:
            failures.append((regs.name_of(rid), exc))
    if not failures:
        try:
            set_mp_state(vcpu, mp_state)
            return
        except KvmError as exc:
            failures.append(("MP_STATE", exc))
    for rid in order:  # put back what the vCPU held
        try:
            vcpu.set_one_reg(rid, before[rid])
        except KvmError:
            pass
    try:
        set_mp_state(vcpu, before_mp)
    except KvmError:
        pass
    shown = "; ".join(f"{n}: {e}" for n, e in failures[:4])
    more = f" and {len(failures) - 4} more" if len(failures) > 4 else ""
    raise StateError(f"KVM refused {len(failures)} register(s) of the restored state "
                     f"({shown}{more}); the previous state was put back")


# --- the CPU model ------------------------------------------------------------------------

def is_model_reg(rid: int) -> bool:
    """ID-space registers (what the guest sees of the CPU), cache geometry and firmware
    pseudo-registers; MPIDR (per vCPU) is not part of the model."""
    info = regs.decode(rid)
    if info.kind in ("fw", "fw_bmap", "demux"):
        return True
    if info.kind == "sve":
        return rid == regs.KVM_REG_ARM64_SVE_VLS
    if info.kind != "sysreg":
        return False
    op0, op1, crn, crm, op2 = regs.sysreg_fields(rid)
    if rid == regs.MPIDR_EL1:
        return False
    return (op0, op1, crn) == (3, 0, 0) or (op0, op1, crn, crm) in (
        (3, 1, 0, 0), (3, 3, 0, 0))  # CLIDR/CCSIDR/AIDR, CTR/DCZID


def model(vcpu: VCpu, reg_ids: list[int]) -> dict[str, str]:
    """The model registers of a vCPU by name (hex values)."""
    out = {}
    for rid in reg_ids:
        if is_model_reg(rid):
            try:
                out[f"{rid:#x}"] = f"{vcpu.get_one_reg(rid):#x}"
            except KvmError:
                continue
    return out


def compare_model(saved: Any, here: dict[str, Any]) -> str | None:
    """None if ``saved`` (a checkpoint's model) is what this host gives, else the first
    field that differs, as a one-line reason."""
    if not isinstance(saved, dict):
        return "the CPU model is not a mapping"
    for key in ("arch", "target", "features", "gic", "sve"):
        if saved.get(key) != here[key]:
            return (f"CPU model field {key!r} is {str(saved.get(key))[:40]!r} in the "
                    f"checkpoint, this host's KVM gives {here[key]!r}")
    sregs, hregs = saved.get("id_regs"), here["id_regs"]
    if not isinstance(sregs, dict) or len(sregs) > 4 * len(hregs) + 16:
        return "CPU model field 'id_regs' is not a mapping of this host's size"
    for raw, val in hregs.items():
        got = sregs.get(raw)
        if got != val:
            name = regs.name_of(int(raw, 16))
            return (f"ID register {name} is {str(got)[:24]} in the checkpoint, this host's "
                    f"KVM gives {val}" if got is not None
                    else f"ID register {name} of this host is not in the checkpoint")
    for raw in sregs:
        if raw not in hregs:
            return f"ID register {str(raw)[:24]} of the checkpoint does not exist on this host"
    return None
