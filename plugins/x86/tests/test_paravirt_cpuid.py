"""The hypervisor bit, KVM's PV leaf and the Hyper-V option (issue 13)."""

from __future__ import annotations

import struct

import pytest
from conftest import requires_kvm
from kvmfw.errors import ConfigError

from kvmfw_x86 import cpuid as cpuid_mod
from kvmfw_x86 import hyperv
from kvmfw_x86.cpuid import FEATURES, CpuidEntry, CpuidModel, find
from kvmfw_x86.plugin import X86Plugin

NESTED_LEAF1 = CpuidEntry(1, 0, 0, 0xA10F11, 0, 0x00202000, 0x78BFBFF)
"""Leaf 1 as a nested real KVM reports it: the hypervisor bit (ECX 31) and the
TSC-deadline timer (ECX 24, emulated but not listed) clear, x2APIC (21) set."""
KVM_SIG = CpuidEntry(0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D)
KVM_FEATS = CpuidEntry(0x40000001, 0, 0, 0x0100FEFB, 0, 0, 0)


def bit(name: str) -> int:
    return 1 << FEATURES[name][3]


@requires_kvm
@pytest.mark.parametrize("irqchip", ["kernel", "userspace"])
def test_machine_cpuid_sets_the_hypervisor_bit(machine_factory, monkeypatch,
                                              irqchip: str) -> None:
    """Where KVM_GET_SUPPORTED_CPUID leaves CPUID.1:ECX[31] clear (a nested KVM), the
    guest still sees it, so Linux looks at KVM's leaves and uses kvmclock, PV EOI...;
    the userspace irqchip drops what only the in-kernel local APIC serves."""
    monkeypatch.setattr(cpuid_mod, "supported_cpuid",
                        lambda fd: [NESTED_LEAF1, KVM_SIG, KVM_FEATS])
    m, _ = machine_factory(irqchip=irqchip)
    st = X86Plugin.state(m.hooks.pm.get_plugin("arch:x86"), m)
    leaf1 = find(st.cpuid, 1)
    assert leaf1 is not None and leaf1.ecx >> 31 & 1
    assert NESTED_LEAF1.ecx >> 31 == 0  # the input is not changed
    # QEMU's additions: the TSC-deadline timer with the in-kernel LAPIC (KVM emulates it),
    # no x2APIC with kvmfw's MMIO-only userspace LAPIC
    from kvmfw.abi import Cap

    deadline = bool(m.kvm.check_extension(Cap.TSC_DEADLINE_TIMER)) and irqchip == "kernel"
    assert bool(leaf1.ecx >> 24 & 1) is deadline
    assert bool(leaf1.ecx >> 21 & 1) is (irqchip == "kernel")
    feats = find(st.cpuid, 0x40000001)
    assert feats is not None
    for name in ("kvmclock2", "kvm_pv_tlb_flush", "kvm_steal_time", "kvmclock_stable_bit"):
        assert feats.eax & bit(name), name
    assert not feats.eax & bit("kvm_msi_ext_dest_id")
    lapic_only = bit("kvm_pv_eoi") | bit("kvm_pv_unhalt") | bit("kvm_pv_ipi")
    assert feats.eax & lapic_only == (lapic_only if irqchip == "kernel" else 0)


def test_hypervisor_bit_and_pv_features_can_be_masked() -> None:
    t = cpuid_mod.paravirt([NESTED_LEAF1, KVM_SIG, KVM_FEATS])
    out = CpuidModel(mask=["hypervisor", "kvmclock2"]).apply(t)
    leaf1, feats = find(out, 1), find(out, 0x40000001)
    assert leaf1 is not None and not leaf1.ecx >> 31 & 1
    assert feats is not None and not feats.eax & bit("kvmclock2")


HV = [CpuidEntry(0x40000000, 0, 0, 0x4000000A, 0x756E694C, 0x564B2078, 0x7648204D),
      CpuidEntry(0x40000001, 0, 0, 0x31237648, 0, 0, 0),
      CpuidEntry(0x40000003, 0, 0, 0x3FFF, 0x0030, 0, 0xFFFFFFFF),
      CpuidEntry(0x40000004, 0, 0, 0xFFFF, 0xFFFFFFFF, 0, 0),
      CpuidEntry(0x40000005, 0, 0, 1024, 0, 0, 0)]


def test_hyperv_leaves_and_kvm_leaves_moved() -> None:
    base = cpuid_mod.paravirt([NESTED_LEAF1, KVM_SIG, KVM_FEATS])
    out = hyperv.apply(base, HV, ["relaxed", "spinlocks"])
    sig = find(out, 0x40000000)
    assert sig is not None and sig.eax == 0x40000006
    assert struct.pack("<III", sig.ebx, sig.ecx, sig.edx) == b"Microsoft Hv"
    feats = find(out, 0x40000003)
    enl = find(out, 0x40000004)
    assert feats is not None and feats.eax == hyperv.HYPERCALL_MSRS and feats.edx == 0
    assert enl is not None and enl.eax == 1 << 5 and enl.ebx == hyperv.SPINLOCK_RETRIES
    kvm = find(out, 0x40000100)
    assert kvm is not None and kvm.regs()[1:] == KVM_SIG.regs()[1:] and kvm.eax == 0x40000101
    moved = find(out, 0x40000101)
    assert moved is not None and moved.eax == find(base, 0x40000001).eax  # type: ignore[union-attr]
    assert hyperv.apply(base, HV, []) == base


def test_hyperv_names_dependencies_and_errors() -> None:
    assert hyperv.expand(["hv-stimer"]) == ["time", "vpindex", "synic", "stimer"]
    assert hyperv.expand(["all"]) == list(hyperv.FLAGS)
    with pytest.raises(ConfigError, match="unknown Hyper-V enlightenment 'nope'"):
        hyperv.expand(["nope"])
    with pytest.raises(ConfigError, match="does not support the Hyper-V enlightenment"):
        hyperv.apply([], [e for e in HV if e.function != 0x40000004], ["relaxed"])
    # "all" is what this KVM offers: without the recommendations leaf, no relaxed/tlbflush/
    # ipi/vapic (and nothing that needs them), the rest stays
    out = hyperv.apply([], [e for e in HV if e.function != 0x40000004], ["all"])
    feats = find(out, 0x40000003)
    assert feats is not None and feats.eax & 1 << 2 and feats.eax & 1 << 9  # synic, time
    assert not feats.eax & 1 << 4  # vapic
    m_all = CpuidModel.from_options({"hyperv": "all"})
    assert m_all is not None and m_all.hyperv == ["all"]
    m = CpuidModel.from_options({"hyperv": "relaxed, vapic"})
    assert m is not None and m.hyperv == ["relaxed", "vapic"]
    with pytest.raises(ConfigError):
        CpuidModel.from_options({"hyperv": 3})


@requires_kvm
def test_hyperv_on_a_kvm_without_it_is_a_config_error(machine_factory) -> None:
    from kvmfw.kvm import Kvm

    from kvmfw_x86.hyperv import Cap

    with Kvm() as kvm:
        if kvm.check_extension(Cap.HYPERV_CPUID):
            pytest.skip("this KVM has Hyper-V (the nested env checks it runs)")
    with pytest.raises(ConfigError, match="no Hyper-V enlightenments"):
        m, _ = machine_factory(irqchip="kernel", cpuid={"hyperv": "relaxed"})
        X86Plugin.state(m.hooks.pm.get_plugin("arch:x86"), m).cpuid  # noqa: B018


def test_the_brand_string_is_kvms_else_the_hosts() -> None:
    """KVM_GET_SUPPORTED_CPUID leaves the brand leaves empty on some hosts (the guest then
    calls its CPU "17/01"): kvmfw gives the host's, read with the CPUID instruction, as
    QEMU's -cpu host does; a brand KVM gives is kept, and the cpuid option's wins."""
    empty = [CpuidEntry(leaf, 0, 0, 0, 0, 0, 0) for leaf in cpuid_mod.BRAND_LEAVES]
    host = cpuid_mod.host_brand()
    assert cpuid_mod.brand_string(cpuid_mod.paravirt([NESTED_LEAF1, *empty])) == (host or bytes(48))
    if host:  # the CPUID instruction's string is the one Linux shows as the model name
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        assert not names or host.rstrip(b"\0").strip().decode() == names[0]
    kvms = b"Some CPU KVM names".ljust(48, b"\0")
    given = [CpuidEntry(leaf, 0, 0, *struct.unpack_from("<IIII", kvms, 16 * i))
             for i, leaf in enumerate(cpuid_mod.BRAND_LEAVES)]
    assert cpuid_mod.brand_string(cpuid_mod.paravirt([NESTED_LEAF1, *given])) == kvms
    out = CpuidModel(brand="Mine").apply(cpuid_mod.paravirt([NESTED_LEAF1, *empty]))
    assert cpuid_mod.brand_string(out) == b"Mine".ljust(48, b"\0")
