"""Hyper-V enlightenments as a CPU-model option (QEMU's ``hv-*`` flags).

``cpuid = {hyperv = "relaxed,vapic,time,spinlocks"}`` (or ``"all"``: every one this KVM
offers, as QEMU's ``hv-passthrough``) in the machine
options, ``--cpuid 'hyperv=all'`` style strings as the other model fields. What KVM can
serve comes from ``KVM_GET_SUPPORTED_HV_CPUID``; kvmfw keeps only the bits of the named
enlightenments (and what they depend on) in the feature (0x40000003) and recommendation
(0x40000004) leaves, puts the Hyper-V leaves at 0x40000000-0x40000006 and moves KVM's own
leaves (``KVMKVMKVM``, kvmclock...) to 0x40000100, where Linux still finds them (it scans
every 0x100). ``synic`` (and ``stimer``, which needs it) also enables
``KVM_CAP_HYPERV_SYNIC2`` on every vCPU. A name KVM does not support is a ConfigError.

Names: relaxed (relaxed timing), vapic (APIC access MSRs), time (reference counter and
TSC page), runtime, vpindex, reset, synic, stimer, frequencies, reenlightenment, crash,
tlbflush, ipi, spinlocks (notify after 0xfff retries, as Windows recommends).
"""

from __future__ import annotations

import struct
from typing import Any

from kvmfw.abi import IOCTLS, Cap, address_of
from kvmfw.abi import ffi as core_ffi
from kvmfw.errors import ConfigError

from kvmfw_x86.abi import X
from kvmfw_x86.cpuid import CpuidEntry, find, read_cpuid_table

HV_BASE = 0x40000000
HV_FEATURES = 0x40000003
HV_ENLIGHTENMENTS = 0x40000004
HV_MAX_LEAF = 0x40000006
KVM_RELOCATED = 0x40000100
"""Where KVM's leaves go when the Hyper-V ones take 0x40000000 (as QEMU puts them)."""
HV_VENDOR = b"Microsoft Hv"
SPINLOCK_RETRIES = 0xFFF
HYPERCALL_MSRS = 1 << 5
"""0x40000003 EAX: the hypercall MSRs, which every enlightenment needs."""

# name -> {(leaf, register): bits}
FLAGS: dict[str, dict[tuple[int, str], int]] = {
    "relaxed": {(HV_ENLIGHTENMENTS, "eax"): 1 << 5},
    "vapic": {(HV_FEATURES, "eax"): 1 << 4, (HV_ENLIGHTENMENTS, "eax"): 1 << 3},
    "time": {(HV_FEATURES, "eax"): 1 << 1 | 1 << 9},
    "runtime": {(HV_FEATURES, "eax"): 1 << 0},
    "vpindex": {(HV_FEATURES, "eax"): 1 << 6},
    "reset": {(HV_FEATURES, "eax"): 1 << 7},
    "synic": {(HV_FEATURES, "eax"): 1 << 2, (HV_FEATURES, "ebx"): 1 << 4 | 1 << 5},
    "stimer": {(HV_FEATURES, "eax"): 1 << 3},
    "frequencies": {(HV_FEATURES, "eax"): 1 << 11, (HV_FEATURES, "edx"): 1 << 8},
    "reenlightenment": {(HV_FEATURES, "eax"): 1 << 13},
    "crash": {(HV_FEATURES, "edx"): 1 << 10},
    "tlbflush": {(HV_ENLIGHTENMENTS, "eax"): 1 << 1 | 1 << 2},
    "ipi": {(HV_ENLIGHTENMENTS, "eax"): 1 << 10},
    "spinlocks": {},
}
DEPENDS = {"stimer": ["synic", "time"], "synic": ["vpindex"], "ipi": ["vpindex"],
           "tlbflush": ["vpindex"]}


def expand(names: list[str]) -> list[str]:
    """The named enlightenments plus their dependencies, in :data:`FLAGS` order (``all``:
    every one; a leading ``hv-`` or ``hv_`` is accepted; unknown names raise)."""
    want: set[str] = set()
    todo = [n.lower().removeprefix("hv-").removeprefix("hv_") for n in names]
    while todo:
        n = todo.pop()
        if n == "all":
            todo += list(FLAGS)
            continue
        if n not in FLAGS:
            raise ConfigError(f"unknown Hyper-V enlightenment {n!r} (known: all, "
                              f"{', '.join(FLAGS)})")
        if n not in want:
            want.add(n)
            todo += DEPENDS.get(n, [])
    return [n for n in FLAGS if n in want]


def supported(kvm: Any, vcpu: Any = None) -> list[CpuidEntry]:
    """``KVM_GET_SUPPORTED_HV_CPUID`` (on /dev/kvm with KVM_CAP_SYS_HYPERV_CPUID, else on
    a vCPU with KVM_CAP_HYPERV_CPUID); ConfigError where KVM offers no Hyper-V."""
    if kvm.check_extension(Cap.SYS_HYPERV_CPUID):
        fd = kvm.fd
    elif vcpu is not None and kvm.check_extension(Cap.HYPERV_CPUID):
        fd = vcpu.fd
    else:
        raise ConfigError(f"this KVM ({kvm.module}) offers no Hyper-V enlightenments "
                          "(KVM_CAP_HYPERV_CPUID): run without the cpuid hyperv option")
    return read_cpuid_table(fd, X.KVM_GET_SUPPORTED_HV_CPUID, "KVM_GET_SUPPORTED_HV_CPUID",
                            first=64, most=1024)


def apply(entries: list[CpuidEntry], hv: list[CpuidEntry], names: list[str]) -> \
        list[CpuidEntry]:
    """``entries`` with the Hyper-V leaves of ``names`` (expanded) from ``hv`` (KVM's
    supported set) at 0x40000000 and the KVM leaves moved to 0x40000100."""
    named = set(expand([n for n in names if n.lower() != "all"]))
    every = any(n.lower() == "all" for n in names)
    names = expand(names)
    if not names:
        return entries

    def supported(n: str) -> bool:
        for key, bits in FLAGS[n].items():
            have = find(hv, key[0])
            if have is None or getattr(have, key[1]) & bits != bits:
                return False
        return True

    dropped: set[str] = set()
    for n in names:
        if not supported(n):
            if n in named or not every:
                raise ConfigError(f"this KVM does not support the Hyper-V enlightenment "
                                  f"{n!r}: drop it from the cpuid hyperv option")
            dropped.add(n)  # "all" means all that this KVM offers (QEMU's hv-passthrough)
    # what needs a dropped one goes too
    changed = True
    while changed:
        changed = False
        for n in names:
            if n not in dropped and any(d in dropped for d in DEPENDS.get(n, [])):
                if n in named:
                    raise ConfigError(f"Hyper-V enlightenment {n!r} needs one this KVM "
                                      f"does not support ({', '.join(DEPENDS[n])})")
                dropped.add(n)
                changed = True
    names = [n for n in names if n not in dropped]
    regs: dict[tuple[int, str], int] = {(HV_FEATURES, "eax"): HYPERCALL_MSRS}
    for n in names:
        for key, bits in FLAGS[n].items():
            regs[key] = regs.get(key, 0) | bits
    out: list[CpuidEntry] = []
    for e in entries:
        if HV_BASE <= e.function < KVM_RELOCATED:
            e = CpuidEntry(**vars(e))
            e.function += KVM_RELOCATED - HV_BASE
            if e.function == KVM_RELOCATED:
                e.eax = max(e.eax, HV_BASE) + KVM_RELOCATED - HV_BASE
        out.append(e)
    for leaf in range(HV_BASE, HV_MAX_LEAF + 1):
        src = find(hv, leaf)
        e = CpuidEntry(leaf, 0, 0, *(src.regs() if src else (0, 0, 0, 0)))
        if leaf == HV_BASE:
            # QEMU's default hv-vendor-id: Linux only takes "Microsoft Hv" for Hyper-V
            e.eax = HV_MAX_LEAF
            e.ebx, e.ecx, e.edx = struct.unpack("<III", HV_VENDOR)
        elif leaf in (HV_FEATURES, HV_ENLIGHTENMENTS):
            e.eax, e.ebx, e.ecx, e.edx = (regs.get((leaf, r), 0)
                                          for r in ("eax", "ebx", "ecx", "edx"))
            if leaf == HV_ENLIGHTENMENTS:
                e.ebx = SPINLOCK_RETRIES if "spinlocks" in names else 0xFFFFFFFF
        out.append(e)
    return out


def enable_vcpu(vcpu: Any, entries: list[CpuidEntry]) -> None:
    """Per-vCPU KVM state the enlightenments in the final table need (SynIC:
    ``KVM_CAP_HYPERV_SYNIC2``)."""
    feats = find(entries, HV_FEATURES)
    vendor = find(entries, HV_BASE)
    if feats is not None and vendor is not None and \
            struct.pack("<III", vendor.ebx, vendor.ecx, vendor.edx) == HV_VENDOR and \
            feats.eax & FLAGS["synic"][(HV_FEATURES, "eax")]:
        ec = core_ffi.new("struct kvm_enable_cap *")
        ec.cap = int(Cap.HYPERV_SYNIC2)
        vcpu.ioctl(IOCTLS.KVM_ENABLE_CAP, address_of(ec), "KVM_ENABLE_CAP HYPERV_SYNIC2")
