"""x86 checkpoint state: VM-wide state, the per-vCPU extras beyond the thread context, the
restore order, and the CPU model a checkpoint records.

**VM-wide** (:func:`save_vm`/:func:`restore_vm`): with the in-kernel irqchip, the two
8259 PICs and the IO-APIC (``KVM_GET_IRQCHIP``) and the PIT (``KVM_GET_PIT2``); in both
modes the KVM clock (``KVM_GET_CLOCK``, the kvmclock the guest reads). With the userspace
irqchip the interrupt controller is per vCPU (:func:`save_userspace`). Restored in the
order: the slave PIC, the master (see :data:`APPLY_ORDER`), the IO-APIC, then the PIT
(whose output is a PIC/IO-APIC input), then the clock. The PIT's ``count_load_time`` is
host time of the saving process: KVM ignores it on ``KVM_SET_PIT2`` and restarts each
channel's count from now.

**Per vCPU** (:func:`restore_vcpu`), the order, and why:

1. CPUID: the checkpoint's table, set when the vCPU was created (``vcpu_init``, from
   ``machine.cpu_model``); KVM sizes XSAVE, filters MSRs
   and checks CR4/XCR0 bits against it, so everything below depends on it.
   The TSC rate next: a saved rate more than 250 ppm from this host's is given to the
   vCPU (``KVM_SET_TSC_KHZ``, TSC scaling) before any TSC value; without scaling, a warning.
2. sregs (``KVM_SET_SREGS2``): CR0/CR4/EFER decide which register values are legal
   (e.g. CR4.OSXSAVE before XCR0, EFER.LMA before a 64-bit CS).
3. regs. ``KVM_SET_REGS`` drops a pending exception, so it precedes the events.
4. XCRs, then XSAVE: XCR0 says which XSAVE components the guest has enabled.
5. MSRs: after CPUID (KVM refuses an MSR the CPUID does not expose) and after sregs
   (EFER is in both: the MSR value wins, as it is the same). The TSC is restored here,
   which moves KVM's TSC offset so the guest's TSC continues from the saved value.
   Which MSRs: every one in ``KVM_GET_MSR_INDEX_LIST`` that reads back (``readable_msrs``;
   one that does not is skipped, as KVM cannot give its value either). On kvm_pvm all 40
   listed read back and take their own value back (TSC, TSC_DEADLINE, TSC_ADJUST, the
   SYSCALL/SYSENTER MSRs, PAT, the 8 KVM paravirt MSRs among them); it lists no MTRR,
   EFER, FS/GS base (those are in sregs) or TSC_AUX MSR. The MTRRs, which KVM emulates
   but does not list, are added when the CPUID offers them (``plugin.mtrr_msrs``, as QEMU).
6. Debug registers.
7. Local APIC (``KVM_SET_LAPIC``) after the MSRs: its state is only accepted while the
   APIC base MSR enables it in the mode the state is in (xAPIC/x2APIC). Then
   ``TSC_DEADLINE`` again: KVM drops the deadline unless the APIC timer is already in
   TSC-deadline mode (QEMU orders it the same way).
8. vCPU events last among the registers: ``KVM_SET_REGS``, ``KVM_SET_SREGS`` and
   ``KVM_SET_LAPIC`` each may clear or queue events, so events written before them could
   be lost or doubled.
9. MP state after the events: KVM refuses INIT/SIPI MP states while the events say the
   vCPU is in SMM or an INIT is latched.

Everything from a checkpoint is checked before KVM sees it (:class:`StateError` naming the
field); if KVM still refuses part of it, the vCPU's previous state is written back so no
half-restored vCPU runs. Restore must be fast (``reset_to`` runs it thousands of times a
second): it issues the ``KVM_SET_*`` ioctls, one per group, and one ``KVM_GET_MSRS`` (only
changed MSRs are written); a state equal to the one last restored is not compiled or
backed up again (see :func:`restore_vcpu`).
"""

from __future__ import annotations

import copy
import struct
import weakref
from typing import TYPE_CHECKING, Any

from kvmfw.abi import IOC_READ, IOC_WRITE, define_ioctl, ioctl
from kvmfw.debug import get_logger
from kvmfw.errors import KvmError, StateError
from kvmfw.hookspecs import SyncLevel

from kvmfw_x86 import cpuid as cpuid_mod
from kvmfw_x86.abi import X, addr, ffi
from kvmfw_x86.context import (
    CONTROL,
    EVENT_FIELDS,
    GPRS,
    MSR_IA32_TSC,
    SEGMENTS,
    U64,
    XS_HEADER,
    XS_MIN,
    X86Context,
    _uint,
)

if TYPE_CHECKING:
    from kvmfw_x86.plugin import X86Machine

log = get_logger("kvmfw.x86")

STATE_VERSION = 1
MSR_TSC_DEADLINE = 0x6E0
TSC_TOLERANCE = 4000
"""TSC rates closer than 1/4000 (250 ppm, NTP's tolerance) count as equal: a measured rate
varies that much between runs."""
MP_STATE_MAX = 8
"""The highest ``KVM_MP_STATE_*`` (AP_RESET_HOLD)."""
IOAPIC_BASE = 0xFEC00000

# sizes of the VM-wide structs (linux/kvm.h, asm/kvm.h); moved as bytes
IRQCHIP_SIZE = 8 + 512
"""``struct kvm_irqchip``: chip id, pad, 512-byte union."""
PIC_SIZE = 16
"""``struct kvm_pic_state``."""
IOAPIC_SIZE = 8 + 4 * 4 + 24 * 8
"""``struct kvm_ioapic_state`` (24 pins)."""
PIT_CHANNEL_SIZE = 24
PIT2_SIZE = 3 * PIT_CHANNEL_SIZE + 4 + 9 * 4
"""``struct kvm_pit_state2``."""
PIT_MODE_UNSET = 0xFF
"""A PIT channel's mode before the guest programs it (as KVM reports it)."""
CLOCK_SIZE = 48
"""``struct kvm_clock_data``."""
CHIPS = (("pic_master", 0, PIC_SIZE), ("pic_slave", 1, PIC_SIZE), ("ioapic", 2, IOAPIC_SIZE))
APPLY_ORDER = ("pic_slave", "pic_master", "ioapic")
"""The slave PIC first: KVM re-evaluates the cascade when a PIC is set, so a slave that
still held an old pending request while the master was set would latch IRQ2 into the
restored master's IRR (a spurious interrupt after ``reset_to``)."""

KVM_GET_IRQCHIP = define_ioctl("KVM_GET_IRQCHIP", IOC_READ | IOC_WRITE, 0x62, IRQCHIP_SIZE)
KVM_SET_IRQCHIP = define_ioctl("KVM_SET_IRQCHIP", IOC_READ, 0x63, IRQCHIP_SIZE)
KVM_GET_PIT2 = define_ioctl("KVM_GET_PIT2", IOC_READ, 0x9F, PIT2_SIZE)
KVM_SET_PIT2 = define_ioctl("KVM_SET_PIT2", IOC_WRITE, 0xA0, PIT2_SIZE)
KVM_SET_CLOCK = define_ioctl("KVM_SET_CLOCK", IOC_WRITE, 0x7B, CLOCK_SIZE)
KVM_GET_CLOCK = define_ioctl("KVM_GET_CLOCK", IOC_READ, 0x7C, CLOCK_SIZE)

# CPUID registers that are feature bitmaps: a saved bit this host's KVM does not support
# is a feature the restored guest would lose (checked by check_cpu_model)
FEATURE_LEAVES: dict[tuple[int, int], tuple[str, ...]] = {
    (0x1, 0): ("ecx", "edx"),
    (0x6, 0): ("eax",),
    (0x7, 0): ("ebx", "ecx", "edx"),
    (0x7, 1): ("eax", "edx"),
    (0xD, 0): ("eax", "edx"),
    (0xD, 1): ("eax",),
    (0x14, 0): ("ebx", "ecx"),
    (0x80000001, 0): ("ecx", "edx"),
    (0x80000007, 0): ("edx",),
    (0x80000008, 0): ("ebx",),
}
RUNTIME_BITS: dict[tuple[int, int], dict[str, int]] = {
    (0x1, 0): {"ecx": 1 << 27, "edx": 1 << 9},  # OSXSAVE (CR4.OSXSAVE), APIC (APIC_BASE.EN)
    (0x7, 0): {"ecx": 1 << 4},  # OSPKE (CR4.PKE)
}
"""Feature bits KVM itself turns on and off from the guest's state (``kvm_update_cpuid_runtime``):
a checkpoint's table holds them as the guest left them, and no host "gives" them."""
CPUID_LIMIT = 256
"""At most this many CPUID entries in a model (KVM's own limit is lower)."""


# --- helpers -------------------------------------------------------------------------------

def _hex_bytes(value: Any, size: int, what: str) -> bytes:
    """``value`` (a hex string from a checkpoint) as exactly ``size`` bytes."""
    if not isinstance(value, str) or len(value) != 2 * size:
        raise StateError(f"{what} is not {size} bytes of hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise StateError(f"{what} is not hex") from None


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StateError(f"{what} is a mapping, not {type(value).__name__}")
    return value


# --- VM-wide state ------------------------------------------------------------------------

def _get_chip(vm_fd: int, chip: int) -> bytes:
    buf = ffi.new("uint8_t[]", IRQCHIP_SIZE)
    struct.pack_into("<I", ffi.buffer(buf), 0, chip)
    ioctl(vm_fd, KVM_GET_IRQCHIP, addr(buf), "KVM_GET_IRQCHIP")
    return bytes(ffi.buffer(buf))


def _set_chip(vm_fd: int, raw: bytes) -> None:
    buf = ffi.new("uint8_t[]", raw)
    ioctl(vm_fd, KVM_SET_IRQCHIP, addr(buf), "KVM_SET_IRQCHIP")


def _get(vm_fd: int, nr: int, size: int, what: str) -> bytes:
    buf = ffi.new("uint8_t[]", size)
    ioctl(vm_fd, nr, addr(buf), what)
    return bytes(ffi.buffer(buf))


def _set(vm_fd: int, nr: int, raw: bytes, what: str) -> None:
    buf = ffi.new("uint8_t[]", raw)
    ioctl(vm_fd, nr, addr(buf), what)


def save_vm(st: X86Machine) -> dict[str, Any]:
    """VM-wide state as plain data (see the module docstring)."""
    fd = st.machine.vm.fd
    out: dict[str, Any] = {"version": STATE_VERSION, "irqchip": st.irqchip}
    if st.irqchip == "kernel":
        for name, chip, size in CHIPS:
            out[name] = _get_chip(fd, chip)[8:8 + size].hex()
        out["pit"] = _get(fd, KVM_GET_PIT2, PIT2_SIZE, "KVM_GET_PIT2").hex()
    clock = _get(fd, KVM_GET_CLOCK, CLOCK_SIZE, "KVM_GET_CLOCK")
    out["clock"] = struct.unpack_from("<Q", clock)[0]
    out["tsc_khz"] = st.tsc_khz
    return out


def _check_vm(st: X86Machine, state: Any) -> dict[str, bytes | int]:
    """The VM state checked and converted to the raw structs (StateError otherwise)."""
    state = _mapping(state, "x86 VM state")
    if state.get("version") != STATE_VERSION:
        raise StateError(f"x86 VM state version {state.get('version')!r} is not "
                         f"{STATE_VERSION}")
    if state.get("irqchip") != st.irqchip:
        raise StateError(f"x86 VM state field irqchip: the state is from irqchip="
                         f"{state.get('irqchip')!r}, this machine runs irqchip={st.irqchip}")
    raw: dict[str, bytes | int] = {}
    if st.irqchip == "kernel":
        for name, chip, size in CHIPS:
            body = _hex_bytes(state.get(name), size, f"x86 VM state field {name}")
            raw[name] = struct.pack("<II", chip, 0) + body + bytes(512 - size)
        ioapic = raw["ioapic"]
        assert isinstance(ioapic, bytes)
        base = struct.unpack_from("<Q", ioapic, 8)[0]
        if base != IOAPIC_BASE:
            # KVM routes MMIO to the IO-APIC by this address: a moved one would shadow RAM
            raise StateError(f"x86 VM state field ioapic: base address {base:#x} is not "
                             f"{IOAPIC_BASE:#x}")
        pit = _hex_bytes(state.get("pit"), PIT2_SIZE, "x86 VM state field pit")
        for i in range(3):
            count, = struct.unpack_from("<I", pit, i * PIT_CHANNEL_SIZE)
            mode = pit[i * PIT_CHANNEL_SIZE + 13]
            if count > 0x10000 or (mode > 7 and mode != PIT_MODE_UNSET):
                raise StateError(f"x86 VM state field pit: channel {i} count {count:#x} "
                                 f"or mode {mode} out of range (count <= 0x10000, mode 0-7 "
                                 f"or {PIT_MODE_UNSET:#x})")
        raw["pit"] = pit
    raw["clock"] = _uint(state.get("clock"), 64, "x86 VM state field clock")
    return raw


def restore_vm(st: X86Machine, state: Any) -> None:
    """Load :func:`save_vm` output: everything checked first; if KVM refuses a part, the
    parts already written are put back."""
    good = _VM_GOOD.get(st)
    again = good is not None and state == good[0]
    raw = good[1] if good is not None and again else _check_vm(st, state)
    fd = st.machine.vm.fd
    previous = None if again else save_vm(st)
    try:
        _apply_vm(st, fd, raw)
    except KvmError as exc:
        _VM_GOOD.pop(st, None)
        if previous is not None:
            _apply_vm(st, fd, _check_vm(st, previous))
        raise StateError(f"KVM refused the restored x86 VM state: {exc}") from None
    if not again:
        _VM_GOOD[st] = (copy.deepcopy(state), raw)


_VM_GOOD: weakref.WeakKeyDictionary[Any, tuple[dict[str, Any], dict[str, bytes | int]]] = \
    weakref.WeakKeyDictionary()
"""Per machine: a copy of the last VM state KVM took and its checked raw form (restoring
an equal state again, as ``reset_to`` does, skips the check and the rollback copy)."""


def _apply_vm(st: X86Machine, fd: int, raw: dict[str, bytes | int]) -> None:
    if st.irqchip == "kernel":
        for name in APPLY_ORDER:
            chip = raw[name]
            assert isinstance(chip, bytes)
            _set_chip(fd, chip)
        pit = raw["pit"]
        assert isinstance(pit, bytes)
        _set(fd, KVM_SET_PIT2, pit, "KVM_SET_PIT2")
    clock = raw["clock"]
    assert isinstance(clock, int)
    _set(fd, KVM_SET_CLOCK, struct.pack("<QI", clock, 0).ljust(CLOCK_SIZE, b"\0"),
         "KVM_SET_CLOCK")


# --- the userspace irqchip (per vCPU) --------------------------------------------------

def save_userspace(st: X86Machine, cpu_id: int) -> dict[str, Any]:
    """The userspace irqchip's state for one vCPU: queued vectors, pending NMIs, INIT/SIPI
    state and its local APIC registers."""
    ints = st.interrupts
    out: dict[str, Any] = {
        "pending": list(ints.pending.get(cpu_id, ())),
        "nmis": ints.nmis.get(cpu_id, 0),
        "waiting_for_sipi": cpu_id in ints.waiting_for_sipi,
    }
    if st.lapics is not None:
        out["lapic"] = {str(k): v for k, v in st.lapics.regs[cpu_id].items()}
    return out


def _check_userspace(st: X86Machine, cpu_id: int, state: Any) -> dict[str, Any]:
    from kvmfw_x86.interrupts import MAX_PENDING_NMIS

    state = _mapping(state, "userspace irqchip state")
    pending = state.get("pending")
    if not isinstance(pending, list) or len(pending) > 256:
        raise StateError("userspace irqchip field pending is not a list of at most 256 "
                         "vectors")
    vectors = [_uint(v, 8, "userspace irqchip pending vector") for v in pending]
    if len(set(vectors)) != len(vectors):
        raise StateError("userspace irqchip field pending holds a vector twice")
    nmis = _uint(state.get("nmis"), 8, "userspace irqchip field nmis")
    if nmis > MAX_PENDING_NMIS:
        raise StateError(f"userspace irqchip field nmis: {nmis} > {MAX_PENDING_NMIS}")
    wait = state.get("waiting_for_sipi")
    if not isinstance(wait, bool):
        raise StateError("userspace irqchip field waiting_for_sipi is not a boolean")
    regs: dict[int, int] | None = None
    if st.lapics is not None:
        from kvmfw_x86.lapic import LAPIC_SIZE

        lapic = _mapping(state.get("lapic"), "userspace irqchip field lapic")
        if len(lapic) > LAPIC_SIZE // 16:
            raise StateError("userspace irqchip field lapic has more registers than an APIC")
        regs = {}
        for k, v in lapic.items():
            try:
                off = int(k)
            except (TypeError, ValueError):
                raise StateError(f"userspace local APIC register {k!r} is not a number") \
                    from None
            if not 0 <= off < LAPIC_SIZE or off & 0xF:
                raise StateError(f"userspace local APIC has no register at {k!r}")
            regs[off] = _uint(v, 32, f"userspace local APIC register {off:#x}")
    return {"pending": vectors, "nmis": nmis, "wait": wait, "regs": regs}


def _apply_userspace(st: X86Machine, cpu: Any, checked: dict[str, Any]) -> None:
    from collections import deque

    ints = st.interrupts
    cid = cpu.id
    ints.pending[cid] = deque(checked["pending"])
    ints.nmis[cid] = checked["nmis"]
    ints._init_pending.discard(cid)
    ints._sipi_pending.pop(cid, None)
    if checked["wait"]:
        ints.waiting_for_sipi.add(cid)
    else:
        ints.waiting_for_sipi.discard(cid)
    if checked["regs"] is not None and st.lapics is not None:
        st.lapics.regs[cid] = checked["regs"]
    cpu.interrupt_pending = bool(checked["pending"]) or bool(checked["nmis"])


# --- per-vCPU state ---------------------------------------------------------------------------

def save_vcpu(st: X86Machine, cpu: Any) -> dict[str, Any]:
    """The thread context's groups, then the in-kernel local APIC and MP state (or the
    userspace irqchip's state for this vCPU) and the TSC rate."""
    ctx: X86Context = cpu.get_context(SyncLevel.FULL)
    state = ctx.save()
    state["version"] = STATE_VERSION
    state["tsc_khz"] = st.tsc_khz
    if st.irqchip == "kernel":
        lapic = ffi.new("struct kvm_lapic_state *")
        cpu.vcpu.ioctl(X.KVM_GET_LAPIC, addr(lapic), "KVM_GET_LAPIC")
        state["lapic"] = bytes(ffi.buffer(lapic)).hex()
        mp = ffi.new("struct kvm_mp_state *")
        cpu.vcpu.ioctl(X.KVM_GET_MP_STATE, addr(mp), "KVM_GET_MP_STATE")
        state["mp_state"] = int(mp.mp_state)
    else:
        state["userspace"] = save_userspace(st, cpu.id)
    return state


REGISTER_ORDER = ("sregs", "regs", "xcrs", "xsave", "msrs", "debugregs")
"""The thread-context groups in restore order (events are pushed after the APIC)."""
_SEG_FIELDS = (("base", 64), ("limit", 32), ("selector", 16), ("type", 8), ("present", 8),
               ("dpl", 8), ("db", 8), ("s", 8), ("l", 8), ("g", 8), ("avl", 8),
               ("unusable", 8))
_SEG_NAMES = frozenset(f for f, _ in _SEG_FIELDS)
_REGS = (*GPRS, "rip", "rflags")
_REG_SET = frozenset(_REGS)


class _Scratch:
    """Per-vCPU buffers a state is compiled into before anything reaches the context or
    KVM (so a refused state changes nothing), and a copy of the last state KVM took whole
    (restoring an equal state again skips the compile and the rollback copy)."""

    def __init__(self, ctx: X86Context) -> None:
        self.bufs = {g: ffi.new("uint8_t[]", n) for g, (_, n) in ctx._bufs.items()}
        self.zero = {g: bytes(n) for g, (_, n) in ctx._bufs.items()}
        self.typed = {g: ffi.cast(ffi.typeof(buf), self.bufs[g])
                      for g, (buf, _) in ctx._bufs.items() if g != "xsave"}
        self.good: dict[str, Any] | None = None
        """A copy of the last state KVM took whole; the buffers still hold it compiled."""
        self.good_msrs: dict[int, int] = {}


def _scratch(ctx: X86Context) -> _Scratch:
    sc = ctx.__dict__.get("_ckpt_scratch")
    if sc is None:
        sc = _Scratch(ctx)
        object.__setattr__(ctx, "_ckpt_scratch", sc)
    return sc


def _compile(ctx: X86Context, sc: _Scratch, state: dict[str, Any]) -> dict[int, int]:
    """Check ``state`` and write it into the scratch buffers; returns the MSRs. Raises
    StateError naming the group, having changed nothing but the scratch buffers."""
    group = "state"
    try:
        for g, buf in sc.bufs.items():
            ffi.buffer(buf)[:] = sc.zero[g]
        group = "regs"
        regs = _mapping(state["regs"], "regs")
        if regs.keys() != _REG_SET:
            raise StateError(f"x86 state regs names {sorted(set(regs) ^ _REG_SET)} wrongly")
        struct.pack_into("<18Q", ffi.buffer(sc.bufs["regs"]), 0, *map(regs.__getitem__, _REGS))
        group = "sregs"
        _compile_sregs(sc, _mapping(state["sregs"], "sregs"))
        group = "xsave"
        _compile_xsave(ctx, sc, state["xsave"])
        group = "xcrs"
        xcrs = _mapping(state["xcrs"], "xcrs")
        x = sc.typed["xcrs"]
        if len(xcrs) > len(x.xcrs):
            raise StateError(f"{len(xcrs)} XCRs; KVM takes at most {len(x.xcrs)}")
        for i, (k, v) in enumerate(xcrs.items()):
            x.xcrs[i].xcr = int(k)
            x.xcrs[i].value = v
        x.nr_xcrs = len(xcrs)
        group = "debugregs"
        drs = state["debugregs"]
        if not isinstance(drs, list) or len(drs) != 6:
            raise StateError("debugregs is not a list of 6 registers (DR0-3, DR6, DR7)")
        struct.pack_into("<6Q", ffi.buffer(sc.bufs["debugregs"]), 0, *drs)
        group = "events"
        ev = _mapping(state["events"], "events")
        e = sc.typed["events"]
        for kind, widths in EVENT_FIELDS.items():
            part = _mapping(ev[kind], f"events.{kind}")
            if not part.keys() <= widths.keys():
                raise StateError(f"vCPU event {kind} has no field "
                                 f"{sorted(set(part) - set(widths))}")
            dst = getattr(e, kind)
            for f, v in part.items():
                setattr(dst, f, v)
        e.sipi_vector = ev["sipi_vector"]
        group = "msrs"
        known = ctx.info.msr_indices
        out = {}
        for k, v in _mapping(state["msrs"], "msrs").items():
            index = int(k, 16)
            if index not in known:
                raise StateError(f"MSR {index:#x} is not one this host's KVM saves and "
                                 "restores (foreign state)")
            if type(v) is not int or not 0 <= v <= U64:
                raise StateError(f"MSR {index:#x} = {v!r} is not a 64-bit unsigned integer")
            out[index] = v
        return out
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError,
            struct.error) as exc:
        raise StateError(f"x86 CPU state group {group} is malformed: {type(exc).__name__}: "
                         f"{exc}") from None


_SEG = struct.Struct("<QIH9B")
"""``struct kvm_segment`` (24 bytes, the last one padding)."""
_SEG_ORDER = tuple(f for f, _ in _SEG_FIELDS)
_SREGS_CR = 8 * 24 + 2 * 16
"""Offset of CR0 in ``struct kvm_sregs``/``kvm_sregs2`` (after 8 segments, GDT, IDT)."""


def _compile_sregs(sc: _Scratch, sr: dict[str, Any]) -> None:
    buf = ffi.buffer(sc.bufs["sregs"])
    for i, name in enumerate(SEGMENTS):
        seg = _mapping(sr[name], f"segment {name}")
        if not seg.keys() <= _SEG_NAMES:
            raise StateError(f"segment {name} has no field {sorted(set(seg) - _SEG_NAMES)}")
        _SEG.pack_into(buf, 24 * i, *(seg.get(f, 0) for f in _SEG_ORDER))
    for i, name in enumerate(("gdt", "idt")):
        base, limit = sr[name]
        struct.pack_into("<QH", buf, 8 * 24 + 16 * i, base, limit)
    struct.pack_into("<7Q", buf, _SREGS_CR, *(sr[c] for c in CONTROL))


def _compile_xsave(ctx: X86Context, sc: _Scratch, xs: Any) -> None:
    size = ctx.info.xsave_size
    if not isinstance(xs, str) or not 2 * XS_MIN <= len(xs) <= 2 * size:
        raise StateError(f"XSAVE image is not a hex string of {XS_MIN} to {size} bytes")
    raw = bytes.fromhex(xs)
    xstate_bv, xcomp_bv = struct.unpack_from("<QQ", raw, XS_HEADER)
    if xcomp_bv:
        raise StateError(f"XSAVE image is in compacted format (XCOMP_BV {xcomp_bv:#x})")
    if xstate_bv & ~ctx.info.xfeatures:
        raise StateError(f"XSAVE image holds components {xstate_bv & ~ctx.info.xfeatures:#x} "
                         f"this host does not enable ({ctx.info.xfeatures:#x})")
    ffi.buffer(sc.bufs["xsave"], len(raw))[:] = raw


def restore_vcpu(st: X86Machine, cpu: Any, state: Any) -> None:
    """Load :func:`save_vcpu` output in the order of the module docstring.

    Fast, for ``reset_to`` loops: the state is compiled into scratch buffers and only the
    ``KVM_SET_*`` ioctls (plus one ``KVM_GET_MSRS``, so only changed MSRs are written)
    are issued. A state equal to the last one KVM took whole on this vCPU (a snapshot
    restored in a loop) is neither compiled again nor backed up first (one ``KVM_GET_*``
    per group): KVM took exactly these values before, so it takes them again."""
    state = _mapping(state, "x86 CPU state")
    kernel = st.irqchip == "kernel"
    if "version" in state and state["version"] != STATE_VERSION:
        raise StateError(f"x86 CPU state version {state['version']!r} is not {STATE_VERSION}")
    lapic = None
    mp: int | None = None
    user = None
    if ("lapic" in state or "mp_state" in state) and not kernel:
        raise StateError("the state has an in-kernel local APIC; this machine runs the "
                         "userspace irqchip (irqchip=kernel to restore it)")
    if "userspace" in state and kernel:
        raise StateError("the state is from the userspace irqchip; this machine runs the "
                         "in-kernel one (irqchip=userspace to restore it)")
    if kernel and "lapic" in state:
        lapic = ffi.new("struct kvm_lapic_state *")
        ffi.buffer(lapic)[:] = _hex_bytes(state["lapic"], ffi.sizeof(lapic[0]),
                                          "local APIC state")
    if kernel and "mp_state" in state:
        mp = state["mp_state"]
        if isinstance(mp, bool) or not isinstance(mp, int) or not 0 <= mp <= MP_STATE_MAX:
            raise StateError(f"MP state {mp!r} is not one KVM defines (0 to {MP_STATE_MAX})")
    if not kernel and "userspace" in state:
        user = _check_userspace(st, cpu.id, state["userspace"])
    khz = state.get("tsc_khz", 0)
    _uint(khz, 32, "tsc_khz")
    ctx: X86Context = cpu.context
    sc = _scratch(ctx)
    again = sc.good is not None and state == sc.good
    if again:
        msrs = sc.good_msrs
    else:
        sc.good = None  # the buffers are about to hold another state
        msrs = _compile(ctx, sc, state)
    if any(ctx._dirty.values()):
        cpu.sync_kvm_state()  # the host's own unpushed writes go first (and may be undone)
    if ctx._access_pending():
        # KVM would complete a half-done IO access over the restored registers
        ctx._complete_pending_access()
        cpu.sync_kvm_state()
    previous = None if again else _raw_snapshot(ctx, cpu, kernel)
    if khz and st.tsc_khz and abs(khz - st.tsc_khz) * TSC_TOLERANCE > st.tsc_khz:
        _set_tsc_khz(cpu, khz, st.tsc_khz)
    try:
        _install(ctx, sc, msrs)
        _push_ordered(ctx, cpu, lapic, state)
        if mp is not None:
            mps = ffi.new("struct kvm_mp_state *")
            mps.mp_state = mp
            cpu.vcpu.ioctl(X.KVM_SET_MP_STATE, addr(mps), "KVM_SET_MP_STATE")
    except KvmError as exc:
        sc.good = None
        if previous is not None:
            _put_back(ctx, cpu, previous)
        raise StateError(f"KVM refused the restored x86 state: {exc}") from None
    if not again:
        sc.good, sc.good_msrs = copy.deepcopy(state), msrs
    if user is not None:
        _apply_userspace(st, cpu, user)


def _install(ctx: X86Context, sc: _Scratch, msrs: dict[int, int]) -> None:
    """Copy the compiled groups into the context, each marked dirty (to be pushed)."""
    ctx._need("msrs")  # one KVM_GET_MSRS: only the MSRs that differ are written
    for g, (buf, n) in ctx._bufs.items():
        ffi.memmove(buf, sc.bufs[g], n)
        ffi.memmove(ctx._base[g], sc.bufs[g], n)
        ctx._valid[g] = True
        ctx._dirty[g] = True
    for index, v in msrs.items():
        if ctx._msrs.get(index) != v:
            ctx._msrs[index] = v
            ctx._msr_dirty.add(index)
    ctx._dirty["msrs"] = bool(ctx._msr_dirty)
    ctx._run_key = ctx.cpu.runs


def _push_ordered(ctx: X86Context, cpu: Any, lapic: Any, state: dict[str, Any]) -> None:
    for g in REGISTER_ORDER:
        if ctx._dirty[g]:
            ctx.push(g)
    if lapic is not None:
        cpu.vcpu.ioctl(X.KVM_SET_LAPIC, addr(lapic), "KVM_SET_LAPIC")
        deadline = state.get("msrs", {}).get(f"{MSR_TSC_DEADLINE:#x}")
        if deadline and MSR_TSC_DEADLINE in ctx._msrs:
            # KVM drops the deadline unless the APIC timer is in TSC-deadline mode
            ctx._msrs[MSR_TSC_DEADLINE] = deadline
            ctx._msr_dirty.add(MSR_TSC_DEADLINE)
            ctx.push("msrs")
    if ctx._dirty["events"]:
        ctx.push("events")


def _raw_snapshot(ctx: X86Context, cpu: Any, kernel: bool) -> dict[str, Any]:
    """What the vCPU holds now, as raw buffers (cheap: no conversion to plain data)."""
    ctx.fetch_all()
    snap: dict[str, Any] = {g: bytes(ffi.buffer(buf, n)) for g, (buf, n) in ctx._bufs.items()}
    snap["msrs"] = dict(ctx._msrs)
    if kernel:
        lapic = ffi.new("struct kvm_lapic_state *")
        cpu.vcpu.ioctl(X.KVM_GET_LAPIC, addr(lapic), "KVM_GET_LAPIC")
        snap["lapic"] = lapic
    return snap


def _put_back(ctx: X86Context, cpu: Any, snap: dict[str, Any]) -> None:
    """Write the state :func:`_raw_snapshot` took back (best effort: KVM took it before)."""
    ctx._discard()
    ctx.fetch_all()
    for g, (buf, n) in ctx._bufs.items():
        ffi.buffer(buf, n)[:] = snap[g]
        ctx._dirty[g] = True
    for k, v in snap["msrs"].items():
        if k != MSR_IA32_TSC and ctx._msrs.get(k) != v:
            ctx.set_msr(k, v)
    try:
        _push_ordered(ctx, cpu, snap.get("lapic"), {})
    except KvmError:
        ctx._discard()


def _set_tsc_khz(cpu: Any, khz: int, here: int) -> None:
    """Give the vCPU the saved TSC rate (needs TSC scaling) before its TSC value: a guest
    calibrated its clocks against it. Without scaling the restore goes on at this host's
    rate, with a warning, as QEMU does on a TSC frequency mismatch."""
    try:
        cpu.vcpu.ioctl(X.KVM_SET_TSC_KHZ, khz, "KVM_SET_TSC_KHZ")
    except KvmError as exc:
        # KVM records the refused rate as the vCPU's before it finds it cannot scale to it:
        # put this host's back, or kvmclock would be computed for a rate the TSC lacks
        cpu.vcpu.ioctl(X.KVM_SET_TSC_KHZ, here, "KVM_SET_TSC_KHZ")
        log.warning("cpu%d: the checkpointed guest's TSC ran at %d kHz, this host's at %d kHz, "
                    "and KVM cannot scale it (%s): the guest's clocks will drift", cpu.id, khz,
                    here, exc)


# --- CPU model -------------------------------------------------------------------------------

def cpu_model(st: X86Machine) -> dict[str, Any]:
    """The CPUID table the vCPUs were given (before per-vCPU APIC ids), the TSC rate and
    the XSAVE size, as plain data."""
    return {
        "arch": "x86",
        "cpuid": [[e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx]
                  for e in st.cpuid],
        "tsc_khz": st.tsc_khz,
        "xsave_size": st._info.xsave_size if st._info is not None else 0,
    }


def check_cpu_model(st: X86Machine, model: Any) -> str | None:
    """None if this host's KVM can give every feature ``model`` has, else the first it
    cannot, as a one-line reason."""
    if not isinstance(model, dict) or not isinstance(model.get("cpuid"), list):
        return "the CPU model has no CPUID table (field cpuid)"
    entries = model["cpuid"]
    if len(entries) > CPUID_LIMIT:
        return f"the CPU model has {len(entries)} CPUID entries (at most {CPUID_LIMIT})"
    kvm = st.machine.kvm
    # the table this host gives a guest: the supported one plus what kvmfw adds as QEMU
    # does (hypervisor bit, TSC-deadline): a checkpoint holds those bits too
    host = cpuid_mod.paravirt(cpuid_mod.supported_cpuid(kvm.fd), tsc_deadline=bool(
        kvm.check_extension(cpuid_mod.Cap.TSC_DEADLINE_TIMER)))
    for i, e in enumerate(entries):
        if not isinstance(e, list) or len(e) != 7 or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 32 for v in e):
            return f"CPU model field cpuid[{i}] is not 7 32-bit integers"
        fn, idx = e[0], e[1]
        regs = FEATURE_LEAVES.get((fn, idx))
        if regs is None:
            continue
        have = cpuid_mod.find(host, fn, idx)
        for r in regs:
            want = e[3 + ("eax", "ebx", "ecx", "edx").index(r)]
            got = getattr(have, r) if have is not None else 0
            missing = want & ~got & ~RUNTIME_BITS.get((fn, idx), {}).get(r, 0)
            if missing:
                return (f"this host's KVM cannot give CPUID leaf {fn:#x}.{idx} {r} bits "
                        f"{missing:#x} that the checkpointed CPU has (KVM_GET_SUPPORTED_CPUID)")
    size = model.get("xsave_size", 0)
    if isinstance(size, int) and st._info is not None and size > st._info.xsave_size:
        return (f"the checkpointed XSAVE area is {size} bytes; this host's is "
                f"{st._info.xsave_size}")
    return None
