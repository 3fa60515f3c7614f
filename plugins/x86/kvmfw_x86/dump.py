"""The register dump for error reports: every group, readable, with the bytes at RIP."""

from __future__ import annotations

from typing import Any

from kvmfw.hookspecs import SyncLevel

from kvmfw_x86.abi import X, addr, ffi
from kvmfw_x86.context import GPRS, SEGMENTS, X86Context

KVM_EXIT_SHUTDOWN = 8


def translate(cpu: Any, linear: int) -> int | None:
    """Linear -> guest-physical with ``KVM_TRANSLATE`` (None if unmapped)."""
    tr = ffi.new("struct kvm_translation *")
    tr.linear_address = linear
    try:
        cpu.vcpu.ioctl(X.KVM_TRANSLATE, addr(tr))
    except Exception:
        return None
    return int(tr.physical_address) if tr.valid else None


def walk(cpu: Any, cr3: int, linear: int) -> int | None:
    """Linear -> guest-physical through 4-level long-mode page tables at ``cr3`` read from
    guest RAM (for a state KVM no longer holds; None if unmapped or not in RAM)."""
    mem = cpu.machine.memory
    table = cr3 & 0x000FFFFFFFFFF000
    for level, shift in enumerate((39, 30, 21, 12)):
        at = table + ((linear >> shift) & 0x1FF) * 8
        if not mem.contains(at, 8):
            return None
        pte = int.from_bytes(mem.read(at, 8), "little")
        if not pte & 1:
            return None
        base = pte & 0x000FFFFFFFFFF000
        if level == 3 or (level in (1, 2) and pte & 0x80):  # 4K page, or 1G/2M page
            return (base & ~((1 << shift) - 1)) | (linear & ((1 << shift) - 1))
        table = base
    return None


def read_code(cpu: Any, gpa: int | None, n: int = 16) -> bytes | None:
    """Up to ``n`` bytes of guest RAM at ``gpa``."""
    if gpa is None:
        return None
    mem = cpu.machine.memory
    for k in range(n, 0, -1):
        if mem.contains(gpa, k):
            return mem.read(gpa, k)
    return None


def code_bytes(cpu: Any, ctx: X86Context, n: int = 16) -> bytes | None:
    pc = ctx.pc
    gpa = translate(cpu, pc)
    if gpa is None and not ctx.cr0 & 0x80000000:
        gpa = pc
    return read_code(cpu, gpa, n)


def reset_at_shutdown(cpu: Any, ctx: X86Context) -> bool:
    """True after ``KVM_EXIT_SHUTDOWN`` when KVM has re-initialised the vCPU (AMD SVM does:
    the VMCB is undefined after a shutdown), so its registers are the INIT state's."""
    return cpu.last_exit == KVM_EXIT_SHUTDOWN and not ctx.cr0 & 1 \
        and ctx.cs.selector == 0xF000 and ctx.rip == 0xFFF0


def shutdown_note(cpu: Any, ctx: X86Context) -> list[str]:
    """What the host last saw of a guest that KVM reset at its shutdown."""
    prev = ctx.previous_state()
    out = ["  KVM re-initialised this vCPU at the shutdown (as it does on AMD SVM): the "
           "registers below are the INIT state, not the faulting state."]
    if prev is None or (prev["cr0"] & 1 == 0 and prev["rip"] == 0xFFF0):
        out.append("  (kvmfw holds no earlier state of this vCPU)")
        return out
    pc = prev["pc"]
    if not prev["cr0"] & 0x80000000:
        gpa: int | None = pc
    elif prev["mode"] in ("long64", "compat"):
        gpa = walk(cpu, prev["cr3"], pc)
    else:
        gpa = None  # 32-bit paging: not walked here
    code = read_code(cpu, gpa)
    out.append(f"  last state kvmfw saw before the final entry: {prev['mode']} mode "
               f"rip={prev['rip']:#x} pc(linear)={pc:#x} cr3={prev['cr3']:#x}")
    why = "(not in guest RAM)" if gpa is not None else "(not mapped, or 32-bit paging)"
    out.append("    code there: " + (code.hex(" ") if code else why))
    return out


def dump(cpu: Any) -> str:
    ctx: X86Context = cpu.get_context(SyncLevel.FULL)
    out = [f"vcpu {cpu.id} ({ctx.mode} mode)"]
    if reset_at_shutdown(cpu, ctx):
        out += shutdown_note(cpu, ctx)
    r = [f"{n:>3}={getattr(ctx, n):016x}" for n in GPRS]
    out += ["  " + "  ".join(r[i:i + 4]) for i in range(0, 16, 4)]
    out.append(f"  rip={ctx.rip:016x}  rflags={ctx.rflags:08x}  pc(linear)={ctx.pc:#x}")
    try:
        code = code_bytes(cpu, ctx)
        out.append("  code at rip: " + (code.hex(" ") if code else "(not in guest RAM)"))
    except Exception as exc:  # pragma: no cover - best effort
        out.append(f"  code at rip: (unreadable: {exc})")
    out.append(f"  cr0={ctx.cr0:#x} cr2={ctx.cr2:#x} cr3={ctx.cr3:#x} cr4={ctx.cr4:#x} "
               f"cr8={ctx.cr8:#x} efer={ctx.efer:#x} apic_base={ctx.apic_base:#x}")
    for s in SEGMENTS:
        out.append(f"  {s:>3}: {getattr(ctx, s)}")
    out.append(f"  gdt: base={ctx.gdt[0]:#x} limit={ctx.gdt[1]:#x}   "
               f"idt: base={ctx.idt[0]:#x} limit={ctx.idt[1]:#x}")
    try:
        dr = ctx.dr
        out.append("  dr0-3=" + " ".join(f"{v:#x}" for v in dr[:4]) +
                   f" dr6={dr[4]:#x} dr7={dr[5]:#x}")
        out.append(f"  events: {ctx.events}")
        out.append(f"  xcrs: {' '.join(f'xcr{k}={v:#x}' for k, v in ctx.xcrs.items())}"
                   f"  xstate_bv={ctx.xstate_bv:#x} fcw={ctx.fcw:#x} fsw={ctx.fsw:#x} "
                   f"mxcsr={ctx.mxcsr:#x}")
        out.append("  " + " ".join(f"xmm{i}={ctx.xmm(i):032x}" for i in range(2)) + " ...")
        ms = ctx.msrs
        items = [f"{k:#x}={v:#x}" for k, v in sorted(ms.items())]
        out += ["  msrs: " + " ".join(items[i:i + 6]) for i in range(0, len(items), 6)]
    except Exception as exc:
        out.append(f"  (some groups unreadable: {type(exc).__name__}: {exc})")
    return "\n".join(out)
