"""x86 checkpoint of a running long-mode guest, restored in a new process.

``ckpt64.elf`` builds AVX/AVX2 (and AVX-512 where the host has it), x87, GPR and MSR
state at CPL3 while the PIT (through the in-kernel 8259) and the local APIC timer
interrupt it. It is stopped mid-computation, drained, and its vCPU state
(``save_arch_state``), VM state (``save_vm_state``) and RAM are written to a directory; a
new Python process builds a fresh machine, restores them, checks that every register
group reads back equal, and runs the guest to its end. The result must equal an
uninterrupted run's.

Run as a script (``python test_checkpoint_x86.py restore DIR``) it is that new process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import GUESTS, make_machine, requires_kvm
from elftools.elf.elffile import ELFFile

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
    """VM state without the clock and the PIT's host load times (host time)."""
    s = dict(state)
    s.pop("clock", None)
    pit = bytearray.fromhex(s["pit"])
    for i in range(3):
        pit[24 * i + 16:24 * i + 24] = bytes(8)
    s["pit"] = pit.hex()
    return s


def checkpoint(m: Any, path: Path) -> dict[str, Any]:
    """Drain ``m`` and write its state and RAM under ``path``."""
    m.drain()
    pm = m.hooks.pm
    state = {
        "cpus": [pm.hook.save_arch_state(cpu=c) for c in m.cpus],
        "vm": pm.hook.save_vm_state(machine=m),
        "model": pm.hook.cpu_model(machine=m),
    }
    (path / "state.json").write_text(json.dumps(state))
    (path / "ram.bin").write_bytes(m.memory.read(0, MEMORY))
    return state


def restore(path: Path) -> dict[str, Any]:
    """The new process: restore, compare every group, run to the end."""
    saved = json.loads((path / "state.json").read_text())
    m, rep, _ = build()
    pm = m.hooks.pm
    assert pm.hook.check_cpu_model(machine=m, model=saved["model"]) is None
    m.memory.write(0, (path / "ram.bin").read_bytes())
    assert pm.hook.restore_vm_state(machine=m, state=saved["vm"]) is True
    for cpu, st in zip(m.cpus, saved["cpus"], strict=True):
        assert pm.hook.restore_arch_state(cpu=cpu, state=st) is True
    after = [pm.hook.save_arch_state(cpu=c) for c in m.cpus]
    groups = {}
    for a, b in zip(after, saved["cpus"], strict=True):
        ca, cb = comparable_cpu(a), comparable_cpu(b)
        groups.update({g: ca[g] == cb[g] for g in cb})
        tsc_back = a["msrs"][MSR_IA32_TSC] - b["msrs"][MSR_IA32_TSC]
    vm_after = pm.hook.save_vm_state(machine=m)
    va, vb = comparable_vm(vm_after), comparable_vm(saved["vm"])
    groups.update({f"vm.{g}": va[g] == vb[g] for g in vb})
    ticks_before = m.memory.read_u(sym("ticks_pic"), 8), m.memory.read_u(sym("ticks_apic"), 8)
    r = m.run(timeout=120)
    out = {"status": r.status, "values": rep.values, "groups": groups,
           "tsc_delta": tsc_back, "clock_delta": vm_after["clock"] - saved["vm"]["clock"],
           "ticks_before": ticks_before}
    m.close()
    return out


def uninterrupted(avx512: bool) -> list[int]:
    m, rep, _ = build(avx512)
    try:
        assert m.run(timeout=120).status == 0
        return rep.values
    finally:
        m.close()


def test_checkpoint_mid_computation_restores_in_new_process(tmp_path: Path) -> None:
    m, rep, avx512 = build()
    try:
        for _ in range(20):  # 20 ms slices of the guest's time until both timers ticked
            m.run(max_ticks=TICKS_PER_S // 50, timeout=60)
            ticks = m.memory.read_u(sym("ticks_pic"), 8), m.memory.read_u(sym("ticks_apic"), 8)
            if all(ticks) or rep.values:
                break
        progress = m.memory.read_u(sym("progress"), 8)
        assert rep.values == [], "the guest finished before the checkpoint"
        assert 0 < progress < 0x10000000, f"not mid-computation (progress {progress:#x})"
        assert all(ticks), f"no timer interrupt before the checkpoint: {ticks}"
        saved = checkpoint(m, tmp_path)
    finally:
        m.close()
    assert saved["vm"]["irqchip"] == "kernel"
    xs = bytes.fromhex(saved["cpus"][0]["xsave"])
    assert int.from_bytes(xs[512:520], "little") & 0x7 == 0x7  # x87, SSE, AVX in use
    runs = []
    for _ in range(2):  # the same checkpoint twice gives the same run
        p = subprocess.run([sys.executable, __file__, "restore", str(tmp_path)],
                           capture_output=True, text=True, timeout=300,
                           cwd=Path(__file__).parent)
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    expected = uninterrupted(avx512)
    assert expected[0] != 0xDEAD and len(expected) == 58 + 16 + N_TICK_VALUES
    for out in runs:
        assert out["status"] == 0
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
