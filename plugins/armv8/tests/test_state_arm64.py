"""Complete vCPU and vGIC state on a real arm64 KVM: save from a running guest, restore
into a new machine, continue (run by plugins/armv8/env/run-arm64-kvm.sh)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from test_kvm_arm64 import run, start_at

pytestmark = pytest.mark.arm64_kvm

RAM = 0x4000_0000
MEM = 64 << 20


def _counters() -> frozenset[int]:
    from kvmfw_armv8 import regs
    from kvmfw_armv8 import state as arm_state

    return frozenset({regs.KVM_REG_ARM_TIMER_CNT, arm_state.PTIMER_CNT,
                      regs.SYSREG_BY_NAME["CNTV_TVAL_EL0"], regs.SYSREG_BY_NAME["CNTP_TVAL_EL0"]})


COUNTERS = _counters()
"""Registers that move on their own between a save and the read-back."""


def copy_ram(src: Any, dst: Any) -> None:
    for off in range(0, MEM, 4 << 20):
        dst.memory.write(RAM + off, bytes(src.memory.read(RAM + off, 4 << 20)))


def save_all(m: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    m.drain()
    cpus = [m.hooks.call("save_arch_state", cpu=c) for c in m.cpus]
    return cpus, m.hooks.call("save_vm_state", machine=m)


def needs_gicv3() -> None:
    from kvmfw_armv8.testing import host_gic

    if host_gic() == "v2":
        pytest.skip("the bare-metal test guest programs a GICv3; this host has a GICv2")


def restore_all(m: Any, cpus: list[dict[str, Any]], vm: dict[str, Any]) -> None:
    assert m.hooks.call("restore_vm_state", machine=m, state=vm)
    for c, st in zip(m.cpus, cpus, strict=True):
        assert m.hooks.call("restore_arch_state", cpu=c, state=st)


def test_every_register_and_vgic_state_round_trips_and_the_guest_takes_both_irqs(
        build: Any) -> None:
    """A guest with an SPI pending (line held high) and the virtual timer armed, IRQs
    masked, is saved at a pause; a new machine gets RAM, vGIC and vCPU state; every
    register and every vGIC slot reads back equal; the guest continues there and takes
    both interrupts."""
    needs_gicv3()
    from kvmfw_armv8 import guests, regs

    from kvmfw.hookspecs import SyncLevel

    m1, dev1 = build()
    line1 = m1.irq(guests.TEST_SPI)
    dev1.on_ready = line1.raise_
    ctx = start_at(m1, "ckpt")
    rng = random.Random(11)
    ctx.v[:] = [rng.getrandbits(128) for _ in range(32)]
    ctx.sysregs.set_by_name("TPIDR_EL1", 0x1122_3344_5566_7788)
    ctx.sysregs.set_by_name("TPIDR_EL0", 0x99AA_BBCC_DDEE_FF00)
    ctx.fpcr = 0x0300_0000
    res = run(m1, dev1)
    assert res.reason == "test guest paused" and dev1.irqs == []
    cpus, vm = save_all(m1)
    regs1 = cpus[0]["regs"]
    assert set(regs1) | set(cpus[0]["unreadable"]) == {
        f"{r:#x}" for r in m1.cpus[0].vcpu.reg_list()}
    ctl = int(regs1[f"{regs.KVM_REG_ARM_TIMER_CTL:#x}"], 16)
    assert ctl & 1 and not ctl & 2  # armed, not masked
    assert vm["gic"] == "v3" and vm["vgic"]["regs"]["level/0x20"] == "0x20"  # SPI 37 high

    m2, dev2 = build()
    copy_ram(m1, m2)
    line2 = m2.irq(guests.TEST_SPI)
    dev2.on_irq = lambda intid: line2.lower() if intid == 32 + guests.TEST_SPI else None
    restore_all(m2, cpus, vm)
    cpus2, vm2 = save_all(m2)
    diff = {k for k in vm["vgic"]["regs"] if vm["vgic"]["regs"][k] != vm2["vgic"]["regs"][k]}
    assert not diff, f"vGIC slots differ after restore: {sorted(diff)[:10]}"
    counters = {f"{r:#x}" for r in COUNTERS}
    regs2 = cpus2[0]["regs"]
    changed = {regs.name_of(int(k, 16)) for k in regs1 if k not in counters
               and regs1[k] != regs2.get(k)}
    # CNTV_CTL's ISTATUS (bit 2) is the comparator's output: it turns on by itself once
    # the counter passes CVAL between the save and the read-back (a slow host gets there)
    tctl = f"{regs.KVM_REG_ARM_TIMER_CTL:#x}"
    if int(regs1[tctl], 16) & ~4 == int(regs2[tctl], 16) & ~4:
        changed.discard("CNTV_CTL_EL0")
    assert not changed, f"registers differ after restore: {sorted(changed)}"
    cnt = f"{regs.KVM_REG_ARM_TIMER_CNT:#x}"
    assert 0 <= int(regs2[cnt], 16) - int(regs1[cnt], 16) < 1 << 40  # continues, not reset
    assert cpus2[0]["mp_state"] == cpus[0]["mp_state"] == 0
    ctx2 = m2.cpus[0].get_context(SyncLevel.FULL)
    assert ctx2.sysregs.by_name("TPIDR_EL1") == 0x1122_3344_5566_7788

    assert line2.level == 1  # the line object mirrors the restored input level
    res2 = run(m2, dev2, timeout=120)
    assert res2.reason == "test guest done"
    assert sorted(dev2.irqs) == [27, 32 + guests.TEST_SPI]


def test_restore_refuses_a_bad_state_and_changes_nothing(build: Any) -> None:
    """(Runs on a GICv2 host too: KVMFW_ARM64_GIC=2.)"""
    from kvmfw_armv8 import regs
    from kvmfw_armv8.testing import host_gic

    from kvmfw.errors import StateError

    m1, dev1 = build(options={"gic": host_gic()})
    start_at(m1, "compute")
    run(m1, dev1)
    cpus, vm = save_all(m1)
    m2, _ = build(options={"gic": host_gic()})
    before_cpu = m2.hooks.call("save_arch_state", cpu=m2.cpus[0])
    before_vm = m2.hooks.call("save_vm_state", machine=m2)
    pc = f"{regs.PC_ID:#x}"
    bad_cpus = [
        {**cpus[0], "regs": {**cpus[0]["regs"], pc: "0x1" + "0" * 16}},  # 65 bits
        {**cpus[0], "regs": {k: v for k, v in cpus[0]["regs"].items() if k != pc}},
        {**cpus[0], "regs": {**cpus[0]["regs"], "0x6030000000130000": "0x0"}},
        {**cpus[0], "mpidr": 5},
        {**cpus[0], "mp_state": 77},
    ]
    for bad in bad_cpus:
        with pytest.raises(StateError):
            m2.hooks.call("restore_arch_state", cpu=m2.cpus[0], state=bad)
    vregs = vm["vgic"]["regs"]
    bad_vms = [
        {**vm, "vgic": {**vm["vgic"], "regs": {**vregs, "dist/0x104": "0x1" + "0" * 8}}},
        {**vm, "vgic": {**vm["vgic"], "regs": {k: v for k, v in vregs.items()
                                               if k != "dist/0x0"}}},
        {**vm, "vgic": {**vm["vgic"], "nr_irqs": 1 << 40}},
        {**vm, "gic": "v3" if vm["gic"] == "v2" else "v2"},
    ]
    for bad in bad_vms:
        with pytest.raises(StateError):
            m2.hooks.call("restore_vm_state", machine=m2, state=bad)
    counters = {f"{r:#x}" for r in COUNTERS}
    after = m2.hooks.call("save_arch_state", cpu=m2.cpus[0])["regs"]
    assert {k: v for k, v in after.items() if k not in counters} == {
        k: v for k, v in before_cpu["regs"].items() if k not in counters}
    assert m2.hooks.call("save_vm_state", machine=m2) == before_vm


def test_cpu_model_is_recorded_and_checked(build: Any) -> None:
    from kvmfw_armv8 import regs
    from kvmfw_armv8.testing import host_gic

    m, _ = build(options={"gic": host_gic()})
    model = m.hooks.call("cpu_model", machine=m)
    names = {regs.name_of(int(k, 16)) for k in model["id_regs"]}
    assert {"MIDR_EL1", "ID_AA64PFR0_EL1", "ID_AA64ISAR0_EL1", "CTR_EL0"} <= names
    assert "MPIDR_EL1" not in names
    assert m.hooks.call("check_cpu_model", machine=m, model=model) is None
    pfr0 = f"{regs.SYSREG_BY_NAME['ID_AA64PFR0_EL1']:#x}"
    other = {**model, "id_regs": {**model["id_regs"], pfr0: "0x1"}}
    reason = m.hooks.call("check_cpu_model", machine=m, model=other)
    assert reason and "ID_AA64PFR0_EL1" in reason
    reason = m.hooks.call("check_cpu_model", machine=m, model={**model, "features": 1 << 3})
    assert reason and "features" in reason


def test_powered_off_secondary_state_round_trips(build: Any) -> None:
    """MP state: vCPU 1 powered off (STOPPED) stays so; brought up (RUNNABLE) is saved so."""
    from kvmfw_armv8.testing import host_gic

    m1, dev1 = build(cpus=2, options={"gic": host_gic()})
    cpus, vm = save_all(m1)
    assert [c["mp_state"] for c in cpus] == [0, 5]
    m2, _ = build(cpus=2, options={"gic": host_gic()})
    restore_all(m2, cpus, vm)
    assert [c["mp_state"] for c in save_all(m2)[0]] == [0, 5]


def test_checkpoint_of_a_running_guest_restores_twice_and_takes_both_irqs(
        build: Any, tmp_path: Any) -> None:
    """Through the core's ``Machine.checkpoint``/``Machine.restore``: the guest with an SPI
    pending and the timer armed is checkpointed at its pause, restored twice into new
    machines (RAM mapped from the checkpoint, vGIC and every register group loaded), and
    each continues and takes both interrupts."""
    needs_gicv3()
    from kvmfw_armv8 import guests, plugin
    from kvmfw_armv8.testing import TestDevice

    from kvmfw.device import Range
    from kvmfw.machine import Machine

    m1, dev1 = build()
    line1 = m1.irq(guests.TEST_SPI)
    dev1.on_ready = line1.raise_
    start_at(m1, "ckpt")
    assert run(m1, dev1).reason == "test guest paused"
    path = m1.checkpoint(tmp_path / "cpt")
    saved_vm = m1.hooks.call("save_vm_state", machine=m1)

    devs: list[Any] = []
    for _ in range(2):

        def setup(m: Any) -> None:
            dev = TestDevice(m)
            m.map_device(Range("mmio", guests.TESTDEV_BASE, 0x1000, "testdev"), dev)
            line = m.irq(guests.TEST_SPI)
            dev.on_irq = lambda intid, line=line: (
                line.lower() if intid == 32 + guests.TEST_SPI else None)
            devs.append(dev)

        m2 = Machine.restore(path, arch_plugin=plugin, setup=setup)
        try:
            assert m2.hooks.call("save_vm_state", machine=m2) == saved_vm
            res = run(m2, devs[-1], timeout=120)
            assert res.reason == "test guest done"
            assert sorted(devs[-1].irqs) == [27, 32 + guests.TEST_SPI]
        finally:
            m2.close()


def test_sve_registers_round_trip(build: Any) -> None:
    """With SVE (where the host offers it): the Z/P/FFR slices and the vector lengths are
    in the state and come back equal; the vector lengths are compared, never written."""
    from kvmfw_armv8 import abi, regs
    from kvmfw_armv8.testing import host_gic

    from kvmfw.hookspecs import SyncLevel
    from kvmfw.kvm import Kvm

    kvm = Kvm()
    try:
        if kvm.check_extension(abi.KVM_CAP_ARM_SVE) <= 0:
            pytest.skip("this arm64 host's KVM offers no SVE (KVM_CAP_ARM_SVE)")
    finally:
        kvm.close()
    opts = {"arm_features": "sve", "gic": host_gic()}
    m1, dev1 = build(options=opts)
    ctx = start_at(m1, "compute")
    sve = [r for r in ctx.sysregs if regs.decode(r).kind == "sve"]
    z = [r for r in sve if regs.name_of(r).startswith("Z")]
    assert z and regs.KVM_REG_ARM64_SVE_VLS in sve
    rng = random.Random(3)
    for r in z:
        ctx.sysregs[r] = rng.getrandbits(128)
    run(m1, dev1)
    cpus, vm = save_all(m1)
    m2, _ = build(options=opts)
    restore_all(m2, cpus, vm)
    counters = {f"{r:#x}" for r in COUNTERS}
    again = m2.hooks.call("save_arch_state", cpu=m2.cpus[0])["regs"]
    assert {k: v for k, v in again.items() if k not in counters} == {
        k: v for k, v in cpus[0]["regs"].items() if k not in counters}
    out = m2.cpus[0].get_context(SyncLevel.FULL)
    assert all(out.sysregs[r] == ctx.sysregs[r] for r in z)


def test_a_new_context_holds_the_initial_system_registers(build: Any) -> None:
    """The core treats a new thread context as pulled in full; before the fix it was empty
    until the first run (system registers, SVE slices missing from get_context)."""
    from kvmfw_armv8 import plugin, regs
    from kvmfw_armv8.testing import host_gic

    from kvmfw.hookspecs import SyncLevel

    m, _ = build(options={"gic": host_gic()})
    cpu = m.cpus[0]
    ctx = cpu.get_context(SyncLevel.FULL)
    assert set(ctx.sysregs) == set(plugin.cpu_state(cpu).other_ids)
    sctlr = regs.id_of("SCTLR_EL1")
    assert ctx.sysregs[sctlr] == cpu.vcpu.get_one_reg(sctlr) != 0


def test_snapshot_reset_to_repeats_the_interrupts(build: Any) -> None:
    """In-process ``snapshot``/``reset_to`` on a VM that has run (KVM then accepts ID and
    firmware registers only unchanged): from the pause the guest takes both interrupts,
    three times over."""
    needs_gicv3()
    from kvmfw_armv8 import guests

    m, dev = build()
    line = m.irq(guests.TEST_SPI)
    dev.on_ready = line.raise_
    start_at(m, "ckpt")
    assert run(m, dev).reason == "test guest paused"
    snap = m.snapshot()
    dev.on_irq = lambda intid: line.lower() if intid == 32 + guests.TEST_SPI else None
    for n in range(3):
        if n:
            m.reset_to(snap)
            assert line.level == 1  # the vGIC restore put the input back high
        dev.irqs.clear()
        res = run(m, dev, timeout=120)
        assert res.reason == "test guest done", f"iteration {n}"
        assert sorted(dev.irqs) == [27, 32 + guests.TEST_SPI], f"iteration {n}"
