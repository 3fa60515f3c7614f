"""The CPU topology a guest reads from CPUID: one package of N cores, one thread each, the
last-level cache shared (issue 13: a one-CPU host's cache leaves made each vCPU a core 0
with a last-level cache of its own)."""

from __future__ import annotations

from conftest import requires_kvm

from kvmfw_x86.abi import X
from kvmfw_x86.cpuid import CpuidEntry, find, for_vcpu, read_cpuid_table


def cache(leaf: int, sub: int, level: int, sharing: int = 0, cores: int = 0) -> CpuidEntry:
    """A deterministic-cache-parameters subleaf: type data/unified, ``level``, ``sharing``
    (logical processors sharing it - 1), ``cores`` (Intel's EAX[31:26])."""
    return CpuidEntry(leaf, sub, 1, cores << 26 | sharing << 14 | level << 5 | 1, 0x3F, 63, 0)


# AMD as a one-CPU nested host reports it: caches private, 0x8000001E zeroed, NC 0
AMD = [CpuidEntry(1, 0, 0, 0x830F10, 0, 0, 0), CpuidEntry(0x80000001, 0, 0, 0, 0, 1 << 22, 0),
       CpuidEntry(0x80000008, 0, 0, 0x3030, 0, 0x7 << 16, 0),
       *(cache(0x8000001D, i, lvl) for i, lvl in enumerate((1, 1, 2, 3))),
       CpuidEntry(0x8000001D, 4, 1, 0, 0, 0, 0), CpuidEntry(0x8000001E, 0, 0, 0, 0, 0, 0)]
INTEL = [CpuidEntry(1, 0, 0, 0x906EA, 0, 0, 0),
         *(cache(4, i, lvl, cores=0) for i, lvl in enumerate((1, 1, 2, 3))),
         CpuidEntry(4, 4, 1, 0, 0, 0, 0),
         CpuidEntry(0xB, 0, 1, 1, 2, 1 << 8, 0), CpuidEntry(0xB, 1, 1, 4, 16, 2 << 8 | 1, 0),
         CpuidEntry(0xB, 2, 1, 0, 0, 2, 0)]


def sharing(entries: list[CpuidEntry], leaf: int) -> list[int]:
    return [(e.eax >> 14) & 0xFFF for e in entries if e.function == leaf and e.eax & 0x1F]


def test_amd_vcpus_are_cores_of_one_package_sharing_the_l3() -> None:
    for apic in range(3):
        t = for_vcpu(AMD, apic, 3)
        topo = find(t, 0x8000001E)
        assert topo is not None
        assert topo.eax == apic and topo.ebx == apic  # core id = APIC id, 1 thread per core
        assert topo.ecx == 0  # node 0, one node
        size = find(t, 0x80000008)
        assert size is not None
        assert size.ecx & 0xFF == 2 and (size.ecx >> 12) & 0xF == 2  # NC, APIC-id bits
        assert size.ecx >> 16 == 0x7  # (other fields kept)
        assert sharing(t, 0x8000001D) == [0, 0, 0, 2]  # L1d, L1i, L2 per core; L3 shared
        ext = find(t, 0x80000001)
        assert ext is not None and ext.ecx & 0b10 and ext.ecx & (1 << 22)  # CmpLegacy
    assert find(AMD, 0x8000001E).ebx == 0  # type: ignore[union-attr]  (input unchanged)


def test_one_vcpu_is_one_core() -> None:
    t = for_vcpu(AMD, 0, 1)
    assert sharing(t, 0x8000001D) == [0, 0, 0, 0]
    assert find(t, 0x80000008).ecx & 0xF0FF == 0  # type: ignore[union-attr]
    assert not find(t, 0x80000001).ecx & 0b10  # type: ignore[union-attr]


def test_intel_levels_and_cache_sharing() -> None:
    t = for_vcpu(INTEL, 5, 6)
    smt, core, end = (find(t, 0xB, i) for i in range(3))
    assert smt is not None and core is not None and end is not None
    assert (smt.eax, smt.ebx, smt.ecx & 0xFF00, smt.edx) == (0, 1, 1 << 8, 5)
    assert (core.eax, core.ebx, core.ecx, core.edx) == (3, 6, 2 << 8 | 1, 5)
    assert (end.ecx >> 8) & 0xFF == 0  # no further level
    assert sharing(t, 4) == [0, 0, 0, 5]
    assert {e.eax >> 26 for e in t if e.function == 4 and e.eax & 0x1F} == {7}  # 8 core ids


@requires_kvm
def test_kvm_takes_each_vcpus_topology(machine_factory) -> None:
    """What KVM holds for each vCPU (KVM_GET_CPUID2) carries its core id and a shared
    last-level cache, on whatever host this runs."""
    m, _ = machine_factory(cpus=2)
    for cpu in m.cpus:
        t = read_cpuid_table(cpu.vcpu.fd, X.KVM_GET_CPUID2, "KVM_GET_CPUID2", first=256,
                             most=4096)
        leaf1 = find(t, 1)
        assert leaf1 is not None and leaf1.ebx >> 24 == cpu.id
        topo = find(t, 0x8000001E)
        if topo is not None:
            assert topo.ebx & 0xFF == cpu.id
        for leaf in (4, 0x8000001D):
            shared = sharing(t, leaf)
            if shared:
                assert shared[-1] == 1 and set(shared[:-1]) <= {0}


def test_empty_legacy_l1_leaf_is_filled_from_0x8000001d() -> None:
    """A nested AMD host's KVM: no TOPOEXT and 0x80000005 zero, so Linux (which then reads
    the legacy leaves and stops at the first empty one) found no cache at all; the L1 data
    and instruction caches of 0x8000001D go into 0x80000005 ECX/EDX."""
    l1d = CpuidEntry(0x8000001D, 0, 1, 0x121, 0x01C0003F, 0x3F, 0)  # 8 ways x 64 B x 64 sets
    l1i = CpuidEntry(0x8000001D, 1, 1, 0x122, 0x00C0003F, 0xFF, 0)  # 4 ways x 64 B x 256
    l2 = CpuidEntry(0x8000001D, 2, 1, 0x143, 0x01C0003F, 0x3FF, 0)
    host = [CpuidEntry(1, 0, 0, 0x800F12, 0, 0, 0), CpuidEntry(0x80000001, 0, 0, 0, 0, 0x75, 0),
            CpuidEntry(0x80000005, 0, 0, 0, 0, 0, 0), l1d, l1i, l2,
            CpuidEntry(0x8000001D, 3, 1, 0, 0, 0, 0)]
    t = for_vcpu(host, 1, 2)
    legacy = find(t, 0x80000005)
    assert legacy is not None
    assert legacy.ecx == 32 << 24 | 8 << 16 | 1 << 8 | 64  # L1d: 32 KiB, 8-way, 64 B lines
    assert legacy.edx == 64 << 24 | 4 << 16 | 1 << 8 | 64  # L1i: 64 KiB, 4-way
    assert find(host, 0x80000005).ecx == 0  # type: ignore[union-attr]  (input unchanged)
    real = [CpuidEntry(0x80000005, 0, 0, 0, 0, 0x20080140, 0x40040140), l1d, l1i]
    kept = find(for_vcpu(real, 0, 1), 0x80000005)
    assert kept is not None and (kept.ecx, kept.edx) == (0x20080140, 0x40040140)
    assert find(for_vcpu(INTEL, 0, 2), 0x80000005) is None  # (nothing to fill on Intel)
