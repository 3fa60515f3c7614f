"""Every register group round-trips: the host writes, the guest reads and changes, the host
reads back. Plus lazy per-group sync, gem5's eager mode, save/restore and the dump."""

from __future__ import annotations

import struct

import pytest
from conftest import GUESTS, requires_kvm
from elftools.elf.elffile import ELFFile
from kvmfw.hookspecs import SyncLevel

from kvmfw_x86 import loaders
from kvmfw_x86.context import XC_HI16_ZMM, XC_OPMASK, XC_YMM, XC_ZMM_HI256, Segment
from kvmfw_x86.cpuid import has_feature
from kvmfw_x86.plugin import X86Plugin

pytestmark = [requires_kvm, pytest.mark.kvm]
CR4_OSXSAVE = 1 << 18


def sym(name: str) -> int:
    with open(GUESTS / "user64.elf", "rb") as f:
        return ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)[0]["st_value"]


def user_machine(machine_factory, entry: str):  # type: ignore[no-untyped-def]
    """Long mode at CPL3: runs natively on kvm_pvm (vector instructions included)."""
    m, rep = machine_factory()
    loaders.load(m, str(GUESTS / "user64.elf"), {})
    ctx = m.cpus[0].get_context()
    ctx.cs = Segment(limit=0xFFFFFFFF, selector=0x2B, type=11, dpl=3, l=1, g=1)
    for s in ("ds", "es", "ss"):
        setattr(ctx, s, Segment(limit=0xFFFFFFFF, selector=0x33, type=3, dpl=3, db=1, g=1))
    ctx.rip = sym(entry)
    st = X86Plugin.state(m.hooks.pm.get_plugin("arch:x86"), m)  # type: ignore[arg-type]
    if has_feature(st.cpuid, "xsave"):
        # as an OS does: AVX and AVX-512 raise #UD unless CR4.OSXSAVE is set. kvm_pvm offers
        # no XSAVE in CPUID (so refuses the bit) yet runs CPL3 code with the XCR0 set here
        ctx.cr4 = ctx.cr4 | CR4_OSXSAVE
    return m, rep, ctx


def test_gprs_round_trip(machine_factory) -> None:
    m, _, ctx = user_machine(machine_factory, "gpr_test")
    regs = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r15")
    for i, r in enumerate(regs):
        setattr(ctx, r, 0x1000_0000_0000 * (i + 1))
    m.run(timeout=10)
    ctx = m.cpus[0].get_context(SyncLevel.RUNTIME)
    for i, r in enumerate(regs):
        assert getattr(ctx, r) == 0x1000_0000_0000 * (i + 1) + 0x2222, r
    assert ctx.cs.dpl == 3


def test_crs_msrs_segments_round_trip(machine_factory) -> None:
    m, rep = machine_factory()
    loaders.load(m, str(GUESTS / "sys64.elf"), {})
    ctx = m.cpus[0].get_context()
    ctx.set_msr(0xC0000102, 0x0000334455667788)  # KERNEL_GS_BASE
    ctx.cr4 = ctx.cr4 | (1 << 3)  # DE: a CR bit the guest reads back
    for i, r in enumerate(("rbx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
                           "r14", "r15")):
        setattr(ctx, r, i << 40)
    m.run(timeout=10)
    cr0, cr3, cr4, gs_lo, gs_hi, ds = rep.values
    assert cr0 & 0x80000001 == 0x80000001 and cr3 == loaders.PML4_ADDR
    assert cr4 & (1 << 3) and cr4 & loaders.CR4_PAE
    assert (gs_lo, gs_hi) == (0x55667788, 0x3344)
    assert ds == loaders.SEL_DATA
    ctx = m.cpus[0].get_context()
    assert ctx.get_msr(0xC0000102) == 0x0000334455667789  # the guest's wrmsr
    assert ctx.fs.base == 0x12345000  # FS_BASE written by the guest lands in the segment
    for i, r in enumerate(("rbx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
                           "r14", "r15")):
        assert getattr(ctx, r) == (i << 40) + 0x1111, r


def test_sse_round_trip(machine_factory) -> None:
    m, _, ctx = user_machine(machine_factory, "sse_test")
    ctx.set_xmm(0, 5 | 7 << 64)
    ctx.set_xmm(1, 10 | 20 << 64)
    ctx.set_xmm(14, (1 << 127) | 1)
    ctx.set_xmm(15, (1 << 127) | 3)
    m.run(timeout=10)
    ctx = m.cpus[0].get_context()
    assert ctx.xmm(0) == 15 | 27 << 64 and ctx.xmm(2) == ctx.xmm(0)
    assert ctx.xmm(14) == 2


def test_x87_round_trip(machine_factory) -> None:
    m, _, ctx = user_machine(machine_factory, "x87_test")
    ctx.fcw = 0x37F
    m.run(timeout=10)
    ctx = m.cpus[0].get_context()
    pi80 = struct.pack("<QH", 0xC90FDAA22168C235, 0x4000)
    assert ctx.st(0) == pi80 and ctx.st(1) == struct.pack("<QH", 1 << 63, 0x3FFF)
    assert (ctx.fsw >> 11) & 7 == 6  # TOP after two pushes


def _need_components(ctx, *comps: int) -> None:  # type: ignore[no-untyped-def]
    missing = [c for c in comps if c not in ctx.info.xsave_offsets]
    if missing:
        pytest.skip(f"this KVM enumerates no XSAVE component(s) {missing} (CPUID leaf 0xD)")


def test_avx_round_trip(machine_factory) -> None:
    m, _, ctx = user_machine(machine_factory, "avx_test")
    _need_components(ctx, XC_YMM)
    ctx.xcr0 = 0x7
    a, b = (3 << 200) | 1, (4 << 200) | 2
    ctx.set_ymm(0, a)
    ctx.set_ymm(1, b)
    m.run(timeout=10)
    assert m.cpus[0].get_context().ymm(3) == a + b


def test_avx512_round_trip(machine_factory) -> None:
    m, _, ctx = user_machine(machine_factory, "avx512_test")
    _need_components(ctx, XC_OPMASK, XC_ZMM_HI256, XC_HI16_ZMM)
    ctx.xcr0 = 0xE7
    z0, z1 = (1 << 511) | (5 << 300) | 3, (2 << 300) | 4
    ctx.set_zmm(0, z0)
    ctx.set_zmm(1, z1)
    ctx.set_zmm(16, 1 << 400)
    ctx.set_zmm(17, 1 << 400)
    ctx.set_opmask(1, 0xDEADBEEF_F0F0F0F0)
    ctx.set_opmask(3, 0x0F)
    m.run(timeout=10)
    ctx = m.cpus[0].get_context()
    assert ctx.zmm(4) == z0 + z1
    assert ctx.zmm(18) == 1 << 401
    assert ctx.opmask(2) == 0xDEADBEEF_F0F0F0F0
    assert ctx.opmask(4) == 0xDEADBEEF_F0F0F0FF
    assert ctx.xcr0 == 0xE7


def test_avx512_push_pull_bit_for_bit(machine_factory) -> None:
    m, _, ctx = user_machine(machine_factory, "gpr_test")
    _need_components(ctx, XC_OPMASK, XC_ZMM_HI256, XC_HI16_ZMM)
    ctx.xcr0 = 0xE7
    vals = {i: int.from_bytes(bytes((i * 7 + j) & 0xFF for j in range(64)), "little")
            for i in range(32)}
    for i, v in vals.items():
        ctx.set_zmm(i, v)
    for k in range(8):
        ctx.set_opmask(k, 0x0123456789ABCDEF ^ k)
    m.cpus[0].sync_kvm_state()
    for g in ("xsave", "xcrs"):
        ctx.fetch(g)
    assert all(ctx.zmm(i) == v for i, v in vals.items())
    assert all(ctx.opmask(k) == 0x0123456789ABCDEF ^ k for k in range(8))
    m.run(timeout=10)  # a run in between (the guest touches only GPRs) keeps it all
    ctx = m.cpus[0].get_context()
    assert all(ctx.zmm(i) == v for i, v in vals.items())


def test_debugregs_and_events_round_trip(machine_factory) -> None:
    m, _, ctx = user_machine(machine_factory, "gpr_test")
    ctx.set_dr(0, 0x1000)
    ctx.set_dr(7, 0x400)
    m.cpus[0].sync_kvm_state()
    ctx.fetch("debugregs")
    assert ctx.dr[0] == 0x1000 and ctx.dr[5] == 0x400
    ctx.set_event("nmi", masked=1)
    m.cpus[0].sync_kvm_state()
    ctx.fetch("events")
    assert ctx.events["nmi"]["masked"] == 1


def test_lazy_sync_pulls_only_what_is_read(machine_factory) -> None:
    m, rep = machine_factory()
    loaders.load(m, str(GUESTS / "long64.elf"), {})
    cpu = m.cpus[0]
    ctx = cpu.get_context()
    before = dict(ctx.fetches)
    m.run(timeout=10)
    ctx = cpu.get_context(SyncLevel.FULL)
    assert ctx.rip  # an exit handler that needs RIP
    after = {g: ctx.fetches[g] - before[g] for g in before}
    assert after["regs"] == 1
    assert after["xsave"] == after["msrs"] == after["xcrs"] == 0
    ctx.rax = 7  # writes mark only their group dirty
    assert ctx.dirty_groups() == ["regs"]


def test_eager_mode_pulls_everything(machine_factory) -> None:
    m, _ = machine_factory(x86_sync="eager")
    loaders.load(m, str(GUESTS / "long64.elf"), {})
    cpu = m.cpus[0]
    m.run(timeout=10)
    ctx = cpu.get_context(SyncLevel.FULL)
    assert all(v >= 1 for v in ctx.fetches.values())


def test_save_restore_round_trip(machine_factory) -> None:
    m, _, ctx = user_machine(machine_factory, "gpr_test")
    ctx.set_xmm(3, 0xABCDEF)
    state = m.hooks.call("save_arch_state", cpu=m.cpus[0])
    ctx.rax = 0
    ctx.set_xmm(3, 0)
    m.hooks.call("restore_arch_state", cpu=m.cpus[0], state=state)
    ctx.fetch("xsave")
    ctx.fetch("regs")
    assert ctx.xmm(3) == 0xABCDEF and ctx.rip == sym("gpr_test")


def test_dump_has_every_group_and_code_bytes(machine_factory) -> None:
    m, _ = machine_factory()
    loaders.load(m, str(GUESTS / "long64.elf"), {})
    text = m.cpus[0].dump_state()
    for word in ("rax=", "cr3=", " cs:", "gdt:", "dr7=", "events:", "xcr0=", "msrs:",
                 "code at rip: 31 c0"):
        assert word in text, word
