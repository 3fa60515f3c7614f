"""x86 checkpoint state hooks: VM state (in-kernel PICs, IO-APIC, PIT, KVM clock) with
pending interrupts, the userspace irqchip's pending interrupts, the CPU model check, and
refusals that leave the machine as it was."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import GUESTS, requires_kvm
from kvmfw.errors import StateError

from kvmfw_x86 import loaders
from kvmfw_x86.state import IRQCHIP_SIZE, PIC_SIZE, STATE_VERSION

pytestmark = [requires_kvm, pytest.mark.kvm]

PIC_IRR = 1
IOAPIC_IRR = 8 + 4 + 4


def hook(m: Any) -> Any:
    return m.hooks.pm.hook


def test_vm_state_round_trip_with_pending_pic_and_ioapic_interrupt(machine_factory) -> None:
    a, _ = machine_factory(irqchip="kernel")
    a.irq(3).raise_()  # held high: latched in the master PIC's and the IO-APIC's IRR
    saved = hook(a).save_vm_state(machine=a)
    saved = json.loads(json.dumps(saved))  # plain data
    pic = bytes.fromhex(saved["pic_master"])
    ioapic = bytes.fromhex(saved["ioapic"])
    assert len(pic) == PIC_SIZE and pic[PIC_IRR] & 1 << 3
    assert int.from_bytes(ioapic[IOAPIC_IRR:IOAPIC_IRR + 4], "little") & 1 << 3
    b, _ = machine_factory(irqchip="kernel")
    fresh = hook(b).save_vm_state(machine=b)
    assert bytes.fromhex(fresh["pic_master"])[PIC_IRR] & 1 << 3 == 0
    assert hook(b).restore_vm_state(machine=b, state=saved) is True
    back = hook(b).save_vm_state(machine=b)
    for chip in ("pic_master", "pic_slave", "ioapic"):
        assert back[chip] == saved[chip], chip
    pit_a, pit_b = bytes.fromhex(saved["pit"]), bytes.fromhex(back["pit"])
    for ch in range(3):  # all but the host-time load stamp
        assert pit_a[24 * ch:24 * ch + 16] == pit_b[24 * ch:24 * ch + 16]
    assert 0 <= back["clock"] - saved["clock"] < 10 * 10**9  # continues from the saved clock


def test_pending_pic_interrupt_is_delivered_after_restore(machine_factory) -> None:
    """A tick latched in the 8259 of one machine reaches the guest of another."""
    a, rep_a = machine_factory(irqchip="kernel")
    loaders.load(a, str(GUESTS / "pit.bin"), {"load_addr": 0x7C00})
    a.run(timeout=60)  # programs the 8259 (base 8) and PIT, takes two ticks, masks IRQ0
    assert rep_a.values == [0x08, 0x08, 2]
    saved = hook(a).save_vm_state(machine=a)
    pic = bytearray.fromhex(saved["pic_master"])
    assert pic[2] == 0xFF  # the guest masked every input
    b, rep_b = machine_factory(irqchip="kernel")
    loaders.load(b, str(GUESTS / "irq.bin"), {"load_addr": 0x7C00})
    pic[2] = 0xFE  # IRQ0 unmasked again
    pic[PIC_IRR] |= 1  # and a tick pending
    saved["pic_master"] = pic.hex()
    assert hook(b).restore_vm_state(machine=b, state=saved) is True
    b.irq(0).pulse()  # the second interrupt irq.bin waits for
    b.run(timeout=60)
    assert rep_b.values[:2] == [0x08, 0x08]


def test_vm_state_refusals_change_nothing(machine_factory) -> None:
    m, _ = machine_factory(irqchip="kernel")
    m.irq(5).raise_()
    good = hook(m).save_vm_state(machine=m)
    before = {k: v for k, v in good.items() if k not in ("clock", "pit")}

    def refused(change: dict[str, Any], words: str) -> None:
        bad = {**good, **change}
        with pytest.raises(StateError, match=words):
            hook(m).restore_vm_state(machine=m, state=bad)
        now = hook(m).save_vm_state(machine=m)
        assert {k: v for k, v in now.items() if k not in ("clock", "pit")} == before

    ioapic = bytearray.fromhex(good["ioapic"])
    ioapic[0:8] = (0x1000).to_bytes(8, "little")
    refused({"ioapic": ioapic.hex()}, "ioapic: base address")
    refused({"irqchip": "userspace"}, "irqchip")
    refused({"pic_slave": good["pic_slave"][:-2]}, "pic_slave")
    refused({"pit": "zz" * 112}, "pit")
    refused({"clock": -1}, "clock")
    refused({"version": STATE_VERSION + 1}, "version")
    pit = bytearray.fromhex(good["pit"])
    pit[0:4] = (0x20000).to_bytes(4, "little")
    refused({"pit": pit.hex()}, "channel 0 count")
    with pytest.raises(StateError):
        hook(m).restore_vm_state(machine=m, state=["not", "a", "mapping"])
    assert IRQCHIP_SIZE == 520


def test_userspace_irqchip_pending_interrupts_round_trip(machine_factory) -> None:
    a, _ = machine_factory(irqchip="userspace")
    st_a = a.hooks.pm.get_plugin("arch:x86").state(a)
    st_a.interrupts.post(0, 0x31)
    st_a.interrupts.post(0, 0x22)
    st_a.interrupts.nmi(0)
    st_a.lapics.regs[0][0x80] = 0x40  # TPR
    saved = json.loads(json.dumps(hook(a).save_arch_state(cpu=a.cpus[0])))
    assert saved["userspace"]["pending"] == [0x31, 0x22] and saved["userspace"]["nmis"] == 1
    assert "lapic" not in saved
    b, _ = machine_factory(irqchip="userspace")
    st_b = b.hooks.pm.get_plugin("arch:x86").state(b)
    assert hook(b).restore_arch_state(cpu=b.cpus[0], state=saved) is True
    assert list(st_b.interrupts.pending[0]) == [0x31, 0x22]
    assert st_b.interrupts.nmis[0] == 1
    assert st_b.lapics.regs[0][0x80] == 0x40
    assert b.cpus[0].interrupt_pending
    k, _ = machine_factory(irqchip="kernel")
    with pytest.raises(StateError, match="userspace irqchip"):
        hook(k).restore_arch_state(cpu=k.cpus[0], state=saved)
    for bad in ({"pending": [0x31, 0x31]}, {"pending": [0x100]}, {"nmis": 9},
                {"lapic": {"4096": 1}}, {"pending": list(range(300))}):
        wrong = json.loads(json.dumps(saved))
        wrong["userspace"].update(bad)
        with pytest.raises(StateError):
            hook(b).restore_arch_state(cpu=b.cpus[0], state=wrong)


def test_kvm_refusal_puts_the_vcpu_back(machine_factory) -> None:
    """KVM refuses the MP state (AP_RESET_HOLD needs SEV-ES) after the registers went in:
    the registers it already took are written back (no half-restored vCPU runs)."""
    m, _ = machine_factory(irqchip="kernel")
    loaders.load(m, str(GUESTS / "long64.elf"), {})
    cpu = m.cpus[0]
    state = hook(m).save_arch_state(cpu=cpu)
    before = cpu.get_context().rip
    state["regs"]["rip"] = 0x12345
    state["regs"]["rbx"] = 0x777
    state["mp_state"] = 8
    with pytest.raises(StateError, match="KVM refused"):
        hook(m).restore_arch_state(cpu=cpu, state=state)
    ctx = cpu.get_context()
    ctx.invalidate()
    ctx._discard()
    assert ctx.rip == before and ctx.rbx != 0x777


def test_cpu_model_check(machine_factory) -> None:
    m, _ = machine_factory(irqchip="kernel")
    model = json.loads(json.dumps(hook(m).cpu_model(machine=m)))
    assert hook(m).check_cpu_model(machine=m, model=model) is None
    leaf7 = next(e for e in model["cpuid"] if e[0] == 7 and e[1] == 0)
    missing = next(b for b in range(32) if not leaf7[4] >> b & 1)  # a bit KVM lacks
    leaf7[4] |= 1 << missing
    reason = hook(m).check_cpu_model(machine=m, model=model)
    assert reason is not None and "0x7.0 ebx" in reason and "\n" not in reason
    assert hook(m).check_cpu_model(machine=m, model={"cpuid": [[1, 2]]}) is not None
    assert hook(m).check_cpu_model(machine=m, model={}) is not None
    big = {"cpuid": [[0x80000000, 0, 0, 0, 0, 0, 0]] * 1000}
    assert "at most" in hook(m).check_cpu_model(machine=m, model=big)


def test_restoring_the_same_state_again_and_again_changes_nothing(machine_factory) -> None:
    """``reset_to`` restores vCPU and VM state in a loop: the state read back after 200
    restores is the state saved. (How fast: ``benchmarks/snapshot.py``; tests time nothing.)"""
    m, _ = machine_factory(irqchip="kernel")
    loaders.load(m, str(GUESTS / "long64.elf"), {})
    cpu = m.cpus[0]
    vcpu_state = hook(m).save_arch_state(cpu=cpu)
    vm_state = hook(m).save_vm_state(machine=m)
    for _ in range(200):
        hook(m).restore_vm_state(machine=m, state=vm_state)
        hook(m).restore_arch_state(cpu=cpu, state=vcpu_state)
    again = hook(m).save_arch_state(cpu=cpu)
    assert again["regs"] == vcpu_state["regs"] and again["sregs"] == vcpu_state["sregs"]
    assert hook(m).save_vm_state(machine=m)["irqchip"] == vm_state["irqchip"]


def test_every_listed_msr_is_checkpointed(machine_factory) -> None:
    """Every MSR in ``KVM_GET_MSR_INDEX_LIST`` that reads back is in the vCPU state (on this
    kvm_pvm: all 40 listed, the TSC, TSC_DEADLINE and the KVM paravirt MSRs among them, and
    each also takes its value back), with its value restored; so are the MTRRs KVM
    emulates but does not list (the CPUID offers MTRRs: the default type, the fixed ranges,
    the variable pairs), as QEMU saves them."""
    from kvmfw_x86.context import MSR_MTRR_DEF_TYPE, MTRR_FIXED
    from kvmfw_x86.plugin import msr_index_list, mtrr_msrs

    m, _ = machine_factory(irqchip="kernel")
    cpu = m.cpus[0]
    listed = msr_index_list(m.kvm.fd)
    mtrrs = mtrr_msrs(m.hooks.pm.get_plugin("arch:x86").state(m).cpuid, cpu.vcpu)
    assert MSR_MTRR_DEF_TYPE in mtrrs and set(MTRR_FIXED) <= set(mtrrs)
    saved = hook(m).save_arch_state(cpu=cpu)
    saved_idx = {int(k, 16) for k in saved["msrs"]}
    assert saved_idx == set(cpu.context.info.msr_indices)
    assert saved_idx <= set(listed) | set(mtrrs) and set(mtrrs) <= saved_idx
    for must in (0x10, 0x6E0, 0xC0000102):  # TSC, TSC_DEADLINE, KERNEL_GS_BASE
        if must in listed:
            assert must in saved_idx, hex(must)
    pv = {i for i in listed if 0x4B564D00 <= i <= 0x4B564DFF}  # MSR_KVM_* (kvmclock, ...)
    assert pv <= saved_idx
    saved["msrs"][f"{0xC0000102:#x}"] = 0x0000123456789000
    saved["msrs"][f"{MSR_MTRR_DEF_TYPE:#x}"] = 0xC06  # E | FE | WB
    b, _ = machine_factory(irqchip="kernel")
    hook(b).restore_arch_state(cpu=b.cpus[0], state=saved)
    assert b.cpus[0].get_context().get_msr(0xC0000102) == 0x0000123456789000
    assert b.cpus[0].get_context().get_msr(MSR_MTRR_DEF_TYPE) == 0xC06


SHADOW_MOV_SS, SHADOW_STI = 1, 2
"""``KVM_X86_SHADOW_INT_*``: the interrupt shadow after a MOV SS or an STI."""


def test_pending_nmi_and_exception_survive_restore(machine_factory) -> None:
    """Events go in after the registers and the APIC (``KVM_SET_REGS`` drops a pending
    exception): what the state says is pending is pending after the restore.

    The interrupt shadow reads back as "a shadow", not always as the same bits: AMD's
    VMCB has one shadow bit, which KVM on SVM reports as ``STI | MOV_SS`` (3) whatever
    was set; on VMX (and kvm_pvm) the bit set comes back. Either is the guest's state
    (one instruction without interrupts), and 3 restores as a shadow on either."""
    a, _ = machine_factory(irqchip="kernel")
    loaders.load(a, str(GUESTS / "long64.elf"), {})
    saved = hook(a).save_arch_state(cpu=a.cpus[0])
    saved["events"]["nmi"]["pending"] = 1
    saved["events"]["interrupt"]["shadow"] = SHADOW_MOV_SS
    gp = {"injected": 1, "nr": 13, "has_error_code": 1, "error_code": 0x18}
    saved["events"]["exception"].update(gp)
    b, _ = machine_factory(irqchip="kernel")
    hook(b).restore_arch_state(cpu=b.cpus[0], state=saved)
    ctx = b.cpus[0].get_context()
    ctx._discard()
    ev = ctx.events
    assert ev["nmi"]["pending"] == 1
    assert ev["interrupt"]["shadow"] in (SHADOW_MOV_SS, SHADOW_MOV_SS | SHADOW_STI)
    assert {k: ev["exception"][k] for k in gp} == gp
    again = hook(b).save_arch_state(cpu=b.cpus[0])  # and what b holds restores as itself
    c, _ = machine_factory(irqchip="kernel")
    hook(c).restore_arch_state(cpu=c.cpus[0], state=again)
    ctx = c.cpus[0].get_context()
    ctx._discard()
    assert ctx.events == ev


def test_tsc_rate_of_another_host_is_scaled_or_warned(machine_factory, caplog) -> None:
    m, _ = machine_factory(irqchip="kernel")
    cpu = m.cpus[0]
    saved = hook(m).save_arch_state(cpu=cpu)
    here = saved["tsc_khz"]
    assert here > 0
    saved["tsc_khz"] = here // 2
    caplog.set_level("WARNING", logger="kvmfw.x86")
    assert hook(m).restore_arch_state(cpu=cpu, state=saved) is True
    from kvmfw_x86.abi import X

    now = cpu.vcpu.ioctl(X.KVM_GET_TSC_KHZ)
    if "TSC ran at" in caplog.text:  # no TSC scaling (kvm_pvm): this host's rate, warned
        assert f"TSC ran at {here // 2} kHz" in caplog.text
        assert now == here, "the refused rate was left as the vCPU's"
    else:
        assert now == here // 2
    saved["tsc_khz"] = here + here // 10000  # within 250 ppm: left alone, no warning
    caplog.clear()
    hook(m).restore_arch_state(cpu=cpu, state=saved)
    assert "TSC ran at" not in caplog.text


def test_restore_clears_a_slave_pic_request_without_a_spurious_irq2(machine_factory) -> None:
    """A request pending in the slave 8259 when an older state is restored (``reset_to``)
    must not leave IRQ2 latched in the restored master: the slave goes in first."""
    m, _ = machine_factory(irqchip="kernel")
    clean = hook(m).save_vm_state(machine=m)
    m.irq(9).pulse()  # slave input 1
    assert bytes.fromhex(hook(m).save_vm_state(machine=m)["pic_slave"])[PIC_IRR] & 1 << 1
    hook(m).restore_vm_state(machine=m, state=clean)
    now = hook(m).save_vm_state(machine=m)
    assert now["pic_master"] == clean["pic_master"]
    assert now["pic_slave"] == clean["pic_slave"]


def _newer_host(real: Any) -> Any:
    """This host's KVM_GET_SUPPORTED_CPUID as another host's KVM would give it: another
    model number, and a leaf-1 ECX feature bit this host lacks."""
    def supported(fd: int) -> Any:
        entries = real(fd)
        for e in entries:
            if e.function == 1:
                e.eax ^= 0x10  # model + 1 (or - 1)
                e.ecx |= 1 << next(b for b in range(1, 31) if not e.ecx >> b & 1 and b != 27)
        return entries
    return supported


def test_a_restored_guest_sees_the_checkpointed_cpuid_not_this_hosts(
        machine_factory, tmp_path, monkeypatch) -> None:
    """Restored where KVM offers another CPU (a later model, one more feature), the guest
    still sees the CPU it was checkpointed on: the checkpoint's CPUID table is given to the
    vCPUs, checked first, not this host's (it was: the guest saw the host change under it)."""
    from conftest import Reporter
    from kvmfw.device import Range
    from kvmfw.machine import Machine

    from kvmfw_x86 import cpuid as cpuid_mod
    from kvmfw_x86.plugin import X86Plugin

    a, rep_a = machine_factory(irqchip="kernel")
    loaders.load(a, str(GUESTS / "cpuid64.elf"), {})
    cpt = a.checkpoint(tmp_path / "cpt")
    a.run(timeout=30)
    here = list(rep_a.values)
    assert len(here) == 7 + 12  # (vendor, leaf 1, leaf 7, the brand string)

    monkeypatch.setattr(cpuid_mod, "supported_cpuid", _newer_host(cpuid_mod.supported_cpuid))
    b, rep_b = machine_factory(irqchip="kernel")  # a new machine there: the new CPU
    loaders.load(b, str(GUESTS / "cpuid64.elf"), {})
    b.run(timeout=30)
    assert rep_b.values[3] != here[3]  # (KVM may mask the added bit itself)

    rep = Reporter()

    def setup(m: Machine) -> None:
        rep.machine = m
        m.map_device(Range("pio", 0xE0, 8, "reporter"), rep)

    r = Machine.restore(cpt, arch_plugin=X86Plugin(), setup=setup)
    try:
        r.run(timeout=30)
    finally:
        r.close()
    assert rep.values == here


def test_a_checkpointed_cpu_this_host_cannot_give_is_refused_before_any_vcpu_runs(
        machine_factory, tmp_path) -> None:
    """The checkpoint's CPU model has a feature this host's KVM lacks: restore is refused
    with one line naming the leaf, and builds nothing."""
    from kvmfw.errors import CheckpointError
    from kvmfw.machine import Machine

    from kvmfw_x86.plugin import X86Plugin

    a, _ = machine_factory(irqchip="kernel")
    loaders.load(a, str(GUESTS / "cpuid64.elf"), {})
    cpt = a.checkpoint(tmp_path / "cpt")
    mf = cpt / "manifest.json"
    manifest = json.loads(mf.read_text())
    leaf7 = next(e for e in manifest["cpu_model"]["cpuid"] if e[0] == 7 and e[1] == 0)
    leaf7[4] |= 1 << next(b for b in range(32) if not leaf7[4] >> b & 1)
    mf.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"0x7\.0 ebx") as exc:
        Machine.restore(cpt, arch_plugin=X86Plugin())
    assert "\n" not in str(exc.value)
