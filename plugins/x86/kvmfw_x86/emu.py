"""x86 glue for the core's emulated CPU (:mod:`kvmfw.emu`): the thread context to and from
Unicorn's x86 registers, ``in``/``out`` to the machine's port bus, the modes it takes.

Taken: real mode (segment bases ``selector << 4``, 64 KiB limits), 16/32-bit protected mode
(paging on or off, PAE), long mode with paging (64-bit and compatibility code). Refused with
:class:`~kvmfw.emu.HandoverError` (the vCPU stays on KVM): VMX operation (CR4.VMXE), SMM,
virtual-8086 mode, "big"/unreal mode and any protected-mode segment whose cached base or
limit differs from its descriptor (Unicorn reloads segments from the GDT, so it could not
keep them), an event KVM still has to inject. Unicorn does not model the x87 stack, AVX or
MSRs beyond EFER/FS/GS base: general, segment, control registers, RFLAGS and XMM0-15 move
(not MXCSR: Unicorn 2.1 does not expose it); the rest stays in the context untouched (a
guest using x87/AVX under emulation sees Unicorn's reset values; documented, not checked).
"""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from kvmfw.emu import HandoverError, require_capstone, require_unicorn

from kvmfw_x86.context import GPRS, Segment

if TYPE_CHECKING:
    from kvmfw.cpu import KvmCPU
    from kvmfw.emu import EmulatedCPU

MSR_EFER = 0xC0000080
CR4_VMXE = 1 << 13
EFL_VM = 1 << 17
EFER_LMA = 1 << 10
DATA_SEGS = ("ds", "es", "fs", "gs", "ss")


def _descriptor(mem: Any, gdt: tuple[int, int], sel: int) -> Segment | None:
    """The segment a GDT selector describes (None: null, LDT or outside the GDT/RAM)."""
    base, limit = gdt
    idx = sel & ~7
    if sel & 4 or idx == 0 or idx + 7 > limit or not mem.contains(base + idx, 8):
        return None
    lo, hi = struct.unpack("<II", mem.read(base + idx, 8))
    seg_base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF000000)
    seg_limit = (lo & 0xFFFF) | (hi & 0xF0000)
    g = (hi >> 23) & 1
    if g:
        seg_limit = (seg_limit << 12) | 0xFFF
    return Segment(base=seg_base, limit=seg_limit, selector=sel, type=(hi >> 8) & 0xF,
                   present=(hi >> 15) & 1, dpl=(hi >> 13) & 3, db=(hi >> 22) & 1,
                   s=(hi >> 12) & 1, l=(hi >> 21) & 1, g=g, avl=(hi >> 20) & 1, unusable=0)


def _real_segment(sel: int, old: Segment) -> Segment:
    return Segment(base=sel << 4, limit=0xFFFF, selector=sel, type=old.type, present=1,
                   dpl=0, db=0, s=old.s, l=0, g=0, avl=0, unusable=0)


class X86EmuGlue:
    """:class:`kvmfw.emu.EmuGlue` for x86.

    Unicorn names registers by its mode: ``RAX``..``R15``/``RIP``/``RFLAGS`` in 64-bit
    mode, ``EAX``..``EDI``/``EIP``/``EFLAGS`` in 16/32-bit mode (a 64-bit name there is a
    silent no-op, so :meth:`load` reads the PC back and refuses a mismatch). R8-R15 and the
    upper halves are not touched outside long mode: code there cannot change them.
    """

    arch = "x86"

    def __init__(self) -> None:
        self.uc_mod = require_unicorn()
        from unicorn import x86_const
        self.X = x86_const
        self._mode = "long64"
        self._machine: Any = None
        self._cs_base = 0

    # --- checks --------------------------------------------------------------------------

    def verify(self, cpu: KvmCPU) -> None:
        ctx = cpu.get_context()
        mode = ctx.mode
        where = f"vcpu {cpu.id} ({mode} mode)"
        if ctx.cr4 & CR4_VMXE:
            raise HandoverError(f"{where}: VMX operation (CR4.VMXE) cannot be emulated; it "
                                "stays on KVM")
        ev = getattr(ctx, "_events", None)
        smi = getattr(ev, "smi", None) if ev is not None else None
        if smi is not None and int(smi.smm):
            raise HandoverError(f"{where}: the CPU is in SMM, which the emulator does not "
                                "model; switch after it leaves SMM")
        if mode == "vm86":
            raise HandoverError(f"{where}: virtual-8086 mode cannot be emulated")
        e = ctx.events
        if e["exception"]["injected"] or e["exception"]["pending"] or \
                e["interrupt"]["injected"] or e["nmi"]["injected"]:
            raise HandoverError(f"{where}: KVM still has an event to inject; run on until it "
                                "is delivered")
        mem = cpu.machine.memory
        for name in ("cs", *DATA_SEGS):
            seg = getattr(ctx, name)
            if mode == "real":
                if seg.base != seg.selector << 4 or seg.limit > 0xFFFF:
                    raise HandoverError(
                        f"{where}: {name} base {seg.base:#x} limit {seg.limit:#x} is not "
                        f"selector {seg.selector:#x} << 4 (big real mode): not emulated")
                continue
            if seg.unusable or (seg.selector & ~3) == 0:
                if name == "cs":
                    raise HandoverError(f"{where}: null code segment")
                continue
            d = _descriptor(mem, ctx.gdt, seg.selector)
            if d is None or d.base != seg.base or d.limit != seg.limit \
                    or (name == "cs" and (d.l != seg.l or d.db != seg.db)):
                if mode == "long64" and name != "cs":
                    continue  # 64-bit code ignores data segment bases (FS/GS move as MSRs)
                raise HandoverError(
                    f"{where}: {name} (selector {seg.selector:#x}) differs from its GDT "
                    "descriptor; the emulator reloads segments from the GDT and would "
                    "change it")

    # --- state ---------------------------------------------------------------------------

    def uc_key(self, cpu: KvmCPU) -> int:
        """Unicorn's x86 mode for the vCPU's mode (it fixes register names and how the
        start address is read): 16 (real, 16-bit protected), 32 or 64 (long mode)."""
        u = self.uc_mod
        mode = cpu.get_context().mode
        self._mode = mode
        self._machine = cpu.machine
        return int({"real": u.UC_MODE_16, "protected16": u.UC_MODE_16}.get(
            mode, u.UC_MODE_64 if mode in ("long64", "compat") else u.UC_MODE_32))

    def create(self, cpu: KvmCPU) -> Any:
        u = self.uc_mod
        return u.Uc(u.UC_ARCH_X86, self.uc_key(cpu))

    @property
    def _wide(self) -> bool:
        return self._mode in ("long64", "compat")

    def _gprs(self) -> list[tuple[str, int]]:
        X = self.X
        if self._wide:
            return [(r, getattr(X, f"UC_X86_REG_{r.upper()}")) for r in GPRS]
        return [(r, getattr(X, f"UC_X86_REG_E{r[1:].upper()}")) for r in GPRS[:8]]

    def _ip_flags(self) -> tuple[int, int]:
        X = self.X
        if self._wide:
            return X.UC_X86_REG_RIP, X.UC_X86_REG_RFLAGS
        return X.UC_X86_REG_EIP, X.UC_X86_REG_EFLAGS

    def load(self, uc: Any, cpu: KvmCPU) -> None:
        X = self.X
        ctx = cpu.get_context()
        uc.reg_write(X.UC_X86_REG_GDTR, (0, *ctx.gdt, 0))
        uc.reg_write(X.UC_X86_REG_IDTR, (0, *ctx.idt, 0))
        uc.msr_write(MSR_EFER, ctx.efer)
        uc.reg_write(X.UC_X86_REG_CR3, ctx.cr3)
        uc.reg_write(X.UC_X86_REG_CR4, ctx.cr4)
        uc.reg_write(X.UC_X86_REG_CR0, ctx.cr0)
        uc.reg_write(X.UC_X86_REG_CR2, ctx.cr2)
        for name in ("cs", *DATA_SEGS):
            seg = getattr(ctx, name)
            if self._mode != "real" and (seg.unusable or (seg.selector & ~3) == 0) \
                    and name != "cs":
                continue
            uc.reg_write(getattr(X, f"UC_X86_REG_{name.upper()}"), seg.selector)
        if self._wide:
            uc.reg_write(X.UC_X86_REG_FS_BASE, ctx.fs.base)
            uc.reg_write(X.UC_X86_REG_GS_BASE, ctx.gs.base)
        mask = (1 << 64) - 1 if self._wide else 0xFFFFFFFF
        for r, reg in self._gprs():
            uc.reg_write(reg, getattr(ctx, r) & mask)
        ip, flags = self._ip_flags()
        self._cs_base = 0 if self._mode == "long64" else ctx.cs.base
        uc.reg_write(flags, ctx.rflags & mask)
        if ctx.cr4 & (1 << 9):  # OSFXSR: the guest uses SSE
            for i in range(16 if self._mode == "long64" else 8):
                uc.reg_write(getattr(X, f"UC_X86_REG_XMM{i}"), ctx.xmm(i))
        uc.reg_write(ip, ctx.rip & mask)
        if uc.reg_read(ip) != ctx.rip & mask:
            raise HandoverError(f"vcpu {cpu.id}: Unicorn did not take RIP {ctx.rip:#x} in "
                                f"{self._mode} mode")

    def store(self, uc: Any, cpu: KvmCPU) -> None:
        X = self.X
        ctx = cpu.get_context()
        old_mode = self._mode
        for r, reg in self._gprs():
            v = uc.reg_read(reg)
            if self._wide:
                if v != getattr(ctx, r):
                    setattr(ctx, r, v)
            elif v != getattr(ctx, r) & 0xFFFFFFFF:
                # 16/32-bit code writes the low half and zero-extends nothing: keep the
                # upper half KVM had (it is invisible here and unchanged by this code)
                setattr(ctx, r, (getattr(ctx, r) & ~0xFFFFFFFF) | v)
        ip, flags = self._ip_flags()
        ctx.rip = uc.reg_read(ip)
        ctx.rflags = uc.reg_read(flags)
        for cr in ("cr0", "cr2", "cr3", "cr4"):
            v = uc.reg_read(getattr(X, f"UC_X86_REG_{cr.upper()}"))
            if v != getattr(ctx, cr):
                setattr(ctx, cr, v)
        efer = uc.msr_read(MSR_EFER)
        if efer != ctx.efer:
            ctx.efer = efer
        _, gbase, glimit, _ = uc.reg_read(X.UC_X86_REG_GDTR)
        if (gbase, glimit) != ctx.gdt:
            ctx.gdt = (gbase, glimit)
        _, ibase, ilimit, _ = uc.reg_read(X.UC_X86_REG_IDTR)
        if (ibase, ilimit) != ctx.idt:
            ctx.idt = (ibase, ilimit)
        real = not ctx.cr0 & 1
        mem = cpu.machine.memory
        for name in ("cs", *DATA_SEGS):
            sel = uc.reg_read(getattr(X, f"UC_X86_REG_{name.upper()}"))
            old = getattr(ctx, name)
            if sel == old.selector and real == (old_mode == "real"):
                continue  # unchanged: the cached part is still right
            if real:
                new = _real_segment(sel, old)
            else:
                d = _descriptor(mem, ctx.gdt, sel)
                if d is None:
                    new = Segment(selector=sel, unusable=1, present=0)
                else:
                    new = d
            setattr(ctx, name, new)
        if ctx.efer & EFER_LMA:
            for name, reg in (("fs", X.UC_X86_REG_FS_BASE), ("gs", X.UC_X86_REG_GS_BASE)):
                base = uc.reg_read(reg)
                seg = getattr(ctx, name)
                if base != seg.base:
                    seg.base = base
                    setattr(ctx, name, seg)
        if ctx.cr4 & (1 << 9):
            for i in range(16 if ctx.efer & EFER_LMA else 8):
                v = uc.reg_read(getattr(X, f"UC_X86_REG_XMM{i}"))
                if v != ctx.xmm(i):
                    ctx.set_xmm(i, v)

    # --- running -------------------------------------------------------------------------

    def install_io(self, uc: Any, emu: EmulatedCPU) -> None:
        X = self.X

        def io_in(_uc: Any, port: int, size: int, _d: Any) -> int:
            return emu.pio_read(port, size)

        def io_out(_uc: Any, port: int, size: int, value: int, _d: Any) -> None:
            emu.pio_write(port, size, value)

        uc.hook_add(self.uc_mod.UC_HOOK_INSN, io_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(self.uc_mod.UC_HOOK_INSN, io_out, None, 1, 0, X.UC_X86_INS_OUT)

    def pc(self, uc: Any) -> int:
        X = self.X
        rip = uc.reg_read(self._ip_flags()[0])
        if self._mode in ("real", "protected16"):
            # Unicorn's 16-bit start address is linear (CS * 16 + IP)
            return uc.reg_read(X.UC_X86_REG_CS) * 16 + (rip & 0xFFFF)
        return rip

    def translation_key(self, uc: Any) -> tuple[int, int, int]:
        """What a virtual-to-physical translation depends on (CR0.PG, CR3, CR4)."""
        X = self.X
        return (uc.reg_read(X.UC_X86_REG_CR0) >> 31, uc.reg_read(X.UC_X86_REG_CR3),
                uc.reg_read(X.UC_X86_REG_CR4))

    def code_address(self, uc: Any, vaddr: int) -> int | None:
        """The physical address of linear ``vaddr`` under Unicorn's current paging state
        (the plugin's page walk, on Unicorn's registers rather than the context's)."""
        from kvmfw_x86.gdb import translate

        X = self.X
        regs = SimpleNamespace(cr0=uc.reg_read(X.UC_X86_REG_CR0),
                               cr3=uc.reg_read(X.UC_X86_REG_CR3),
                               cr4=uc.reg_read(X.UC_X86_REG_CR4), efer=uc.msr_read(MSR_EFER))
        view = SimpleNamespace(machine=self._machine, get_context=lambda *_a: regs)
        return translate(view, vaddr)

    def set_pc(self, uc: Any, address: int) -> None:
        """``address`` is linear, as Unicorn's code hook gives it: IP/EIP is its offset in
        CS (CS * 16 in 16-bit modes, the base KVM had for CS otherwise)."""
        X = self.X
        if self._mode in ("real", "protected16"):
            uc.reg_write(X.UC_X86_REG_EIP, address - uc.reg_read(X.UC_X86_REG_CS) * 16)
        else:
            uc.reg_write(self._ip_flags()[0], address - self._cs_base)

    def is_wait(self, code: bytes) -> bool:
        return code[:1] == b"\xf4"  # hlt

    def mode(self, uc: Any) -> str:
        X = self.X
        if not uc.reg_read(X.UC_X86_REG_CR0) & 1:
            return "real"
        if uc.msr_read(MSR_EFER) & EFER_LMA and self._mode in ("long64", "compat"):
            return self._mode
        return "protected16" if self._mode == "protected16" else "protected32"

    def disassembler(self, uc: Any) -> Any:
        cs = require_capstone()
        mode = self.mode(uc)
        cm = {"real": cs.CS_MODE_16, "protected16": cs.CS_MODE_16,
              "long64": cs.CS_MODE_64}.get(mode, cs.CS_MODE_32)
        return cs.Cs(cs.CS_ARCH_X86, cm)

    def registers(self, uc: Any) -> dict[str, int]:
        out = {r: uc.reg_read(reg) for r, reg in self._gprs()}
        out["rflags"] = uc.reg_read(self._ip_flags()[1])
        return out
