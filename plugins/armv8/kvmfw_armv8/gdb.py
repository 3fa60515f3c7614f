"""AArch64 for the GDB stub: target description, registers, guest debug, page walks.

Target description ``aarch64``: GDB's ``org.gnu.gdb.aarch64.core`` (x0-x30, sp, pc, cpsr)
and ``.fpu`` (v0-v31 as GDB's ``aarch64v`` union, fpsr, fpcr), plus ``org.kvmfw.aarch64.sys``
with the EL1 system registers a kernel debugger reads (SCTLR, TCR, TTBR0/1, MAIR, VBAR,
ESR, FAR, ELR, SPSR, SP_EL0, SP_EL1). ``sp`` is the stack pointer PSTATE.SP selects.

Debugging goes through ``KVM_SET_GUEST_DEBUG`` (``struct kvm_guest_debug_arch``: 16 each of
DBGBCR/DBGBVR/DBGWCR/DBGWVR): hardware breakpoints in the breakpoint registers
(``KVM_CAP_GUEST_DEBUG_HW_BPS`` of them), watchpoints in the watchpoint registers
(``..._HW_WPS``, at most 8 bytes inside one aligned doubleword each), software breakpoints
as ``BRK #0`` written into guest memory with ``KVM_GUESTDBG_USE_SW_BP`` (KVM traps BRK64 to
userspace), single step with ``KVM_GUESTDBG_SINGLESTEP``. Why a vCPU stopped comes from the
exception class in ``kvm_debug_exit_arch.hsr`` (and ``far`` for a watchpoint). A BRK that
kvmfw did not insert (the guest's own) cannot be handed back through this API (arm64 has
no ``KVM_GUESTDBG_INJECT_BP``): it stops as a software breakpoint, as under QEMU's stub.

Virtual addresses: identity with the stage-1 MMU off (SCTLR_EL1.M = 0), else a walk of the
4 KiB-granule tables of TTBR0/TTBR1 by TCR_EL1 (16 and 64 KiB granules: not mapped).
"""

from __future__ import annotations

import struct
import weakref
from typing import Any

from kvmfw.abi import IOCTLS, address_of, ffi
from kvmfw.gdb import BreakKind, Breakpoint, Feature, GdbError, GdbTarget, GdbUnsupported, Reg, Stop
from kvmfw.hookspecs import SyncLevel
from kvmfw.vcpu import RUN_PAYLOAD
from kvmfw_armv8 import aarch32
from kvmfw_armv8.context import ArmV8Context

GUESTDBG_ENABLE = 0x1
GUESTDBG_SINGLESTEP = 0x2
GUESTDBG_USE_SW_BP = 0x10000
GUESTDBG_USE_HW = 0x20000
KVM_CAP_GUEST_DEBUG_HW_BPS = 119
KVM_CAP_GUEST_DEBUG_HW_WPS = 120
MAX_DBG = 16
_GUEST_DEBUG = struct.Struct("<II64Q")  # control, pad, bcr[16], bvr[16], wcr[16], wvr[16]
_DEBUG_EXIT = struct.Struct("<IIQ")     # hsr, hsr_high, far
BRK0 = 0xD4200000
BKPT_A32 = 0xE1200070   # BKPT #0 (A32)
BKPT_T16 = 0xBE00       # BKPT #0 (T32)
EC_BKPT32 = 0x38
EC_HW_BP = (0x30, 0x31)
EC_STEP = (0x32, 0x33)
EC_WATCH = (0x34, 0x35)
EC_BRK64 = 0x3C
BCR_EXEC = 1 | (3 << 1) | (0xF << 5)    # enabled, EL1 and EL0, A64 instruction
_MASK64 = (1 << 64) - 1

SYS_REGS = ("SCTLR_EL1", "TCR_EL1", "TTBR0_EL1", "TTBR1_EL1", "MAIR_EL1", "VBAR_EL1",
            "ESR_EL1", "FAR_EL1")

_CPSR_FLAGS = """<flags id="cpsr_flags" size="4">
<field name="SP" start="0" end="0"/><field name="EL" start="2" end="3"/>
<field name="nRW" start="4" end="4"/><field name="F" start="6" end="6"/>
<field name="I" start="7" end="7"/><field name="A" start="8" end="8"/>
<field name="D" start="9" end="9"/><field name="SS" start="21" end="21"/>
<field name="V" start="28" end="28"/><field name="C" start="29" end="29"/>
<field name="Z" start="30" end="30"/><field name="N" start="31" end="31"/></flags>"""
_VTYPES = """<vector id="v2d" type="ieee_double" count="2"/>
<vector id="v2u" type="uint64" count="2"/><vector id="v2i" type="int64" count="2"/>
<vector id="v4f" type="ieee_single" count="4"/><vector id="v4u" type="uint32" count="4"/>
<vector id="v4i" type="int32" count="4"/><vector id="v8u" type="uint16" count="8"/>
<vector id="v8i" type="int16" count="8"/><vector id="v16u" type="uint8" count="16"/>
<vector id="v16i" type="int8" count="16"/><vector id="v1u" type="uint128" count="1"/>
<vector id="v1i" type="int128" count="1"/>
<union id="vnd"><field name="f" type="v2d"/><field name="u" type="v2u"/>
<field name="s" type="v2i"/></union>
<union id="vns"><field name="f" type="v4f"/><field name="u" type="v4u"/>
<field name="s" type="v4i"/></union>
<union id="vnh"><field name="u" type="v8u"/><field name="s" type="v8i"/></union>
<union id="vnb"><field name="u" type="v16u"/><field name="s" type="v16i"/></union>
<union id="vnq"><field name="u" type="v1u"/><field name="s" type="v1i"/></union>
<union id="aarch64v"><field name="d" type="vnd"/><field name="s" type="vns"/>
<field name="h" type="vnh"/><field name="b" type="vnb"/><field name="q" type="vnq"/></union>"""


def _arm_features() -> tuple[Feature, ...]:
    """GDB's 32-bit ARM description (an el1_32bit vCPU in AArch32 state)."""
    core = Feature("org.gnu.gdb.arm.core",
                   tuple(Reg(f"r{i}", 32, "uint32") for i in range(13))
                   + (Reg("sp", 32, "data_ptr"), Reg("lr", 32, "int"),
                      Reg("pc", 32, "code_ptr"), Reg("cpsr", 32, "int")))
    vfp = Feature("org.gnu.gdb.arm.vfp",
                  tuple(Reg(f"d{i}", 64, "ieee_double", "float") for i in range(32))
                  + (Reg("fpscr", 32, "int", "float"),))
    return core, vfp


def _features() -> tuple[Feature, ...]:
    core = Feature("org.gnu.gdb.aarch64.core",
                   tuple(Reg(f"x{i}", 64, "int") for i in range(29))
                   + (Reg("x29", 64, "data_ptr"), Reg("x30", 64, "code_ptr"),
                      Reg("sp", 64, "data_ptr"), Reg("pc", 64, "code_ptr"),
                      Reg("cpsr", 32, "cpsr_flags")), _CPSR_FLAGS)
    fpu = Feature("org.gnu.gdb.aarch64.fpu",
                  tuple(Reg(f"v{i}", 128, "aarch64v", "vector") for i in range(32))
                  + (Reg("fpsr", 32, "int", "float"), Reg("fpcr", 32, "int", "float")),
                  _VTYPES)
    sys_ = Feature("org.kvmfw.aarch64.sys",
                   tuple(Reg(n.lower(), 64, "int", "system") for n in SYS_REGS)
                   + (Reg("elr_el1", 64, "code_ptr", "system"),
                      Reg("spsr_el1", 64, "int", "system"),
                      Reg("sp_el0", 64, "data_ptr", "system"),
                      Reg("sp_el1", 64, "data_ptr", "system")))
    return core, fpu, sys_


_targets: weakref.WeakKeyDictionary[Any, GdbTarget] = weakref.WeakKeyDictionary()


def _limits(cpu: Any) -> tuple[int, int]:
    vm = cpu.machine.vm
    return (min(vm.check_extension(KVM_CAP_GUEST_DEBUG_HW_BPS), MAX_DBG),
            min(vm.check_extension(KVM_CAP_GUEST_DEBUG_HW_WPS), MAX_DBG))


def target(cpu: Any) -> GdbTarget:
    t = _targets.get(cpu.machine)
    if t is None:
        bps, wps = _limits(cpu)
        notes: tuple[str, ...] = (f"{bps} hardware breakpoints and {wps} watchpoints "
                 "(KVM_CAP_GUEST_DEBUG_HW_BPS/WPS); software breakpoints are BRK #0 in guest "
                 "memory",)
        ctx: ArmV8Context = cpu.get_context(SyncLevel.RUNTIME)
        if aarch32.is_aarch32(ctx):
            notes += ("AArch32 vCPU: GDB's arm description; virtual addresses are physical "
                      "only with the MMU off (short/long-descriptor walks not done)",)
            t = GdbTarget("arm", _arm_features(), notes)
        else:
            t = GdbTarget("aarch64", _features(), notes)
        _targets[cpu.machine] = t
    return t


# --- registers ---------------------------------------------------------------------------

def _sp_is_el1(ctx: ArmV8Context) -> bool:
    return bool(ctx.pstate & 1) and (ctx.pstate >> 2) & 3 >= 1


def _read(ctx: ArmV8Context, name: str) -> int:
    if name[0] == "x" and name[1:].isdigit():
        return ctx.x[int(name[1:])]
    if name[0] == "v" and name[1:].isdigit():
        return ctx.v[int(name[1:])]
    if name == "sp":
        return ctx.sp_el1 if _sp_is_el1(ctx) else ctx.sp_el0
    if name == "cpsr":
        return ctx.pstate & 0xFFFFFFFF
    if name in ("pc", "fpsr", "fpcr", "sp_el0", "sp_el1", "elr_el1"):
        return int(getattr(ctx, name))
    if name == "spsr_el1":
        return ctx.spsr[0]
    try:
        return ctx.sysregs.by_name(name.upper())
    except (KeyError, ValueError):
        return 0  # not in this KVM's register list


def _a32_read(ctx: ArmV8Context, name: str) -> int:
    v = aarch32.A32View(ctx)
    if name[0] == "r" and name[1:].isdigit():
        return v.r(int(name[1:]))
    if name[0] == "d" and name[1:].isdigit():
        return v.d(int(name[1:]))
    return {"sp": lambda: v.r(13), "lr": lambda: v.r(14), "pc": lambda: v.pc,
            "cpsr": lambda: v.cpsr, "fpscr": lambda: v.fpscr}[name]()


def read_registers(cpu: Any) -> list[bytes]:
    ctx: ArmV8Context = cpu.get_context(SyncLevel.FULL)
    t = target(cpu)
    if t.architecture == "arm":
        return [_a32_read(ctx, r.name).to_bytes(r.bits // 8, "little") for r in t.registers]
    return [(_read(ctx, r.name) & ((1 << r.bits) - 1)).to_bytes(r.bits // 8, "little")
            for r in target(cpu).registers]


def write_register(cpu: Any, regnum: int, value: bytes) -> bool:
    names = target(cpu).registers
    if not 0 <= regnum < len(names):
        return False
    name = names[regnum].name
    ctx: ArmV8Context = cpu.get_context(SyncLevel.FULL)
    v = int.from_bytes(value, "little")
    if target(cpu).architecture == "arm":
        view = aarch32.A32View(ctx)
        num = {"sp": 13, "lr": 14, "pc": 15}.get(name)
        if num is not None or (name[0] == "r" and name[1:].isdigit()):
            view.set_r(num if num is not None else int(name[1:]), v)
        elif name[0] == "d" and name[1:].isdigit():
            view.set_d(int(name[1:]), v)
        elif name == "cpsr":
            view.cpsr = v
        elif name == "fpscr":
            view.fpscr = v
        else:
            return False
        return True
    if name[0] == "x" and name[1:].isdigit():
        ctx.x[int(name[1:])] = v
    elif name[0] == "v" and name[1:].isdigit():
        ctx.v[int(name[1:])] = v
    elif name == "sp":
        if _sp_is_el1(ctx):
            ctx.sp_el1 = v
        else:
            ctx.sp_el0 = v
    elif name == "cpsr":
        ctx.pstate = v
    elif name in ("pc", "fpsr", "fpcr", "sp_el0", "sp_el1", "elr_el1"):
        setattr(ctx, name, v)
    elif name == "spsr_el1":
        ctx.spsr[0] = v
    else:
        try:
            ctx.sysregs.set_by_name(name.upper(), v)
        except (KeyError, ValueError):
            return False
    return True


# --- guest debug ----------------------------------------------------------------------------

_slots: weakref.WeakKeyDictionary[Any, tuple[list[Breakpoint], list[Breakpoint]]] = \
    weakref.WeakKeyDictionary()
_brk: weakref.WeakKeyDictionary[Any, dict[int, tuple[int, bytes]]] = weakref.WeakKeyDictionary()


def watch_registers(bp: Breakpoint) -> tuple[int, int]:
    """``(DBGWCR, DBGWVR)`` for a watchpoint of ``bp.length`` bytes at ``bp.address``
    (inside one aligned doubleword: byte-address-select bits)."""
    off = bp.address & 7
    if not 1 <= bp.length <= 8 or off + bp.length > 8:
        raise GdbError(f"an AArch64 watchpoint covers 1-8 bytes inside one aligned doubleword, "
                       f"not {bp.length} at {bp.address:#x}")
    lsc = {BreakKind.READ: 1, BreakKind.WRITE: 2, BreakKind.ACCESS: 3}[bp.kind]
    bas = ((1 << bp.length) - 1) << off
    return 1 | (3 << 1) | (lsc << 3) | (bas << 5), bp.address & ~7 & _MASK64


def set_guest_debug(cpu: Any, step: bool, breakpoints: list[Breakpoint]) -> bool:
    nbp, nwp = _limits(cpu)
    hw = [b for b in breakpoints if b.kind == BreakKind.HARDWARE]
    wp = [b for b in breakpoints if b.kind in (BreakKind.WRITE, BreakKind.READ,
                                               BreakKind.ACCESS)]
    sw = [b for b in breakpoints if b.kind == BreakKind.SOFTWARE]
    if len(hw) > nbp:
        raise GdbError(f"no free breakpoint register: this KVM gives {nbp}")
    if len(wp) > nwp:
        raise GdbError(f"no free watchpoint register: this KVM gives {nwp}")
    if any(b.kind not in (BreakKind.SOFTWARE, BreakKind.HARDWARE, BreakKind.WRITE,
                          BreakKind.READ, BreakKind.ACCESS) for b in breakpoints):
        raise GdbUnsupported("unknown breakpoint kind")
    words = [0] * 64
    for i, b in enumerate(hw):
        words[i], words[16 + i] = BCR_EXEC, b.address & ~3 & _MASK64
    for i, b in enumerate(wp):
        words[32 + i], words[48 + i] = watch_registers(b)
    _sync_brk(cpu, sw)
    control = 0
    if hw or wp or sw or step:
        control = GUESTDBG_ENABLE
        control |= GUESTDBG_SINGLESTEP if step else 0
        control |= GUESTDBG_USE_HW if (hw or wp) else 0
        control |= GUESTDBG_USE_SW_BP if sw else 0
    cpu.sync_kvm_state()
    buf = ffi.new("uint8_t[]", _GUEST_DEBUG.pack(control, 0, *words))
    cpu.vcpu.ioctl(IOCTLS.KVM_SET_GUEST_DEBUG, address_of(buf), "KVM_SET_GUEST_DEBUG")
    _slots[cpu] = (hw, wp)
    return True


def _sync_brk(cpu: Any, sw: list[Breakpoint]) -> None:
    """Guest memory holds ``BRK #0`` exactly at ``sw``'s addresses (VM-wide, idempotent)."""
    machine = cpu.machine
    inserted = _brk.setdefault(machine, {})
    want = {b.address for b in sw}
    mem = machine.memory
    for va in list(inserted):
        if va not in want:
            pa, orig = inserted.pop(va)
            if mem.contains(pa):
                mem.write(pa, orig)
    a32 = target(cpu).architecture == "arm"
    kinds = {b.address: b.length for b in sw}
    for va in want - set(inserted):
        size = kinds[va] if a32 and kinds[va] == 2 else 4
        if va % size:
            raise GdbError(f"a breakpoint address must be {size}-byte aligned, not {va:#x}")
        where = translate(cpu, va)
        if where is None or not mem.contains(where):
            raise GdbError(f"cannot insert a breakpoint at {va:#x}: not mapped to RAM")
        inserted[va] = (where, mem.read(where, size))
        insn = (BKPT_T16.to_bytes(2, "little") if size == 2 else
                (BKPT_A32 if a32 else BRK0).to_bytes(4, "little"))
        mem.write(where, insn)


def debug_exit(cpu: Any) -> Stop:
    hsr, _high, far = _DEBUG_EXIT.unpack_from(cpu.vcpu.run_map, RUN_PAYLOAD)
    ec = hsr >> 26
    if ec in (EC_BRK64, EC_BKPT32):
        return Stop("swbreak")  # kvmfw's BRK, or the guest's own (GDB then shows SIGTRAP)
    if ec in EC_STEP:
        return Stop("step")
    if ec in EC_HW_BP:
        return Stop("hwbreak")
    if ec in EC_WATCH:
        _hw, wp = _slots.get(cpu, ([], []))
        for b in wp:
            if b.address & ~7 <= far < (b.address & ~7) + 8:
                return Stop({BreakKind.WRITE: "watch", BreakKind.READ: "rwatch"}.get(
                    b.kind, "awatch"), b.address)
        return Stop("watch", far)
    return Stop("trap")


# --- virtual -> physical ---------------------------------------------------------------------

def translate(cpu: Any, vaddr: int) -> int | None:
    """Stage-1 EL1&0 translation of ``vaddr`` (4 KiB granule; MMU off: identity)."""
    ctx: ArmV8Context = cpu.get_context(SyncLevel.FULL)
    try:
        sctlr = ctx.sysregs.by_name("SCTLR_EL1")
        tcr = ctx.sysregs.by_name("TCR_EL1")
    except (KeyError, ValueError):
        return vaddr
    vaddr &= _MASK64
    if not sctlr & 1:
        return vaddr
    if aarch32.is_aarch32(ctx):
        return None  # AArch32 translation tables: not walked here
    upper = bool(vaddr >> 63)
    tsz = (tcr >> 16) & 0x3F if upper else tcr & 0x3F
    tg = (tcr >> 30) & 3 if upper else (tcr >> 14) & 3
    if (upper and tg != 2) or (not upper and tg != 0):
        return None  # 16 or 64 KiB granule: not walked here
    if (tcr >> (23 if upper else 7)) & 1:  # EPD1/EPD0: walks disabled
        return None
    bits = 64 - tsz
    if upper:
        if vaddr >> bits != (1 << tsz) - 1:
            return None
    elif vaddr >> bits:
        return None
    ttbr = ctx.sysregs.by_name("TTBR1_EL1" if upper else "TTBR0_EL1")
    table = ttbr & 0x0000_FFFF_FFFF_FFFE
    level = 4 - (bits - 12 + 8) // 9  # first level that resolves the top bits
    mem = cpu.machine.memory
    for lvl in range(level, 4):
        shift = 12 + 9 * (3 - lvl)
        idx = (vaddr >> shift) & 0x1FF
        if lvl == level:
            idx = (vaddr >> shift) & ((1 << (bits - shift)) - 1)
        pa = (table & ~0xFFF) + 8 * idx
        if not mem.contains(pa):
            return None
        desc = struct.unpack("<Q", mem.read(pa, 8))[0]
        if not desc & 1:
            return None
        out = desc & 0x0000_FFFF_FFFF_F000
        if lvl == 3:
            return out | (vaddr & 0xFFF) if desc & 2 else None
        if not desc & 2:  # block
            if lvl == 0:
                return None
            return (out & ~((1 << shift) - 1)) | (vaddr & ((1 << shift) - 1))
        table = out
    return None

