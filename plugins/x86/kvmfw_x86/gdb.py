"""x86 for the GDB stub: target descriptions, registers, guest debug, page walks.

Target description by the boot CPU's mode when GDB attaches: ``i386:x86-64`` (GDB's
amd64 core, SSE, segment-base and AVX features, plus ``org.kvmfw.x86.sys`` with CR0-CR8
and EFER) in long mode, ``i386`` in protected mode, ``i8086`` in real mode (the i386
registers).

Breakpoints and watchpoints go through ``KVM_SET_GUEST_DEBUG``: hardware ones in DR0-DR3
and DR7 (as QEMU), software ones as INT3 written into guest memory with
``KVM_GUESTDBG_USE_SW_BP`` when this KVM reports INT3 as a debug exit. Whether it does is
probed once per ``/dev/kvm`` by running one INT3 in a scratch VM: ``kvm_pvm`` emulates
CPL0 code and fails on it (an emulation error), so there a software breakpoint takes a
free debug register instead, and the target's notes say so.
"""

from __future__ import annotations

import struct
import weakref
from dataclasses import dataclass
from typing import Any

from kvmfw.abi import IOCTLS, Cap, ExitReason
from kvmfw.abi import lib as core_lib
from kvmfw.debug import get_logger
from kvmfw.errors import GuestMemoryError, KvmfwError
from kvmfw.gdb import BreakKind, Breakpoint, Feature, GdbError, GdbTarget, GdbUnsupported, Reg, Stop
from kvmfw.hookspecs import SyncLevel
from kvmfw.vcpu import RUN_PAYLOAD

from kvmfw_x86.abi import X, addr, ffi
from kvmfw_x86.context import XS_FDP, XS_FIP, XS_FOP, XS_FTW, X86Context

log = get_logger("kvmfw.x86.gdb")

GUESTDBG_ENABLE = 0x1
GUESTDBG_SINGLESTEP = 0x2
GUESTDBG_BLOCKIRQ = 0x4
GUESTDBG_USE_SW_BP = 0x10000
GUESTDBG_USE_HW_BP = 0x20000
GUESTDBG_INJECT_BP = 0x80000
DR6_BS = 0x4000
NUM_DR = 4
_DEBUG_EXIT = struct.Struct("<IIQQQ")  # struct kvm_debug_exit_arch: exception, pad, pc, dr6, dr7
_GUEST_DEBUG = struct.Struct("<II8Q")  # struct kvm_guest_debug: control, pad, debugreg[8]
_LEN_CODE = {1: 0, 2: 1, 8: 2, 4: 3}
_MASK64 = (1 << 64) - 1


# --- what this KVM can do ------------------------------------------------------------------

@dataclass(frozen=True)
class Caps:
    sw_breakpoints: bool
    hw_breakpoints: bool
    watchpoints: bool
    block_irq: bool
    why: str


_caps: dict[str, Caps] = {}
_CODE, _LANDING = 0x500, 0x700
_INT3 = b"\xcc\xf4"  # int3; hlt
_NOPS = b"\x90\x90\xf4"  # nop; nop; hlt (an execution breakpoint on the second nop)
_WRITE = b"\xc6\x06\x00\x06\x01\xf4"  # movb $1, (0x600); hlt


def probe(machine: Any) -> Caps:
    """Probe once per KVM device, in a scratch VM (real mode, as a booting guest starts):
    does an INT3 under ``USE_SW_BP``, an execution breakpoint in DR0 and a write to a byte
    watched by DR0 each give a debug exit? (kvm_pvm's emulator of CPL0 code reports none
    but single steps; TCG's emulated SVM, one level down, neither.)"""
    key = machine.config.kvm_path
    if key not in _caps:
        whys = []
        try:
            sw, why = _probe(machine, _INT3, GUESTDBG_USE_SW_BP, [0] * 8, 3)
            whys.append(f"INT3: {why}")
            hw, why = _probe(machine, _NOPS, GUESTDBG_USE_HW_BP,
                             [_CODE + 1, 0, 0, 0, 0, 0, 0, 0x600 | 2], 1)
            whys.append(f"execution breakpoint: {why}")
            wp, why = _probe(machine, _WRITE, GUESTDBG_USE_HW_BP,
                             [0x600, 0, 0, 0, 0, 0, 0, 0x600 | 2 | (1 << 16)], 1)
            whys.append(f"watched write: {why}")
        except KvmfwError as exc:
            sw = hw = wp = False
            whys.append(f"the probe failed: {exc}")
        mask = machine.kvm.check_extension(Cap.SET_GUEST_DEBUG2) or 0
        _caps[key] = Caps(sw, hw, wp, bool(mask & GUESTDBG_BLOCKIRQ), "; ".join(whys))
    return _caps[key]


def _probe(machine: Any, code: bytes, control: int, dr: list[int],
           exception: int) -> tuple[bool, str]:
    vm = machine.kvm.create_vm()
    try:
        ram = vm.add_ram(0, 0x1000, "gdb-probe")
        ram.view[_LANDING] = 0xF4  # every vector of the real-mode IVT lands on this HLT
        ram.view[0:0x400] = (_LANDING).to_bytes(4, "little") * 0x100
        ram.view[_CODE:_CODE + len(code)] = code
        vm.set_tss_addr(0xFFFBD000)
        vcpu = vm.create_vcpu()
        sregs = ffi.new("struct kvm_sregs *")
        vcpu.ioctl(X.KVM_GET_SREGS, addr(sregs))
        for seg in (sregs.cs, sregs.ds, sregs.ss):
            seg.base, seg.selector = 0, 0
        vcpu.ioctl(X.KVM_SET_SREGS, addr(sregs))
        regs = ffi.new("struct kvm_regs *")
        regs.rip, regs.rflags, regs.rsp = _CODE, 2, 0xF00
        vcpu.ioctl(X.KVM_SET_REGS, addr(regs))
        _set_debug(vcpu, GUESTDBG_ENABLE | control, dr)
        r = core_lib.kvmfw_run(vcpu.fd)
        reason = vcpu.exit_reason
        if r < 0:
            return False, f"KVM_RUN failed ({-r})"
        if reason == ExitReason.DEBUG and \
                _DEBUG_EXIT.unpack_from(vcpu.run_map, RUN_PAYLOAD)[0] == exception:
            return True, "reported"
        vcpu.ioctl(X.KVM_GET_REGS, addr(regs))
        return False, f"not reported (got {_exit_name(reason)} at {int(regs.rip):#x})"
    finally:
        vm.close()


def _exit_name(reason: int) -> str:
    try:
        return f"KVM_EXIT_{ExitReason(reason).name}"
    except ValueError:
        return str(reason)


def _set_debug(vcpu: Any, control: int, dr: list[int]) -> None:
    buf = ffi.new("uint8_t[]", _GUEST_DEBUG.pack(control, 0, *dr))
    vcpu.ioctl(IOCTLS.KVM_SET_GUEST_DEBUG, addr(buf), "KVM_SET_GUEST_DEBUG")


# --- target descriptions -------------------------------------------------------------------

_EFLAGS = """<flags id="i386_eflags" size="4">
<field name="CF" start="0" end="0"/><field name="" start="1" end="1"/>
<field name="PF" start="2" end="2"/><field name="AF" start="4" end="4"/>
<field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/>
<field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/>
<field name="DF" start="10" end="10"/><field name="OF" start="11" end="11"/>
<field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/>
<field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/>
<field name="VIF" start="19" end="19"/><field name="VIP" start="20" end="20"/>
<field name="ID" start="21" end="21"/></flags>"""
_SSE_TYPES = """<vector id="v4f" type="ieee_single" count="4"/>
<vector id="v2d" type="ieee_double" count="2"/>
<vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" count="8"/>
<vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" count="2"/>
<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>
<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>
<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>
<field name="uint128" type="uint128"/></union>
<flags id="i386_mxcsr" size="4">
<field name="IE" start="0" end="0"/><field name="DE" start="1" end="1"/>
<field name="ZE" start="2" end="2"/><field name="OE" start="3" end="3"/>
<field name="UE" start="4" end="4"/><field name="PE" start="5" end="5"/>
<field name="DAZ" start="6" end="6"/><field name="IM" start="7" end="7"/>
<field name="DM" start="8" end="8"/><field name="ZM" start="9" end="9"/>
<field name="OM" start="10" end="10"/><field name="UM" start="11" end="11"/>
<field name="PM" start="12" end="12"/><field name="FZ" start="15" end="15"/></flags>"""
_X87 = tuple(Reg(f"st{i}", 80, "i387_ext") for i in range(8)) + tuple(
    Reg(n, 32, "int", "float") for n in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg",
                                         "fooff", "fop"))
_SEGS = tuple(Reg(s, 32, "int32") for s in ("cs", "ss", "ds", "es", "fs", "gs"))
AMD64_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
I386_GPRS = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
_CTX_OF_I386 = dict(zip(I386_GPRS, ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"),
                        strict=True))


def _amd64(avx: bool) -> tuple[Feature, ...]:
    ptr = {"rbp": "data_ptr", "rsp": "data_ptr"}
    core = Feature("org.gnu.gdb.i386.core",
                   tuple(Reg(g, 64, ptr.get(g, "int64")) for g in AMD64_GPRS)
                   + (Reg("rip", 64, "code_ptr"), Reg("eflags", 32, "i386_eflags"))
                   + _SEGS + _X87, _EFLAGS)
    sse = Feature("org.gnu.gdb.i386.sse",
                  tuple(Reg(f"xmm{i}", 128, "vec128") for i in range(16))
                  + (Reg("mxcsr", 32, "i386_mxcsr", "vector"),), _SSE_TYPES)
    segs = Feature("org.gnu.gdb.i386.segments", (Reg("fs_base", 64), Reg("gs_base", 64)))
    sys_ = Feature("org.kvmfw.x86.sys", tuple(Reg(c, 64, "int64", "general") for c in
                                              ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")))
    out: tuple[Feature, ...] = (core, sse, segs, sys_)
    if avx:
        out += (Feature("org.gnu.gdb.i386.avx",
                        tuple(Reg(f"ymm{i}h", 128, "uint128") for i in range(16))),)
    return out


def _i386() -> tuple[Feature, ...]:
    ptr = {"esp": "data_ptr", "ebp": "data_ptr"}
    core = Feature("org.gnu.gdb.i386.core",
                   tuple(Reg(g, 32, ptr.get(g, "int32")) for g in I386_GPRS)
                   + (Reg("eip", 32, "code_ptr"), Reg("eflags", 32, "i386_eflags"))
                   + _SEGS + _X87, _EFLAGS)
    sse = Feature("org.gnu.gdb.i386.sse",
                  tuple(Reg(f"xmm{i}", 128, "vec128") for i in range(8))
                  + (Reg("mxcsr", 32, "i386_mxcsr", "vector"),), _SSE_TYPES)
    sys_ = Feature("org.kvmfw.x86.sys", tuple(Reg(c, 32, "int32", "general") for c in
                                              ("cr0", "cr2", "cr3", "cr4")))
    return core, sse, sys_


def target(cpu: Any) -> GdbTarget:
    ctx: X86Context = cpu.get_context(SyncLevel.RUNTIME)
    caps = probe(cpu.machine)
    notes: tuple[str, ...] = ()
    if not caps.sw_breakpoints and caps.hw_breakpoints:
        notes += (f"software breakpoints are served by the {NUM_DR} debug registers (this "
                  f"KVM does not report INT3): at most {NUM_DR} breakpoints and watchpoints "
                  "together",)
    elif not caps.sw_breakpoints:
        notes += ("this KVM reports neither INT3 nor execution breakpoints: while a "
                  "breakpoint is set the guest is single-stepped and its PC compared (slow)",)
    if not caps.watchpoints:
        notes += ("this KVM does not report watched writes (kvm_pvm: not in the CPL0 code "
                  "it emulates): while a write watchpoint is set the guest is single-stepped "
                  "and the value compared (slow)",)
    if notes:
        notes += (f"probe: {caps.why}",)
    mode = ctx.mode
    if mode in ("long64", "compat"):
        feats = _amd64(2 in ctx.info.xsave_offsets)
        arch = "i386:x86-64"
    else:
        feats = _i386()
        arch = "i8086" if mode == "real" else "i386"
    stepped_breaks = not caps.sw_breakpoints and not caps.hw_breakpoints
    t = GdbTarget(arch, feats, notes, stepped_watchpoints=not caps.watchpoints,
                  stepped_breakpoints=stepped_breaks)
    _targets.setdefault(cpu.machine, t)
    return _targets[cpu.machine]


_targets: weakref.WeakKeyDictionary[Any, GdbTarget] = weakref.WeakKeyDictionary()


# --- registers -------------------------------------------------------------------------------

def _names(cpu: Any) -> list[Reg]:
    """The registers of the description GDB was given (the first one made for the
    machine: GDB reads it once, at attach)."""
    t = _targets.get(cpu.machine)
    if t is None:
        t = target(cpu)
    return t.registers


def _ftag_full(abridged: int) -> int:
    """FXSAVE's abridged tag byte -> the x87 tag word GDB shows (valid 0, empty 3)."""
    out = 0
    for i in range(8):
        out |= (0 if abridged >> i & 1 else 3) << (2 * i)
    return out


def read_registers(cpu: Any) -> list[bytes]:
    ctx: X86Context = cpu.get_context(SyncLevel.FULL)
    out = []
    for r in _names(cpu):
        if r.name[:2] == "st" and r.name[2:].isdigit():
            out.append(ctx.st(int(r.name[2:])))
        else:
            out.append(_read(ctx, r.name).to_bytes((r.bits + 7) // 8, "little"))
    return out


def _read(ctx: X86Context, name: str) -> int:
    if name in AMD64_GPRS or name in ("rip", "cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
        return int(getattr(ctx, name))
    if name in _CTX_OF_I386:
        return int(getattr(ctx, _CTX_OF_I386[name])) & 0xFFFFFFFF
    if name == "eip":
        return ctx.rip & 0xFFFFFFFF
    if name == "eflags":
        return ctx.rflags & 0xFFFFFFFF
    if name in ("cs", "ss", "ds", "es", "fs", "gs"):
        return int(getattr(ctx, name).selector)
    if name in ("fs_base", "gs_base"):
        return int(getattr(ctx, name[:2]).base)
    if name.startswith("xmm"):
        return ctx.xmm(int(name[3:]))
    if name.startswith("ymm"):
        return ctx.ymm(int(name[3:-1])) >> 128
    xs = ctx._xs_get
    if name == "fctrl":
        return ctx.fcw
    if name == "fstat":
        return ctx.fsw
    if name == "ftag":
        return _ftag_full(xs(XS_FTW, 1)[0])
    if name == "fop":
        return int.from_bytes(xs(XS_FOP, 2), "little") & 0x7FF
    if name == "fioff":
        return int.from_bytes(xs(XS_FIP, 4), "little")
    if name == "fooff":
        return int.from_bytes(xs(XS_FDP, 4), "little")
    if name == "mxcsr":
        return ctx.mxcsr
    return 0  # fiseg, foseg: 0 in the 64-bit FXSAVE format


def write_register(cpu: Any, regnum: int, value: bytes) -> bool:
    regs = _names(cpu)
    if not 0 <= regnum < len(regs):
        return False
    name = regs[regnum].name
    ctx: X86Context = cpu.get_context(SyncLevel.FULL)
    v = int.from_bytes(value, "little")
    if name in AMD64_GPRS or name in ("rip", "cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
        setattr(ctx, name, v)
    elif name in _CTX_OF_I386 or name == "eip":
        full = _CTX_OF_I386.get(name, "rip")
        setattr(ctx, full, (int(getattr(ctx, full)) & ~0xFFFFFFFF) | v)
    elif name == "eflags":
        ctx.rflags = (ctx.rflags & ~0xFFFFFFFF) | v | 2
    elif name in ("fs_base", "gs_base"):
        seg = getattr(ctx, name[:2])
        seg.base = v
        setattr(ctx, name[:2], seg)
    elif name.startswith("xmm"):
        ctx.set_xmm(int(name[3:]), v)
    elif name.startswith("ymm"):
        i = int(name[3:-1])
        ctx.set_ymm(i, ctx.xmm(i) | v << 128)
    elif name[:2] == "st" and name[2:].isdigit():
        ctx.set_st(int(name[2:]), value)
    elif name == "fctrl":
        ctx.fcw = v & 0xFFFF
    elif name == "mxcsr":
        ctx.mxcsr = v
    else:
        return _read(ctx, name) == v  # segments and x87 pointers: only "no change" works
    return True


# --- guest debug ----------------------------------------------------------------------------

_slots: weakref.WeakKeyDictionary[Any, list[Breakpoint]] = weakref.WeakKeyDictionary()
_programmed: weakref.WeakKeyDictionary[Any, tuple[int, list[int]]] = \
    weakref.WeakKeyDictionary()
_int3: weakref.WeakKeyDictionary[Any, dict[int, tuple[int, int]]] = \
    weakref.WeakKeyDictionary()


def set_guest_debug(cpu: Any, step: bool, breakpoints: list[Breakpoint]) -> bool:
    caps = probe(cpu.machine)
    hw: list[Breakpoint] = []
    sw: list[Breakpoint] = []
    for bp in breakpoints:
        if bp.kind == BreakKind.SOFTWARE and caps.sw_breakpoints:
            sw.append(bp)
            continue
        if bp.kind in (BreakKind.SOFTWARE, BreakKind.HARDWARE) and not caps.hw_breakpoints:
            continue  # the stub single-steps and compares the PC (stepped_breakpoints)
        if bp.kind == BreakKind.READ:
            raise GdbUnsupported("x86 debug registers cannot watch reads only (use awatch)")
        if bp.kind in (BreakKind.WRITE, BreakKind.ACCESS):
            if bp.length not in _LEN_CODE or bp.address % bp.length:
                raise GdbError(f"a watchpoint must be 1, 2, 4 or 8 aligned bytes, not "
                               f"{bp.length} at {bp.address:#x}")
        hw.append(bp)
    if len(hw) > NUM_DR:
        raise GdbError(f"no free debug register: x86 has {NUM_DR} for hardware breakpoints, "
                       "watchpoints" + ("" if caps.sw_breakpoints else
                                        " and (on this KVM) software breakpoints"))
    _sync_int3(cpu, sw)
    dr = [0] * 8
    dr7 = 0x600 if hw else 0
    for i, bp in enumerate(hw):
        dr[i] = bp.address & _MASK64
        rw = {BreakKind.WRITE: 1, BreakKind.ACCESS: 3}.get(bp.kind, 0)
        ln = _LEN_CODE[bp.length] if rw else 0
        dr7 |= (2 << (2 * i)) | (rw << (16 + 4 * i)) | (ln << (18 + 4 * i))
    dr[7] = dr7
    control = 0
    if hw or sw or step:
        control = GUESTDBG_ENABLE
        if step:
            control |= GUESTDBG_SINGLESTEP | (GUESTDBG_BLOCKIRQ if caps.block_irq else 0)
        if hw:
            control |= GUESTDBG_USE_HW_BP
        if sw:
            control |= GUESTDBG_USE_SW_BP
    cpu.sync_kvm_state()  # the ioctl must not race unpushed register writes (e.g. RFLAGS)
    _set_debug(cpu.vcpu, control, dr)
    _slots[cpu] = hw
    _programmed[cpu] = (control, dr)
    return True


def _sync_int3(cpu: Any, sw: list[Breakpoint]) -> None:
    """Make guest memory hold INT3 exactly at ``sw``'s addresses (VM-wide, idempotent)."""
    machine = cpu.machine
    inserted = _int3.setdefault(machine, {})
    want = {bp.address for bp in sw}
    mem = machine.memory
    for va in list(inserted):
        if va not in want:
            gpa, orig = inserted.pop(va)
            if mem.contains(gpa):
                mem.write(gpa, bytes((orig,)))
    for va in want - set(inserted):
        pa = translate(cpu, va)
        if pa is None or not mem.contains(pa):
            raise GdbError(f"cannot insert a breakpoint at {va:#x}: not mapped to RAM")
        inserted[va] = (pa, mem.read(pa, 1)[0])
        mem.write(pa, b"\xcc")


def debug_exit(cpu: Any) -> Stop:
    exc, _, pc, dr6, _ = _DEBUG_EXIT.unpack_from(cpu.vcpu.run_map, RUN_PAYLOAD)
    if exc == 3:
        if pc in _int3.get(cpu.machine, {}):
            return Stop("swbreak")
        # the guest's own INT3 (Linux patches text with them): give it back, as QEMU does
        control, dr = _programmed.get(cpu, (GUESTDBG_ENABLE | GUESTDBG_USE_SW_BP, [0] * 8))
        _set_debug(cpu.vcpu, control | GUESTDBG_INJECT_BP, dr)
        return Stop("guest")
    if exc != 1:
        return Stop("trap")
    slots = _slots.get(cpu, [])
    for i, bp in enumerate(slots):
        if dr6 >> i & 1:
            if bp.kind == BreakKind.WRITE:
                return Stop("watch", bp.address)
            if bp.kind == BreakKind.ACCESS:
                return Stop("awatch", bp.address)
            return Stop("swbreak" if bp.kind == BreakKind.SOFTWARE else "hwbreak")
    if dr6 & DR6_BS:
        return Stop("step")
    return Stop("trap")


# --- virtual -> physical ------------------------------------------------------------------

def translate(cpu: Any, vaddr: int) -> int | None:
    """Walk ``cpu``'s page tables (none, 32-bit, PAE, 4- or 5-level) for ``vaddr``."""
    ctx: X86Context = cpu.get_context(SyncLevel.RUNTIME)
    cr0, cr4, efer = ctx.cr0, ctx.cr4, ctx.efer
    vaddr &= _MASK64
    if not cr0 & (1 << 31):  # no paging: linear is physical (GDB gives linear addresses)
        return vaddr & 0xFFFFFFFF
    mem = cpu.machine.memory
    cr3 = ctx.cr3

    def entry(table: int, index: int, size: int) -> int | None:
        try:
            return mem.read_u(table + index * size, size)
        except GuestMemoryError:
            return None

    if efer & (1 << 10):  # long mode: 4 or 5 levels of 512 entries
        levels = 5 if cr4 & (1 << 12) else 4
        table = cr3 & 0x000FFFFFFFFFF000
        for level in range(levels, 0, -1):
            shift = 12 + 9 * (level - 1)
            e = entry(table, (vaddr >> shift) & 0x1FF, 8)
            if e is None or not e & 1:
                return None
            if level in (2, 3) and e & 0x80:  # 2 MiB or 1 GiB page
                base = e & 0x000FFFFFFFFFF000 & ~((1 << shift) - 1)
                return base | (vaddr & ((1 << shift) - 1))
            table = e & 0x000FFFFFFFFFF000
        return table | (vaddr & 0xFFF)
    vaddr &= 0xFFFFFFFF
    if cr4 & (1 << 5):  # PAE: 4 PDPTEs, then 512-entry tables
        e = entry(cr3 & 0xFFFFFFE0, vaddr >> 30, 8)
        if e is None or not e & 1:
            return None
        e = entry(e & 0x000FFFFFFFFFF000, (vaddr >> 21) & 0x1FF, 8)
        if e is None or not e & 1:
            return None
        if e & 0x80:
            return (e & 0x000FFFFFFFE00000) | (vaddr & 0x1FFFFF)
        e = entry(e & 0x000FFFFFFFFFF000, (vaddr >> 12) & 0x1FF, 8)
        if e is None or not e & 1:
            return None
        return (e & 0x000FFFFFFFFFF000) | (vaddr & 0xFFF)
    e = entry(cr3 & 0xFFFFF000, vaddr >> 22, 4)  # 32-bit paging
    if e is None or not e & 1:
        return None
    if e & 0x80 and cr4 & (1 << 4):  # 4 MiB page (PSE)
        return (e & 0xFFC00000) | ((e >> 13 & 0xFF) << 32) | (vaddr & 0x3FFFFF)
    e = entry(e & 0xFFFFF000, (vaddr >> 12) & 0x3FF, 4)
    if e is None or not e & 1:
        return None
    return (e & 0xFFFFF000) | (vaddr & 0xFFF)
