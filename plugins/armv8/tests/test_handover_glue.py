"""The AArch64 hand-over glue (kvmfw_armv8.emu) against Unicorn alone (no arm64 KVM here):
an EL1 guest turns its MMU on and runs a checksum loop with MMIO; handing its state through
the thread context into a fresh Unicorn at several points, MMU on, gives the result of an
uninterrupted run. (On a real arm64 KVM the same glue runs through ``Machine.emulate``.)"""

from __future__ import annotations

import ctypes
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kvmfw_armv8 import regs
from kvmfw_armv8.context import ArmV8Context

unicorn = pytest.importorskip("unicorn", reason="the emulated CPU needs the 'emu' extra")
pytest.importorskip("capstone", reason="the trace needs the 'emu' extra (capstone)")

from kvmfw_armv8.emu import SYSREGS, ArmV8EmuGlue  # noqa: E402

from kvmfw.emu import HandoverError  # noqa: E402

GUEST = (Path(__file__).parent / "guests" / "handover.bin").read_bytes()
RAM, RAM_SIZE, DEV = 0x40000000, 4 << 20, 0x0A000000


class Device:
    def __init__(self) -> None:
        self.n = 0
        self.word = 0
        self.out: dict[int, int] = {}

    def read(self, uc: Any, off: int, size: int, _d: Any) -> int:
        if off == 0:
            self.n += 1
            return self.n * 7
        return (self.word * 3) & 0xFFFFFFFF

    def write(self, uc: Any, off: int, size: int, value: int, _d: Any) -> None:
        if off == 4:
            self.word = value
        else:
            self.out[off] = value


def machine(ram: bytearray, dev: Device) -> Any:
    """A Unicorn with the guest's RAM (the same host buffer every time) and the device."""
    glue = ArmV8EmuGlue()
    uc = glue.create(None)
    addr = ctypes.addressof(
        (ctypes.c_char * len(ram)).from_buffer(ram))
    uc.mem_map_ptr(RAM, len(ram), unicorn.UC_PROT_ALL, addr)
    uc.mmio_map(DEV, 0x1000, dev.read, None, dev.write, None)
    return glue, uc


def fresh_cpu() -> Any:
    ctx = ArmV8Context()
    ctx.pc = RAM
    ctx.pstate = 0x3C5  # EL1h, DAIF masked
    ctx.sysregs.load({regs.id_of(n): 0 for n in SYSREGS})
    ctx.sysregs.set_by_name("SCTLR_EL1", 0x30D00800)  # reset value, MMU off
    return SimpleNamespace(id=0, get_context=lambda: ctx)


def run(glue: Any, uc: Any, n: int) -> int:
    """Exactly ``n`` instructions (fewer at wfi), counted by a code hook."""
    done = [0]

    def code(u: Any, addr: int, size: int, _d: Any) -> None:
        if done[0] >= n or glue.is_wait(bytes(u.mem_read(addr, 4))):
            u.emu_stop()
            return
        done[0] += 1

    h = uc.hook_add(unicorn.UC_HOOK_CODE, code)
    uc.emu_start(glue.pc(uc), -1 & 0xFFFFFFFFFFFFFFFF)
    uc.hook_del(h)
    return done[0]


def final(dev: Device, ram: bytearray, slices: list[int]) -> tuple[dict[int, int], list[Any]]:
    cpu = fresh_cpu()
    seen = []
    for n in slices:
        glue, uc = machine(ram, dev)
        glue.verify(cpu)
        glue.load(uc, cpu)
        run(glue, uc, n)
        glue.store(uc, cpu)
        ctx = cpu.get_context()
        seen.append((ctx.sysregs.by_name("SCTLR_EL1") & 1, ctx.x[5]))
    return dev.out, seen


def test_el1_mmu_on_handover_through_the_context_equals_one_run() -> None:
    ram_a = bytearray(RAM_SIZE)
    ram_a[:len(GUEST)] = GUEST
    ram_b = bytearray(ram_a)
    ref, _ = final(Device(), ram_a, [100_000])
    assert ref[16] == 300 and ref[8] != 0
    out, seen = final(Device(), ram_b, [25, 1, 700, 3, 1500, 100_000])
    assert out == ref
    # the switches after the prologue happened with the MMU on, in the middle of the loop
    assert [s[0] for s in seen[:5]] == [1, 1, 1, 1, 1] and 0 < seen[2][1] < 300
    assert ram_b == ram_a


def test_refuses_aarch32_and_el2() -> None:
    glue = ArmV8EmuGlue()
    cpu = fresh_cpu()
    cpu.get_context().pstate = 0x10 | 0x1C0  # AArch32 user
    with pytest.raises(HandoverError, match="AArch32"):
        glue.verify(cpu)
    cpu.get_context().pstate = 0x3C9  # EL2h
    with pytest.raises(HandoverError, match="EL2"):
        glue.verify(cpu)


def test_disassembly_of_the_guest() -> None:
    glue, uc = machine(bytearray(GUEST.ljust(RAM_SIZE, b"\0")), Device())
    cs = glue.disassembler(uc)
    text = [f"{i.mnemonic} {i.op_str}" for i in cs.disasm(GUEST, RAM)]
    assert "msr ttbr0_el1, x0" in text and "wfi " in text
