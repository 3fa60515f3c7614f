"""CPU hand-over KVM -> Unicorn -> KVM (issue 12 item 2) and exact instruction stops
(item 3) on real x86 guests: the result after hand-overs equals the all-KVM run."""

from __future__ import annotations

import io
from typing import Any

import pytest
from conftest import GUESTS, make_machine, requires_kvm
from kvmfw.device import Range
from kvmfw.emu import EmulatedCPU, HandoverError, Trace
from kvmfw.errors import StateError

from kvmfw_x86 import loaders

pytest.importorskip("unicorn", reason="the emulated CPU needs the 'emu' extra (unicorn)")
pytest.importorskip("capstone", reason="the trace needs the 'emu' extra (capstone)")

pytestmark = requires_kvm
TICK_MS = 1_000_000_000  # simulated ticks per millisecond


class Counter:
    """Port 0x100: each read returns the next value of a sequence; MMIO 0xd0001000 holds a
    word the guest reads (times 3) and writes. Its answers depend on the order of
    accesses, so a lost, repeated or reordered access changes the guest's checksum."""

    def __init__(self) -> None:
        self.n = 0
        self.mem = 0

    def read(self, offset: int, size: int) -> bytes:
        self.n += 1
        return (self.n * 7 + offset).to_bytes(8, "little")[:size]

    def write(self, offset: int, data: bytes) -> None:
        self.mem = int.from_bytes(data, "little")


class CounterMmio:
    def __init__(self, c: Counter) -> None:
        self.c = c

    def read(self, offset: int, size: int) -> bytes:
        return ((self.c.mem * 3) & 0xFFFFFFFF).to_bytes(8, "little")[:size]

    def write(self, offset: int, data: bytes) -> None:
        self.c.mem = int.from_bytes(data, "little")


def build(guest: str, **load: Any) -> tuple[Any, Any, Counter]:
    m, rep = make_machine()
    c = Counter()
    m.map_device(Range("pio", 0x100, 4, "counter"), c)
    m.map_device(Range("mmio", 0xD0001000, 0x10, "counter-mmio"), CounterMmio(c))
    loaders.load(m, str(GUESTS / guest), load)
    return m, rep, c


def all_kvm(guest: str, **load: Any) -> list[int]:
    m, rep, _ = build(guest, **load)
    try:
        r = m.run(timeout=120)
        assert r.reason.startswith("reporter"), r
        return rep.values
    finally:
        m.close()


def switched(guest: str, slices: list[tuple[int, int]], *, trace: Trace | None = None,
             mode: str | None = None, **load: Any) -> tuple[list[int], list[int]]:
    """Run on KVM for each (ticks, insts): ``ticks`` on KVM, then ``insts`` emulated."""
    m, rep, _ = build(guest, **load)
    done = []
    try:
        for ticks, insts in slices:
            if ticks:
                m.run(max_ticks=ticks, timeout=120)
                if m.exit_reason.startswith("reporter"):
                    break
            if mode is not None:
                assert m.cpus[0].get_context().mode == mode
            done.append(m.emulate(insts, trace=trace))
            assert m.cpus[0].get_context().mode == (mode or m.cpus[0].get_context().mode)
        r = m.run(timeout=120)
        assert r.reason.startswith("reporter"), r
        return rep.values, done
    finally:
        m.close()


def test_long_mode_checksum_switched_at_several_points_equals_all_kvm() -> None:
    ref = all_kvm("handover64.elf")
    assert ref[2] == 400  # iterations
    lines: list[str] = []
    tr = Trace(callback=lambda rec: lines.append(str(rec)))
    # from the first instruction, then at several points in the loop (KVM in between)
    values, done = switched("handover64.elf", [(0, 7), (TICK_MS, 250), (TICK_MS // 3, 1),
                                               (2 * TICK_MS, 600)], trace=tr, mode="long64")
    assert values == ref
    assert done == [7, 250, 1, 600]  # exact: every slice ran its full budget
    assert len(lines) == sum(done)
    # the trace: address, bytes and Capstone's disassembly of the emulated instructions
    assert lines[0].split()[1:] == ["0x0000000000100000:", "31", "db", "xor", "ebx,", "ebx"]
    text = "\n".join(lines)
    for insn in ("in eax, dx", "imul rbx, rbx, 0x1f", "mov eax, dword ptr [rsi]",
                 "mov dword ptr [rsi], ebx", "movabs rsi, 0xd0001000", "jne 0x100018"):
        assert insn in text, insn


def test_real_mode_handover_equals_all_kvm() -> None:
    ref = all_kvm("handover16.bin", load_addr=0x7C00)
    assert ref[1] == 300
    values, done = switched("handover16.bin", [(0, 5), (TICK_MS // 2, 333)], mode="real",
                            load_addr=0x7C00)
    assert values == ref and done == [5, 333]


def test_protected32_handover_equals_all_kvm() -> None:
    ref = all_kvm("handover32.elf")
    assert ref[1] == 400
    buf = io.StringIO()
    values, done = switched("handover32.elf", [(0, 3), (TICK_MS, 500)], mode="protected32",
                            trace=Trace(buf))
    assert values == ref and done == [3, 500]
    assert "imul ebx, ebx, 0x1f" in buf.getvalue()


def test_emulation_stops_before_hlt_and_kvm_executes_it() -> None:
    m, rep, _ = build("handover64.elf")
    try:
        n = m.emulate(1_000_000)
        # the whole program ran emulated up to (not including) the final hlt; the
        # reporter's end port asked the machine to stop first, so the slice ended there
        assert n < 1_000_000 and rep.values[2] == 400
        assert m.cpus[0].get_context().r12 == 400
    finally:
        m.close()


def test_trace_with_registers_and_plugin_hooks() -> None:
    m, rep, _ = build("handover64.elf")
    buf = io.StringIO()
    try:
        emu = EmulatedCPU(m, trace=Trace(buf, registers=True))
        seen: list[int] = []
        mem: list[tuple[str, int]] = []
        emu.add_instruction_hook(lambda e, pc, size: seen.append(pc))
        emu.add_memory_hook(lambda e, kind, addr, size, value: mem.append((kind, addr)))
        emu.take_over_from(m.cpus[0])
        assert m.cpus[0].switched_out
        assert emu.run(17) == 17
        with pytest.raises(StateError, match="switched out"):
            m.run(timeout=10)  # KVM must not run a vCPU the emulator holds
        with pytest.raises(StateError, match="already switched out"):
            EmulatedCPU(m).take_over_from(m.cpus[0])
        m.cpus[0].take_over_from(emu)  # gem5's names: back to KVM
        assert not m.cpus[0].switched_out and emu.cpu is None
        assert len(seen) == 17 and seen[0] == 0x100000
        assert ("read", 0xD0001000) in mem and ("write", 0xD0001000) in mem
        first = buf.getvalue().splitlines()[0]
        assert "xor ebx, ebx" in first and "rip=" not in first and "rbx=" in first
        assert m.dump_stats("json")  # the insts group is in the stats
        assert m.stats.snapshot()["system.cpu0.insts"]["emulated"] == 17
    finally:
        m.close()


def test_refuses_vmx_and_big_real_mode_and_changes_nothing() -> None:
    m, rep, _ = build("handover64.elf")
    try:
        ctx = m.cpus[0].get_context()
        ctx.cr4 = ctx.cr4 | (1 << 13)  # VMXE
        emu = EmulatedCPU(m)
        with pytest.raises(HandoverError, match="VMX"):
            emu.take_over_from(m.cpus[0])
        assert not m.cpus[0].switched_out and emu.cpu is None
    finally:
        m.close()
    m, rep, _ = build("handover16.bin", load_addr=0x7C00)
    try:
        ctx = m.cpus[0].get_context()
        assert ctx.mode == "real"
        ds = ctx.ds
        ds.limit = 0xFFFFFFFF  # unreal mode: Unicorn would reload a 64 KiB limit
        ctx.ds = ds
        with pytest.raises(HandoverError, match="big real"):
            m.emulate(1)
        assert not m.cpus[0].switched_out
        assert m.cpus[0].get_context().rip == 0x7C00
    finally:
        m.close()


def test_until_instructions_stops_with_the_guest_counter_at_n() -> None:
    for n in (0, 1, 1000, 4095):
        m, rep = make_machine()
        try:
            loaders.load(m, str(GUESTS / "insts64.elf"), {})
            r = m.run(until_instructions=n)
            assert r.status == 0 and "instruction limit" in r.reason
            assert m.cpus[0].get_context().r12 == n  # one `inc r12` per instruction
            st = m.stats.snapshot()["system.cpu0.insts"]
            assert st["emulated"] == n and st["measured"] == 0 and st["method"] == "emulated"
            # the rest runs on KVM from exactly there
            r = m.run(timeout=60)
            assert m.cpus[0].get_context().r12 == 4096
        finally:
            m.close()


def test_interrupt_raised_while_emulated_is_held_until_kvm() -> None:
    """The documented rule: an interrupt raised while the CPU is emulated is not delivered
    by the emulator; it stays pending and KVM delivers it after the switch back (here at
    the guest's ``sti; hlt``)."""
    from kvmfw_x86.plugin import X86Plugin

    m, rep = make_machine(irqchip="userspace")
    try:
        loaders.load(m, str(GUESTS / "irq.bin"), {"load_addr": 0x7C00})
        st = X86Plugin.state(m.hooks.pm.get_plugin("arch:x86"), m)  # type: ignore[arg-type]
        line = m.irq(0)
        emu = EmulatedCPU(m)
        # a plugin's per-instruction hook raises IRQ 0 at the 9th instruction (the IVT
        # entries for it are written by then: 2 movs for DS, 6 for the IVT)
        emu.add_instruction_hook(lambda e, pc, size: line.pulse() if e._done == 8 else None)
        emu.take_over_from(m.cpus[0])
        n = emu.run(12)
        emu.switch_out()
        assert n == 12 and m.cpus[0].get_context().mode == "real"
        assert list(st.interrupts.delivered) == [] and rep.values == []  # held
        assert m.cpus[0].interrupt_pending
        r = m.run(timeout=60)
        assert r.reason == "all vCPUs halted and no event is pending"
        assert rep.values == [0x20]  # delivered by KVM after the switch back
        assert list(st.interrupts.delivered) == [(0, 0x20)]
    finally:
        m.close()


def test_trace_of_code_at_a_virtual_address_that_is_not_physical() -> None:
    """gdb64.elf maps an alias of its first 2 MiB at 0xffff800000000000: code run there
    under the emulator is traced with its own bytes (a page walk on Unicorn's CR3), and the
    guest goes on correctly on KVM."""
    high = 0xFFFF800000000000
    m, rep = make_machine()
    try:
        loaders.load(m, str(GUESTS / "gdb64.elf"), {})
        assert m.emulate(5) == 5  # rsp, the two page table entries, cr3, the PML4 entry
        ctx = m.cpus[0].get_context()
        rip = ctx.rip
        ctx.rip = high + rip  # go on in the alias
        lines: list[str] = []
        assert m.emulate(2, trace=Trace(callback=lambda r: lines.append(str(r)))) == 2
        assert f"{high + rip:#018x}: bf 03 00 00 00" in lines[0] and "mov edi, 3" in lines[0]
        assert "mov esi, 4" in lines[1]
        assert m.cpus[0].get_context().rip == high + rip + 10
    finally:
        m.close()


def test_an_interrupt_instruction_is_left_to_kvm_which_delivers_it() -> None:
    """``int $0x20`` under emulation is not counted: the slice ends before it and KVM
    executes it through the guest's own IVT (irq.bin's handler reports the vector)."""
    m, rep = make_machine()
    try:
        loaders.load(m, str(GUESTS / "irq.bin"), {"load_addr": 0x7C00})
        assert m.emulate(4) == 4  # DS = 0 and the IVT entry for vector 0x20
        m.memory.write(0x9000, b"\x90\xcd\x20\xf4")  # nop; int $0x20; hlt
        ctx = m.cpus[0].get_context()
        assert ctx.mode == "real" and ctx.cs.base == 0
        ctx.rip = 0x9000
        emu = EmulatedCPU(m)
        emu.take_over_from(m.cpus[0])
        assert emu.run(3) == 1  # the nop; the int is handed back
        assert "exception/interrupt 32" in emu.stop_reason
        m.cpus[0].take_over_from(emu)
        assert m.cpus[0].get_context().rip == 0x9001
        r = m.run(timeout=60)
        assert r.reason == "all vCPUs halted and no event is pending"
        assert rep.values == [0x20]
        assert m.cpus[0].get_context().rip == 0x9004  # after the hlt
    finally:
        m.close()
