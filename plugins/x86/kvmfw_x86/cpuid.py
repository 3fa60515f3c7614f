"""CPUID: what KVM supports (``KVM_GET_SUPPORTED_CPUID``), optionally reshaped by a user
model (vendor, family/model/stepping, features masked off), installed with
``KVM_SET_CPUID2``. :func:`format_table` prints what the guest will see (``kvmfw cpuid``).
"""

from __future__ import annotations

import errno
import struct
from typing import Any

from kvmfw.abi import Cap, ioctl
from kvmfw.errors import ConfigError, KvmError
from kvmfw.record import Record

from kvmfw_x86.abi import X, addr, ffi, lib


class CpuidEntry(Record):
    """One ``struct kvm_cpuid_entry2``."""

    def __init__(self, function: int, index: int, flags: int, eax: int, ebx: int, ecx: int,
                 edx: int) -> None:
        self.function = function
        self.index = index
        self.flags = flags
        self.eax = eax
        self.ebx = ebx
        self.ecx = ecx
        self.edx = edx

    def regs(self) -> tuple[int, int, int, int]:
        return self.eax, self.ebx, self.ecx, self.edx


# name -> (leaf, subleaf, register, bit)
FEATURES: dict[str, tuple[int, int, str, int]] = {}


def _bits(leaf: int, sub: int, reg: str, names: str) -> None:
    """Name the bits of one CPUID register, bit 0 first ("-" = reserved or unnamed)."""
    for bit, name in enumerate(names.split()):
        if name != "-":
            FEATURES[name] = (leaf, sub, reg, bit)


_bits(1, 0, "edx", "fpu vme de pse tsc msr pae mce cx8 apic - sep mtrr pge mca cmov pat pse36 "
      "- clflush - - - mmx fxsr sse sse2 - ht")
_bits(1, 0, "ecx", "sse3 pclmulqdq - - - vmx smx - - ssse3 - - fma cx16 - - - pcid - sse4_1 "
      "sse4_2 x2apic movbe popcnt tsc_deadline aes xsave osxsave avx f16c rdrand hypervisor")
_bits(7, 0, "ebx", "fsgsbase - - bmi1 hle avx2 - smep bmi2 erms invpcid rtm - - - - avx512f "
      "avx512dq rdseed adx smap avx512ifma - clflushopt clwb - avx512pf avx512er avx512cd sha "
      "avx512bw avx512vl")
_bits(7, 0, "ecx", "- avx512vbmi umip pku ospke - avx512_vbmi2 - gfni vaes vpclmulqdq "
      "avx512_vnni avx512_bitalg - avx512_vpopcntdq - la57 - - - - - rdpid")
FEATURES.update({
    "fsrm": (7, 0, "edx", 4), "avx512_bf16": (7, 1, "eax", 5),
    "syscall": (0x80000001, 0, "edx", 11), "nx": (0x80000001, 0, "edx", 20),
    "pdpe1gb": (0x80000001, 0, "edx", 26), "rdtscp": (0x80000001, 0, "edx", 27),
    "lm": (0x80000001, 0, "edx", 29), "lahf_lm": (0x80000001, 0, "ecx", 0),
    "svm": (0x80000001, 0, "ecx", 2), "abm": (0x80000001, 0, "ecx", 5),
    "sse4a": (0x80000001, 0, "ecx", 6), "topoext": (0x80000001, 0, "ecx", 22),
    "xsaveopt": (0xD, 1, "eax", 0), "xsavec": (0xD, 1, "eax", 1), "xsaves": (0xD, 1, "eax", 3),
})
KVM_SIGNATURE_LEAF = 0x40000000
KVM_FEATURES_LEAF = 0x40000001
_bits(KVM_FEATURES_LEAF, 0, "eax", "kvmclock kvm_nopiodelay kvm_mmu kvmclock2 kvm_asyncpf "
      "kvm_steal_time kvm_pv_eoi kvm_pv_unhalt - kvm_pv_tlb_flush kvm_asyncpf_vmexit "
      "kvm_pv_ipi kvm_poll_control kvm_pv_sched_yield kvm_asyncpf_int kvm_msi_ext_dest_id "
      "kvm_hc_map_gpa_range kvm_migration_control - - - - - - kvmclock_stable_bit")
HYPERVISOR_BIT = 31
"""CPUID.1:ECX[31]: "running under a hypervisor". Guests look for hypervisor leaves (KVM's
``KVMKVMKVM`` at 0x40000000) only when it is set; ``KVM_GET_SUPPORTED_CPUID`` does not set
it on every host (a nested KVM leaves it clear), so kvmfw sets it, as QEMU does."""
NEEDS_KERNEL_LAPIC = ("kvm_pv_eoi", "kvm_pv_unhalt", "kvm_pv_ipi", "kvm_asyncpf_int")
"""KVM PV features served by the in-kernel local APIC (off with ``irqchip=userspace``)."""
NEEDS_X2APIC_API = ("kvm_msi_ext_dest_id",)
"""Needs ``KVM_CAP_X2APIC_API``, which kvmfw does not enable (QEMU sets it only then)."""


BRAND_LEAVES = (0x80000002, 0x80000003, 0x80000004)
"""The processor brand string, 16 bytes per leaf (``model name`` in /proc/cpuinfo)."""


def host_cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """EAX, EBX, ECX, EDX of the host's own CPUID instruction (not KVM's table)."""
    out = ffi.new("uint32_t[4]")
    lib.kvmfw_x86_host_cpuid(leaf, subleaf, out)
    return out[0], out[1], out[2], out[3]


def host_brand() -> bytes:
    """The host CPU's brand string as CPUID gives it (48 bytes, NUL-padded), or b"" when
    the host has none (its highest extended leaf is below 0x80000004)."""
    if host_cpuid(0x80000000)[0] < BRAND_LEAVES[-1]:
        return b""
    return b"".join(struct.pack("<IIII", *host_cpuid(leaf)) for leaf in BRAND_LEAVES)


def brand_string(entries: list[CpuidEntry]) -> bytes:
    """The brand string a table gives (48 bytes as CPUID returns them; b"" without the
    brand leaves)."""
    leaves = [e for e in (find(entries, leaf) for leaf in BRAND_LEAVES) if e is not None]
    if len(leaves) < len(BRAND_LEAVES):
        return b""
    return b"".join(struct.pack("<IIII", *e.regs()) for e in leaves)


def paravirt(entries: list[CpuidEntry], kernel_irqchip: bool = True,
             tsc_deadline: bool = False) -> list[CpuidEntry]:
    """What QEMU (``kvm_arch_get_supported_cpuid``) gives a KVM guest on top of the
    supported table: the hypervisor bit; the TSC-deadline timer, which KVM emulates in its
    local APIC but does not list (``tsc_deadline``: ``KVM_CAP_TSC_DEADLINE_TIMER``; else
    Linux calibrates and runs the APIC timer in one-shot mode); no x2APIC without the
    in-kernel LAPIC (kvmfw's userspace LAPIC is MMIO only); and KVM's PV feature leaf
    without what this machine cannot serve. Linux then uses kvmclock, PV EOI, PV spinlocks
    (unhalt), PV TLB flush, PV IPIs, steal time... as KVM offers. And the host's brand
    string where KVM leaves the brand leaves empty (as QEMU's ``-cpu host``): else the
    guest names its CPU by family and model only ("17/01")."""
    out = [CpuidEntry(**vars(e)) for e in entries]
    if brand_string(out) == bytes(48):
        raw = host_brand()
        for i, leaf in enumerate(BRAND_LEAVES if raw else ()):
            b = find(out, leaf)
            if b is not None:
                b.eax, b.ebx, b.ecx, b.edx = struct.unpack_from("<IIII", raw, 16 * i)
    leaf1 = find(out, 1)
    if leaf1 is not None:
        leaf1.ecx |= 1 << HYPERVISOR_BIT
        if kernel_irqchip and tsc_deadline:
            leaf1.ecx |= 1 << FEATURES["tsc_deadline"][3]
        if not kernel_irqchip:
            leaf1.ecx &= ~(1 << FEATURES["x2apic"][3])
    feats = find(out, KVM_FEATURES_LEAF)
    if feats is not None:
        drop = NEEDS_X2APIC_API + (() if kernel_irqchip else NEEDS_KERNEL_LAPIC)
        for name in drop:
            feats.eax &= ~(1 << FEATURES[name][3])
    return out


# masking a feature masks what depends on it; XCR0 bits leave with their feature
DEPENDS = {
    "xsave": ["avx", "osxsave", "xsaveopt", "xsavec", "xsaves", "pku"],
    "avx": ["avx2", "fma", "f16c", "avx512f", "vaes", "vpclmulqdq"],
    "avx512f": [n for n in FEATURES if n.startswith("avx512") and n != "avx512f"],
    "sse2": ["sse3"], "sse3": ["ssse3"], "ssse3": ["sse4_1"], "sse4_1": ["sse4_2"],
}
XCR0_OF = {"avx": 1 << 2, "avx512f": 0b111 << 5, "pku": 1 << 9, "xsave": ~3}
_REG = {"eax": 0, "ebx": 1, "ecx": 2, "edx": 3}


def supported_cpuid(kvm_fd: int) -> list[CpuidEntry]:
    """``KVM_GET_SUPPORTED_CPUID`` (grows its buffer until the kernel's list fits)."""
    return read_cpuid_table(kvm_fd, X.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID",
                            first=128, most=4096)


def read_cpuid_table(fd: int, request: int, name: str, *, first: int,
                     most: int) -> list[CpuidEntry]:
    """A ``struct kvm_cpuid2`` table from ioctl ``request`` on ``fd``: starts with room for
    ``first`` entries and doubles on E2BIG up to ``most`` (the kernel's count is clamped
    to the buffer, never trusted to size a read)."""
    n = first
    esize = ffi.sizeof("struct kvm_cpuid_entry2")
    hsize = ffi.sizeof("struct kvm_cpuid2")
    while True:
        buf = ffi.new("uint8_t[]", hsize + n * esize)
        ffi.cast("struct kvm_cpuid2 *", buf).nent = n
        try:
            ioctl(fd, request, addr(buf), name)
            break
        except KvmError as exc:
            if exc.errno != errno.E2BIG or n >= most:
                raise
            n *= 2
    count = min(int(ffi.cast("struct kvm_cpuid2 *", buf).nent), n)
    ents = ffi.cast("struct kvm_cpuid_entry2 *", buf + hsize)
    return [CpuidEntry(int(e.function), int(e.index), int(e.flags), int(e.eax), int(e.ebx),
                       int(e.ecx), int(e.edx)) for e in (ents[i] for i in range(count))]


MAX_ENTRIES = 256
"""``KVM_MAX_CPUID_ENTRIES``: KVM_SET_CPUID2 refuses a longer table."""


def pack_cpuid2(entries: list[CpuidEntry]) -> Any:
    """A ``struct kvm_cpuid2`` buffer for ``KVM_SET_CPUID2`` (ConfigError if the table is
    longer than KVM takes or a value is not 32-bit)."""
    if len(entries) > MAX_ENTRIES:
        raise ConfigError(f"CPUID table of {len(entries)} entries: KVM takes at most "
                          f"{MAX_ENTRIES}")
    for e in entries:
        for v in (e.function, e.index, e.flags, *e.regs()):
            if not isinstance(v, int) or not 0 <= v <= 0xFFFFFFFF:
                raise ConfigError(f"CPUID leaf {e.function:#x}.{e.index}: {v!r} is not a "
                                  "32-bit value")
    esize = ffi.sizeof("struct kvm_cpuid_entry2")
    hsize = ffi.sizeof("struct kvm_cpuid2")
    buf = ffi.new("uint8_t[]", hsize + len(entries) * esize)
    ffi.cast("struct kvm_cpuid2 *", buf).nent = len(entries)
    ents = ffi.cast("struct kvm_cpuid_entry2 *", buf + hsize)
    for i, e in enumerate(entries):
        c = ents[i]
        c.function, c.index, c.flags = e.function, e.index, e.flags
        c.eax, c.ebx, c.ecx, c.edx = e.eax, e.ebx, e.ecx, e.edx
    return buf


def find(entries: list[CpuidEntry], leaf: int, subleaf: int = 0) -> CpuidEntry | None:
    for e in entries:
        if e.function == leaf and (e.index == subleaf or not e.flags & 1):
            return e
    return None


def has_feature(entries: list[CpuidEntry], name: str) -> bool:
    leaf, sub, reg, bit = FEATURES[name]
    e = find(entries, leaf, sub)
    return e is not None and bool(e.regs()[_REG[reg]] >> bit & 1)


class CpuidModel(Record):
    """A user CPU model applied on top of what KVM supports. ``hyperv``: Hyper-V
    enlightenments (QEMU's ``hv-*`` names without the prefix, or ``all``): see
    :mod:`kvmfw_x86.hyperv`."""

    def __init__(self, vendor: str | None = None, family: int | None = None,
                 model: int | None = None, stepping: int | None = None,
                 brand: str | None = None, mask: list[str] | None = None,
                 hyperv: list[str] | None = None) -> None:
        self.vendor = vendor
        self.family = family
        self.model = model
        self.stepping = stepping
        self.brand = brand
        self.mask: list[str] = [] if mask is None else mask
        self.hyperv: list[str] = [] if hyperv is None else hyperv

    @classmethod
    def from_options(cls, opts: dict[str, Any] | str | None) -> CpuidModel | None:
        """From ``{"vendor": ..., "family": ..., "mask": "avx512f,avx2"}`` (CLI/TOML)."""
        if not opts:
            return None
        if isinstance(opts, str):
            opts = dict(kv.split("=", 1) for kv in opts.split(";") if "=" in kv)
        mask: Any = opts.get("mask", [])
        if isinstance(mask, str):
            mask = [m.strip() for m in mask.replace(" ", ",").split(",") if m.strip()]

        if not isinstance(mask, list) or not all(isinstance(m, str) for m in mask):
            raise ConfigError(f"CPUID mask must be feature names, not {mask!r}")
        hv: Any = opts.get("hyperv", [])
        if isinstance(hv, str):
            hv = [h.strip() for h in hv.replace(" ", ",").split(",") if h.strip()]
        if not isinstance(hv, list) or not all(isinstance(h, str) for h in hv):
            raise ConfigError(f"CPUID hyperv must be enlightenment names, not {hv!r}")
        from kvmfw_x86.hyperv import expand

        expand(hv)  # checks the names; "all" stays "all" (filtered by what KVM offers)
        hv = [h.lower() for h in hv]

        def num(k: str, top: int) -> int | None:
            v = opts.get(k)
            if v is None:
                return None
            try:
                n = v if isinstance(v, int) and not isinstance(v, bool) else int(str(v), 0)
            except ValueError:
                raise ConfigError(f"CPUID {k} must be a number, not {v!r}") from None
            if not 0 <= n <= top:
                raise ConfigError(f"CPUID {k} {n:#x} is out of range (0 to {top:#x})")
            return n

        def text(k: str) -> str | None:
            v = opts.get(k)
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"CPUID {k} must be a string, not {v!r}")
            return v

        return cls(text("vendor"), num("family", 0xFF + 0xF), num("model", 0xFF),
                   num("stepping", 0xF), text("brand"), list(mask), hv)

    def apply(self, entries: list[CpuidEntry]) -> list[CpuidEntry]:
        out = [CpuidEntry(**vars(e)) for e in entries]
        if self.vendor is not None:
            v = self.vendor.encode()
            if len(v) != 12 or not self.vendor.isascii():
                raise ConfigError(f"CPUID vendor must be 12 characters, got {self.vendor!r}")
            b, d, c = struct.unpack("<III", v)
            for e in out:
                if e.function in (0, 0x80000000) and e.function == 0:
                    e.ebx, e.edx, e.ecx = b, d, c
        leaf1 = find(out, 1)
        if leaf1 is not None and (self.family, self.model, self.stepping) != (None,) * 3:
            old = leaf1.eax
            fam = self.family if self.family is not None else \
                ((old >> 8) & 0xF) + (((old >> 20) & 0xFF) if (old >> 8) & 0xF == 0xF else 0)
            mod = self.model if self.model is not None else \
                ((old >> 4) & 0xF) | (((old >> 16) & 0xF) << 4)
            step = self.stepping if self.stepping is not None else old & 0xF
            eax = step & 0xF
            eax |= (min(fam, 0xF) & 0xF) << 8
            if fam >= 0xF:
                eax |= ((fam - 0xF) & 0xFF) << 20
            eax |= (mod & 0xF) << 4
            eax |= ((mod >> 4) & 0xF) << 16
            leaf1.eax = eax
        if self.brand is not None:
            raw = self.brand.encode()[:47].ljust(48, b"\0")
            for i, leaf in enumerate(BRAND_LEAVES):
                ent = find(out, leaf)
                if ent is not None:
                    ent.eax, ent.ebx, ent.ecx, ent.edx = struct.unpack_from("<IIII", raw, 16 * i)
        for name in expand_mask(self.mask):
            leaf, sub, reg, bit = FEATURES[name]
            for e in out:
                if e.function == leaf and (e.index == sub or not e.flags & 1):
                    vals = list(e.regs())
                    vals[_REG[reg]] &= ~(1 << bit)
                    e.eax, e.ebx, e.ecx, e.edx = vals
            xcr = XCR0_OF.get(name)
            if xcr is not None:
                d0 = find(out, 0xD, 0)
                if d0 is not None:
                    d0.eax &= ~xcr if xcr > 0 else 3
        return out


def expand_mask(names: list[str]) -> list[str]:
    """The masked features plus everything that depends on them (unknown names raise)."""
    out: list[str] = []
    todo = list(names)
    while todo:
        n = todo.pop().lower()
        if n not in FEATURES:
            raise ConfigError(f"unknown CPUID feature {n!r} (known: {', '.join(sorted(FEATURES))})")
        if n not in out:
            out.append(n)
            todo += DEPENDS.get(n, [])
    return out


def for_vcpu(entries: list[CpuidEntry], apic_id: int, ncpus: int) -> list[CpuidEntry]:
    """Per-vCPU copy: the APIC ids (initial in leaf 1, x2APIC in 0xB/0x1F and AMD's
    0x8000001E) and the machine's topology (:func:`_topology`)."""
    out = [CpuidEntry(**vars(e)) for e in entries]
    for e in out:
        if e.function == 1:
            # the initial APIC id is 8 bits (the x2APIC id, in 0xB/0x1F, is the whole one)
            e.ebx = (e.ebx & 0x0000FFFF) | (apic_id & 0xFF) << 24 | min(ncpus, 0xFF) << 16
            if ncpus > 1:
                e.edx |= 1 << 28  # HTT: the logical-processor count field is valid
        elif e.function in (0xB, 0x1F):
            e.edx = apic_id
    _topology(out, apic_id, ncpus)
    _legacy_l1_caches(out)
    return out


def _legacy_l1_caches(entries: list[CpuidEntry]) -> None:
    """AMD without TOPOEXT: Linux reads its caches from the legacy leaves, L1 data and
    instruction from 0x80000005 ECX/EDX, and stops at the first it finds empty. A nested
    host's KVM can leave those zero while 0x8000001D describes the caches (QEMU fills them
    from its own model): the guest then saw no cache at all, not even the shared L3 that
    groups its CPUs. Zero L1 fields are filled from the 0x8000001D level-1 subleaves
    (size, ways, line; one line per tag), which is what a real part reports in both."""
    legacy = find(entries, 0x80000005)
    if legacy is None or (legacy.ecx and legacy.edx):
        return
    for e in entries:
        kind = e.eax & 0x1F
        if e.function != 0x8000001D or (e.eax >> 5) & 7 != 1 or kind not in (1, 2):
            continue
        ways, line = (e.ebx >> 22) + 1, (e.ebx & 0xFFF) + 1
        kib = ways * (((e.ebx >> 12) & 0x3FF) + 1) * line * (e.ecx + 1) // 1024
        if not 0 < kib <= 0xFF or line > 0xFF or ways > 0xFF:
            continue  # (the legacy fields are a byte each)
        assoc = 0xFF if e.eax & (1 << 9) else ways  # fully associative
        value = kib << 24 | assoc << 16 | 1 << 8 | line
        if kind == 1 and not legacy.ecx:
            legacy.ecx = value
        elif kind == 2 and not legacy.edx:
            legacy.edx = value


def _topology(entries: list[CpuidEntry], apic_id: int, ncpus: int) -> None:
    """One package of ``ncpus`` cores, one thread each, sharing the last-level cache (QEMU's
    default for ``-smp N``), told the ways Linux reads it.

    ``KVM_GET_SUPPORTED_CPUID`` carries the host's topology leaves or zeroes them (AMD's
    0x8000001E), so left alone a guest sees every vCPU as core 0 (Linux did, on a nested
    AMD host) and, where the host's cache leaves say a cache is not shared (a one-CPU
    host), each vCPU with a last-level cache of its own, which is what Linux's scheduler
    groups CPUs by. Only the topology fields change."""
    bits = max(ncpus - 1, 0).bit_length()  # APIC-id bits of the core level
    last = {f: max(((e.eax >> 5) & 7 for e in entries if e.function == f and e.eax & 0x1F),
                   default=0) for f in (4, 0x8000001D)}
    for e in entries:
        f = e.function
        if f in (4, 0x8000001D) and e.eax & 0x1F:  # a cache (type != 0): who shares it
            sharing = ncpus - 1 if (e.eax >> 5) & 7 == last[f] else 0  # the last level: all
            e.eax = (e.eax & ~(0xFFF << 14)) | (min(sharing, 0xFFF) << 14)
            if f == 4:  # Intel: the package's core count, EAX[31:26]
                e.eax = (e.eax & 0x03FFFFFF) | (min((1 << bits) - 1, 0x3F) << 26)
        elif f in (0xB, 0x1F):
            kind = (e.ecx >> 8) & 0xFF
            if e.index == 0:  # the SMT level: one thread per core
                e.eax, e.ebx, e.ecx = 0, 1, 1 << 8
            elif e.index == 1:  # the core level: the whole package
                e.eax, e.ebx, e.ecx = bits, ncpus, 2 << 8 | 1
            elif kind:  # (no die or module level)
                e.eax, e.ebx, e.ecx = 0, 0, e.index
        elif f == 0x80000001 and ncpus > 1:
            e.ecx |= 1 << 1  # CmpLegacy: the logical processors are cores
        elif f == 0x80000008:  # AMD: NC (cores - 1) and the APIC-id bits of a core
            e.ecx = (e.ecx & ~0xF0FF) | bits << 12 | (min(ncpus, 256) - 1)
        elif f == 0x8000001E:  # AMD TOPOEXT: the core id, one thread per core, node 0
            e.eax = apic_id
            e.ebx = apic_id & 0xFF
            e.ecx = 0


def vendor_of(entries: list[CpuidEntry]) -> str:
    e = find(entries, 0)
    return struct.pack("<III", e.ebx, e.edx, e.ecx).decode(errors="replace") if e else "?"


def family_model(entries: list[CpuidEntry]) -> tuple[int, int, int]:
    e = find(entries, 1)
    if e is None:
        return 0, 0, 0
    a = e.eax
    fam = (a >> 8) & 0xF
    mod = (a >> 4) & 0xF
    if fam == 0xF:
        fam += (a >> 20) & 0xFF
    if fam in (6, 0xF) or fam > 0xF:
        mod |= ((a >> 16) & 0xF) << 4
    return fam, mod, a & 0xF


def format_table(entries: list[CpuidEntry]) -> str:
    """The CPUID table as the guest will see it, with a decoded summary."""
    fam, mod, step = family_model(entries)
    feats = [n for n in FEATURES if has_feature(entries, n)]
    lines = [f"vendor: {vendor_of(entries)}  family {fam:#x} model {mod:#x} stepping {step}",
             f"features: {' '.join(feats)}",
             f"{'leaf':>10} {'sub':>4} {'flags':>5}  {'eax':>10} {'ebx':>10} {'ecx':>10} "
             f"{'edx':>10}"]
    for e in entries:
        lines.append(f"{e.function:#010x} {e.index:#4x} {e.flags:5d}  {e.eax:#010x} "
                     f"{e.ebx:#010x} {e.ecx:#010x} {e.edx:#010x}")
    return "\n".join(lines)


def guest_cpuid(model: CpuidModel | None = None, kvm_path: str = "/dev/kvm") -> list[CpuidEntry]:
    """The table a guest of this host would see (for ``kvmfw cpuid``)."""
    from kvmfw.kvm import Kvm

    with Kvm(kvm_path) as kvm:
        entries = paravirt(supported_cpuid(kvm.fd),
                           tsc_deadline=bool(kvm.check_extension(Cap.TSC_DEADLINE_TIMER)))
        if model is None:
            return entries
        entries = model.apply(entries)
        if model.hyperv:
            from kvmfw_x86 import hyperv

            entries = hyperv.apply(entries, hyperv.supported(kvm), model.hyperv)
    return entries
