"""x86 Machine.fork of a running long-mode guest: ``ckpt64.elf`` (AVX/x87/GPR/MSR state at
CPL3, the PIT through the in-kernel 8259 and the local APIC timer interrupting it) is
forked mid-computation; parent and two children each finish on KVM with the result of an
uninterrupted run, the children's timers keep interrupting them, and the guest's own
computation state in each child is told apart by a different value the host writes to
its copy-on-write RAM after the fork."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import requires_kvm
from test_checkpoint_x86 import N_TICK_VALUES, build, run_to_mark, sym, uninterrupted

pytestmark = [requires_kvm, pytest.mark.kvm]


def _warm() -> tuple[Any, Any, bool]:
    """The guest at its half-way mark: mid-computation, both timers ticking."""
    m, rep, avx512 = build()
    try:
        run_to_mark(m, rep)
    except BaseException:
        m.close()
        raise
    return m, rep, avx512


def test_fork_mid_computation_all_three_finish_right(tmp_path: Path) -> None:
    m, rep, avx512 = _warm()
    scratch = sym("ticks_pic") + 0x800  # an unused guest page near the guest's data
    try:
        ticks0 = m.memory.read_u(sym("ticks_pic"), 8), m.memory.read_u(sym("ticks_apic"), 8)
        fds0 = sorted(os.listdir("/proc/self/fd"))
        pids = []
        for value in (0x1111, 0x2222):
            pid = m.fork()
            if pid == 0:
                status = 99
                try:
                    m.memory.write_u(scratch, 8, value)  # this child's own copy
                    r = m.run(timeout=300)
                    out = {"status": r.status, "values": rep.values,
                           "value": m.memory.read_u(scratch, 8),
                           "ticks": [m.memory.read_u(sym("ticks_pic"), 8),
                                     m.memory.read_u(sym("ticks_apic"), 8)],
                           "fds": len(os.listdir("/proc/self/fd"))}
                    (tmp_path / f"{os.getpid()}.json").write_text(json.dumps(out))
                    status = 0
                finally:
                    os._exit(status)
            pids.append(pid)
        m.memory.write_u(scratch, 8, 0x3333)
        assert m.run(timeout=300).status == 0
        parent_values = list(rep.values)
        assert m.memory.read_u(scratch, 8) == 0x3333
        for pid in pids:
            _, st = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(st) == 0
        assert sorted(os.listdir("/proc/self/fd")) == fds0
    finally:
        m.close()
    expected = uninterrupted(avx512)
    assert expected[0] != 0xDEAD
    assert parent_values[:-N_TICK_VALUES] == expected[:-N_TICK_VALUES]
    for pid, value in zip(pids, (0x1111, 0x2222), strict=True):
        out = json.loads((tmp_path / f"{pid}.json").read_text())
        assert out["status"] == 0 and out["value"] == value
        assert out["values"][:-N_TICK_VALUES] == expected[:-N_TICK_VALUES]
        assert out["ticks"][0] > ticks0[0] and out["ticks"][1] > ticks0[1], \
            "the timers did not interrupt the child"
        assert out["fds"] == len(fds0)


def test_fork_with_the_userspace_irqchip_keeps_the_lapic_mapped(tmp_path: Path) -> None:
    """The child's ``machine_configure`` maps the userspace LAPIC again: that mapping (in
    this process already) is discarded, and the guest's LAPIC reads still reach it."""
    from conftest import GUESTS, make_machine

    from kvmfw_x86 import loaders

    m, rep = make_machine(irqchip="userspace")
    try:
        loaders.load(m, str(GUESTS / "hw64.elf"), {})
        m.cpus[0].get_context().rbx = 1
        pid = m.fork()
        if pid == 0:
            status = 99
            try:
                r = m.run(timeout=60)
                (tmp_path / "child.json").write_text(json.dumps([r.status, rep.values]))
                status = 0
            finally:
                os._exit(status)
        assert m.run(timeout=60).status == 0
        assert rep.values == [0, 0, 0x00050014]
        _, st = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(st) == 0
        assert json.loads((tmp_path / "child.json").read_text()) == [0, [0, 0, 0x00050014]]
    finally:
        m.close()
