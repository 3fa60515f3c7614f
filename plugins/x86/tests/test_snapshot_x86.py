"""x86 in-process snapshots: a long-mode guest with AVX/x87/MSR state and two timers
running (``ckpt64.elf``, the checkpoint test's guest) is snapshotted mid-computation;
after ``reset_to`` every register group, the VM state (irqchip, PIT) and RAM equal the
snapshot, and the guest finishes with the same result each time."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import make_machine, requires_kvm
from kvmfw.dirty import bitmap_pages
from test_checkpoint_x86 import (
    MEMORY,
    N_TICK_VALUES,
    build,
    comparable_cpu,
    comparable_vm,
    run_to_mark,
)

from kvmfw_x86 import loaders

pytestmark = [requires_kvm, pytest.mark.kvm]


def _state(m: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    pm = m.hooks.pm
    return ([comparable_cpu(pm.hook.save_arch_state(cpu=c)) for c in m.cpus],
            comparable_vm(pm.hook.save_vm_state(machine=m)))


def test_reset_to_mid_computation_gives_the_same_run() -> None:
    m, rep, _ = build()
    try:
        run_to_mark(m, rep)  # the guest's half-way mark, once both timers ticked
        snap = m.snapshot()
        cpus0, vm0 = _state(m)
        ram0 = m.memory.read(0, MEMORY)
        results = []
        for _ in range(2):
            rep.values.clear()
            assert m.run(timeout=120).status == 0
            results.append(list(rep.values))
            pages = m.reset_to(snap)
            assert 0 < pages < MEMORY // 4096
            cpus, vm = _state(m)
            bad = [g for g in cpus0[0] if cpus[0][g] != cpus0[0][g]]
            assert bad == [], f"register groups differ after reset_to: {bad}"
            assert vm == vm0
            assert m.memory.read(0, MEMORY) == ram0
        assert results[0][0] != 0xDEAD
        assert results[0][:-N_TICK_VALUES] == results[1][:-N_TICK_VALUES]
        snap.close()
    finally:
        m.close()


def test_loader_bss_fill_is_marked_dirty() -> None:
    m, _ = make_machine(memory=4 << 20)
    try:
        with m.dirty_tracker() as t:
            loaders.zero_fill(m, 0x100000 + 10, 3 * 4096, "bss")
            ram = next(r for r in m.memory if r.gpa <= 0x100000 < r.end)
            first = (0x100000 - ram.gpa) // 4096
            assert bitmap_pages(t.collect_bits()[ram]) == list(range(first, first + 4))
    finally:
        m.close()
