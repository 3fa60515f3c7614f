"""vCPU state checks and restore order, as pure logic (any host)."""

from __future__ import annotations

from typing import Any

import pytest
from kvmfw_armv8 import regs
from kvmfw_armv8 import state as arm_state

from kvmfw.errors import StateError

IDS = [*regs.GPR_IDS, *regs.EL1_IDS, *regs.FP_IDS, regs.KVM_REG_ARM_TIMER_CTL,
       regs.KVM_REG_ARM_TIMER_CVAL, regs.KVM_REG_ARM_TIMER_CNT, regs.id_of("SCTLR_EL1"),
       regs.KVM_REG_ARM_PSCI_VERSION, regs.id_of("MIDR_EL1")]


def good() -> dict[str, Any]:
    return {"arch": "armv8", "format": arm_state.FORMAT, "mpidr": 0x80000000, "features": 4,
            "mp_state": 0, "regs": {f"{r:#x}": "0x0" for r in IDS}, "unreadable": []}


def test_restore_order_puts_firmware_first_timer_counter_before_compare_before_control():
    order = arm_state.restore_order(list(reversed(IDS)))
    pos = {r: i for i, r in enumerate(order)}
    assert order[0] == regs.KVM_REG_ARM_PSCI_VERSION
    assert pos[regs.id_of("SCTLR_EL1")] < pos[regs.KVM_REG_ARM_TIMER_CNT]
    assert (pos[regs.KVM_REG_ARM_TIMER_CNT] < pos[regs.KVM_REG_ARM_TIMER_CVAL]
            < pos[regs.KVM_REG_ARM_TIMER_CTL] < min(pos[r] for r in regs.CORE_IDS))
    assert max(pos[r] for r in regs.EL1_IDS) < min(pos[r] for r in regs.FP_IDS)
    assert max(pos[r] for r in regs.FP_IDS) < min(pos[r] for r in regs.GPR_IDS)
    assert order[-1] == regs.PC_ID and order[-2] == regs.PSTATE_ID


def test_check_accepts_a_complete_state():
    values, mp = arm_state.check(good(), IDS, 0x80000000, 4)
    assert set(values) == set(IDS) and mp == 0


@pytest.mark.parametrize("change, words", [
    (lambda s: s.update(arch="x86"), "arch"),
    (lambda s: s.update(format=99), "format"),
    (lambda s: s.update(mpidr=1), "MPIDR"),
    (lambda s: s.update(features=0), "features"),
    (lambda s: s.update(mp_state=3), "mp_state"),
    (lambda s: s.update(mp_state=True), "mp_state"),
    (lambda s: s["regs"].pop(f"{regs.PC_ID:#x}"), "registers"),
    (lambda s: s["regs"].update({f"{regs.PC_ID:#x}": "0x" + "f" * 17}), "PC"),
    (lambda s: s["regs"].update({f"{regs.FPSR_ID:#x}": "0x100000000"}), "FPSR"),
    (lambda s: s["regs"].update({f"{regs.PC_ID:#x}": "zz"}), "hex"),
    (lambda s: s["regs"].update({f"{regs.PC_ID:#x}": 5}), "PC"),
    (lambda s: s.update(regs=[]), "mapping"),
    (lambda s: (s["regs"].pop(f"{regs.PC_ID:#x}"), s["regs"].update({"0x1" * 9: "0x0"})),
     "id"),
    (lambda s: (s["regs"].pop(f"{regs.PC_ID:#x}"),
                s["regs"].update({f"{regs.id_of('TPIDR_EL1'):#x}": "0x0"})), "TPIDR_EL1"),
])
def test_check_names_what_is_wrong(change: Any, words: str) -> None:
    s = good()
    change(s)
    with pytest.raises(StateError) as info:
        arm_state.check(s, IDS, 0x80000000, 4)
    assert words in str(info.value)


def test_compare_model_names_the_first_difference():
    here = {"arch": "armv8", "target": 5, "features": 4, "gic": "v3", "sve": False,
            "id_regs": {f"{regs.id_of('MIDR_EL1'):#x}": "0x410fd034"}}
    assert arm_state.compare_model(dict(here), here) is None
    assert "target" in (arm_state.compare_model({**here, "target": 6}, here) or "")
    other = {**here, "id_regs": {f"{regs.id_of('MIDR_EL1'):#x}": "0x1"}}
    assert "MIDR_EL1" in (arm_state.compare_model(other, here) or "")
    assert "not a mapping" in (arm_state.compare_model([], here) or "")
    extra = {**here, "id_regs": {**here["id_regs"], "0x603000000013c008": "0x0"}}
    assert "does not exist" in (arm_state.compare_model(extra, here) or "")
