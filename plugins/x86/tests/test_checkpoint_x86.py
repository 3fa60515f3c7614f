"""x86 checkpoint of a running long-mode guest, restored in a new process.

``ckpt64.elf`` builds AVX/AVX2 (and AVX-512 where the host has it), x87, GPR and MSR
state at CPL3 while the PIT (through the in-kernel 8259) and the local APIC timer
interrupt it. It is stopped mid-computation, at the mark the guest makes half-way once
both timers have ticked (so on any KVM, however fast or slow), and checkpointed
(``Machine.checkpoint``); a
new Python process restores it (``Machine.restore``), checks that every register group
(``save_arch_state``, ``save_vm_state``) reads back equal to the checkpoint's, and runs the
guest to its end. The result must equal an uninterrupted run's; restoring twice gives the
same run.

Run as a script (``python test_checkpoint_x86.py restore DIR``) it is that new process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import GUESTS, Reporter, make_machine, requires_kvm
from elftools.elf.elffile import ELFFile
from kvmfw.device import Range

from kvmfw_x86 import loaders
from kvmfw_x86.cpuid import has_feature
from kvmfw_x86.plugin import X86Plugin

pytestmark = [requires_kvm, pytest.mark.kvm]

GUEST = GUESTS / "ckpt64.elf"
MEMORY = 16 << 20
TICKS_PER_S = 10**12
CR4_OSXSAVE = 1 << 18
MSR_IA32_TSC = "0x10"
APIC_TMCCT = 0x390
"""The APIC timer's current count: KVM computes it when read, so it moves."""
N_TICK_VALUES = 2
"""The guest's last two reports (PIT and APIC tick counts) depend on timing."""
N = 0x10000000
"""The guest's loop count (``progress`` counts down from it)."""


def sym(name: str) -> int:
    with open(GUEST, "rb") as f:
        return ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)[0]["st_value"]


def plugin_of(m: Any) -> X86Plugin:
    return m.hooks.pm.get_plugin("arch:x86")  # type: ignore[no-any-return]


def build(avx512: bool | None = None) -> tuple[Any, Any, bool]:
    m, rep = make_machine(irqchip="kernel", memory=MEMORY)
    loaders.load(m, str(GUEST), {})
    ctx = m.cpus[0].get_context()
    st = plugin_of(m).state(m)
    if has_feature(st.cpuid, "xsave"):
        ctx.cr4 = ctx.cr4 | CR4_OSXSAVE
    if avx512 is None:
        avx512 = all(c in ctx.info.xsave_offsets for c in (5, 6, 7)) and \
            "avx512f" in Path("/proc/cpuinfo").read_text().split()
    ctx.xcr0 = 0xE7 if avx512 else 0x7
    ctx.rdi = int(avx512)
    return m, rep, avx512


def run_to_mark(m: Any, rep: Reporter) -> tuple[int, int]:
    """Run ``ckpt64.elf`` to its half-way mark (the guest makes it once both timers have
    ticked) and check it is mid-computation there; returns the tick counts."""
    rep.stop_at_mark = True
    try:
        r = m.run(timeout=300)
    finally:
        rep.stop_at_mark = False
    assert rep.values == [], "the guest finished (or failed) before its mark"
    assert r.reason == "reporter: guest mark" and rep.marks == 1, r.reason
    progress = m.memory.read_u(sym("progress"), 8)
    assert 0 < progress < N, f"not mid-computation (progress {progress:#x})"
    ticks = m.memory.read_u(sym("ticks_pic"), 8), m.memory.read_u(sym("ticks_apic"), 8)
    assert all(ticks), f"no timer interrupt before the mark: {ticks}"
    assert ticks == (m.memory.read_u(sym("mark_pic"), 8), m.memory.read_u(sym("mark_apic"), 8))
    return ticks


def comparable_cpu(state: dict[str, Any]) -> dict[str, Any]:
    """A vCPU state without what moves by itself (the TSC, the APIC timer's count)."""
    s = json.loads(json.dumps(state))
    s["msrs"].pop(MSR_IA32_TSC, None)
    if "lapic" in s:
        raw = bytearray.fromhex(s["lapic"])
        raw[APIC_TMCCT:APIC_TMCCT + 4] = bytes(4)
        s["lapic"] = raw.hex()
    return s


def comparable_vm(state: dict[str, Any]) -> dict[str, Any]:
    """VM state without what moves in host time: the clock, the PIT's load times, and the
    request of the PIT's input on the master PIC (IRQ0), which the in-kernel PIT raises
    when its period ends whether the vCPUs run or not: a tick landing between two reads of
    a stopped machine is not a difference."""
    s = dict(state)
    s.pop("clock", None)
    pit = bytearray.fromhex(s["pit"])
    for i in range(3):
        pit[24 * i + 16:24 * i + 24] = bytes(8)
    s["pit"] = pit.hex()
    pic = bytearray.fromhex(s["pic_master"])  # struct kvm_pic_state: last_irr, irr, ...
    pic[0] &= 0xFE
    pic[1] &= 0xFE
    s["pic_master"] = pic.hex()
    return s


def attach_reporter(m: Any) -> Reporter:
    """The test's reporter device (added in code, so added again on restore)."""
    rep = Reporter()
    rep.machine = m
    m.map_device(Range("pio", 0xE0, 8, "reporter"), rep)
    return rep


def restore(path: Path) -> dict[str, Any]:
    """The new process: restore, compare every group, run to the end."""
    from kvmfw.checkpoint.reader import chain, load_state
    from kvmfw.machine import Machine

    saved = load_state(chain(path)[-1])
    reps: list[Reporter] = []
    m = Machine.restore(path, arch_plugin=X86Plugin(),
                        setup=lambda mm: reps.append(attach_reporter(mm)))
    rep = reps[0]
    pm = m.hooks.pm
    after = [pm.hook.save_arch_state(cpu=c) for c in m.cpus]
    groups = {}
    for a, b in zip(after, saved.cpus, strict=True):
        ca, cb = comparable_cpu(a), comparable_cpu(b)
        groups.update({g: ca[g] == cb[g] for g in cb})
        tsc_back = a["msrs"][MSR_IA32_TSC] - b["msrs"][MSR_IA32_TSC]
    vm_after = pm.hook.save_vm_state(machine=m)
    assert saved.vm is not None
    va, vb = comparable_vm(vm_after), comparable_vm(saved.vm)
    groups.update({f"vm.{g}": va[g] == vb[g] for g in vb})
    ticks_before = m.memory.read_u(sym("ticks_pic"), 8), m.memory.read_u(sym("ticks_apic"), 8)
    r = m.run(timeout=300)
    out = {"status": r.status, "values": rep.values, "groups": groups,
           "tsc_delta": tsc_back, "clock_delta": vm_after["clock"] - saved.vm["clock"],
           "ticks_before": ticks_before}
    m.close()
    return out


def uninterrupted(avx512: bool) -> list[int]:
    m, rep, _ = build(avx512)
    try:
        assert m.run(timeout=300).status == 0
        assert rep.marks == 1
        return rep.values
    finally:
        m.close()


def test_checkpoint_mid_computation_restores_in_new_process(tmp_path: Path) -> None:
    m, rep, avx512 = build()
    try:
        run_to_mark(m, rep)
        ckpt = tmp_path / "cpt"
        m.checkpoint(ckpt)
    finally:
        m.close()
    from kvmfw.checkpoint.reader import chain, load_state

    saved = load_state(chain(ckpt)[-1])
    assert saved.vm is not None and saved.vm["irqchip"] == "kernel"
    assert "lapic" in saved.cpus[0] and "pit" in saved.vm
    xs = bytes.fromhex(saved.cpus[0]["xsave"])
    assert int.from_bytes(xs[512:520], "little") & 0x7 == 0x7  # x87, SSE, AVX in use
    runs = []
    for _ in range(2):  # the same checkpoint twice gives the same run
        p = subprocess.run([sys.executable, __file__, "restore", str(ckpt)],
                           capture_output=True, text=True, timeout=300,
                           cwd=Path(__file__).parent)
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    expected = uninterrupted(avx512)
    assert expected[0] != 0xDEAD and len(expected) == 58 + 16 + N_TICK_VALUES
    for out in runs:
        assert out["status"] == 0
        assert {"regs", "sregs", "xsave", "xcrs", "msrs", "debugregs", "events", "lapic",
                "mp_state", "vm.pic_master", "vm.pic_slave", "vm.ioapic", "vm.pit"} \
            <= set(out["groups"])
        bad = [g for g, same in out["groups"].items() if not same]
        assert bad == [], f"register groups differ after restore: {bad}"
        assert 0 <= out["tsc_delta"] < 10 * 10**9, "the TSC did not continue from the saved value"
        assert out["values"][:-N_TICK_VALUES] == expected[:-N_TICK_VALUES]
        pic, apic = out["values"][-N_TICK_VALUES:]
        assert pic > out["ticks_before"][0] and apic > out["ticks_before"][1], \
            "the timers did not interrupt the guest after the restore"
    if avx512:  # zmm17/18 are non-zero only when the AVX-512 path ran
        assert any(expected[16:48])


if __name__ == "__main__" and sys.argv[1:2] == ["restore"]:
    print(json.dumps(restore(Path(sys.argv[2]))))
