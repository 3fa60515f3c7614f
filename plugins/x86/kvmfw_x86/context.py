"""The x86 thread context: KVM state in register groups, each with its own dirty flag.

Groups (and the ioctls that move them): ``regs`` (GPRs, RIP, RFLAGS: ``KVM_*_REGS``),
``sregs`` (segments, CRs, EFER, APIC base, GDT/IDT: ``KVM_*_SREGS2`` or ``KVM_*_SREGS``),
``xsave`` (x87, SSE, AVX, AVX-512, PKRU and every component the host enables:
``KVM_GET_XSAVE2``/``KVM_SET_XSAVE``), ``xcrs``, ``msrs`` (every MSR in
``KVM_GET_MSR_INDEX_LIST`` that reads back), ``debugregs`` and ``events`` (pending/injected
exception, interrupt, NMI, interrupt shadow, SIPI vector).

Sync is lazy per group: after KVM ran a group is *stale* and is fetched on the first read
of one of its registers (the context compares the vCPU's exit and half-entry counters, so
even a context held across a run never serves stale values); a write marks only its
group dirty, and a push moves only dirty groups (and only the MSRs that changed). So an
exit handler that reads RIP costs one ``KVM_GET_REGS``, not a pull of XSAVE and 40
MSRs. ``eager=True`` gives gem5's all-or-nothing behaviour (for comparison, benchmarks);
the core's ``always_sync`` (gem5's debugging aid) does the same for one CPU: every group is
read from KVM after each exit and written before each entry.

The TSC is never pushed back unless the host changed it (``set_msr``/``load``): the guest's
TSC runs on in KVM (host TSC plus KVM's offset) while the host services an exit, so a value
fetched at the exit is stale by the service time and pushing it would move the guest's TSC
backwards.

Everything written into a KVM buffer from outside data (a checkpoint, a user) is checked
against the destination first: an oversized, out-of-range or foreign value raises
:class:`~kvmfw.errors.StateError` and writes nothing.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from kvmfw.cpu import RUNNING_SERVICE_COMPLETION
from kvmfw.errors import KvmError, StateError
from kvmfw.hookspecs import SyncLevel
from kvmfw.record import Record

from kvmfw_x86.abi import X, addr, ffi

if TYPE_CHECKING:
    from kvmfw.cpu import KvmCPU

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
GROUPS = ("sregs", "msrs", "xcrs", "xsave", "regs", "debugregs", "events")
"""All groups, in push order (mode first, XCR0 before the XSAVE area, events last)."""
RUNTIME_GROUPS = ("regs", "sregs")
_PLAIN_ATTRS = frozenset(("cpu", "info", "eager", "fetches", "pushes", "ioctls_get",
                          "ioctls_set", "completions"))

MSR_IA32_TSC = 0x10
U64 = 0xFFFFFFFFFFFFFFFF
# MTRRs (Intel SDM vol. 3, 12.11): KVM emulates them but leaves them out of
# KVM_GET_MSR_INDEX_LIST (QEMU saves them itself when the CPUID has MTRR); see
# kvmfw_x86.plugin.mtrr_msrs
MSR_MTRR_CAP = 0xFE
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_DEF_ENABLE = 1 << 11
MTRR_TYPE_WB = 6
MTRR_FIXED = (0x250, 0x258, 0x259, *range(0x268, 0x270))
MTRR_VAR_BASE = 0x200
MTRR_VAR_MAX = 32
"""Variable-range pairs kvmfw syncs at most (MTRRcap.VCNT; KVM has 8; 0x200 + 2 * 32
stays below the fixed-range MSRs)."""

# XSAVE legacy area layout (Intel SDM vol. 1, 13.4.1)
XS_FCW, XS_FSW, XS_FTW, XS_FOP, XS_FIP, XS_FDP, XS_MXCSR = 0, 2, 4, 6, 8, 16, 24
XS_ST, XS_XMM, XS_HEADER = 32, 160, 512
XS_MIN = XS_HEADER + 64
"""The smallest valid XSAVE image: legacy area plus header."""
# XSAVE components with a register file this context exposes
XC_YMM, XC_OPMASK, XC_ZMM_HI256, XC_HI16_ZMM, XC_PKRU = 2, 5, 6, 7, 9


EVENT_FIELDS: dict[str, dict[str, int]] = {
    "exception": {"injected": 8, "nr": 8, "has_error_code": 8, "pending": 8, "error_code": 32},
    "interrupt": {"injected": 8, "nr": 8, "soft": 8, "shadow": 8},
    "nmi": {"injected": 8, "pending": 8, "masked": 8},
}
"""``struct kvm_vcpu_events`` fields :meth:`X86Context.set_event` writes, and their widths."""


def _uint(value: Any, bits: int, what: str) -> int:
    """``value`` checked to be an unsigned ``bits``-bit integer (StateError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateError(f"{what} must be an integer, not {type(value).__name__}")
    if not 0 <= value < 1 << bits:
        raise StateError(f"{what} = {value:#x} does not fit in {bits} bits")
    return value


def _le(value: Any, n: int, what: str) -> bytes:
    """``value`` as ``n`` little-endian bytes (StateError if it is not an n-byte unsigned)."""
    return _uint(value, 8 * n, what).to_bytes(n, "little")


def _changed_words(a: bytes, b: bytes) -> list[int]:
    """Offsets of the 8-byte words where ``a`` and ``b`` (same length) differ: a field the
    host wrote is re-applied whole (every register in ``kvm_regs`` is one word), never
    mixed byte by byte with what KVM changed."""
    if a == b:
        return []
    x = int.from_bytes(a, "little") ^ int.from_bytes(b, "little")
    out = []
    while x:
        w = ((x & -x).bit_length() - 1) // 64
        out.append(8 * w)
        x &= ~((1 << 64) - 1 << 64 * w)
    return out


def _dtable(value: Any, what: str) -> tuple[int, int]:
    try:
        base, limit = value
    except (TypeError, ValueError):
        raise StateError(f"{what} is (base, limit), not {value!r}") from None
    return _uint(base, 64, f"{what} base"), _uint(limit, 16, f"{what} limit")


def _index(i: Any, count: int, what: str) -> int:
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count:
        raise StateError(f"no register {what}{i} (0 to {count - 1})")
    return i


class Segment(Record):
    """One segment register as ``struct kvm_segment`` holds it (its fields in that order)."""

    def __init__(self, base: int = 0, limit: int = 0xFFFF, selector: int = 0, type: int = 3,
                 present: int = 1, dpl: int = 0, db: int = 0, s: int = 1, l: int = 0,
                 g: int = 0, avl: int = 0, unusable: int = 0) -> None:
        self.base = base
        self.limit = limit
        self.selector = selector
        self.type = type
        self.present = present
        self.dpl = dpl
        self.db = db
        self.s = s
        self.l = l
        self.g = g
        self.avl = avl
        self.unusable = unusable

    @classmethod
    def from_c(cls, c: Any) -> Segment:
        return cls(int(c.base), int(c.limit), int(c.selector), int(c.type), int(c.present),
                   int(c.dpl), int(c.db), int(c.s), int(c.l), int(c.g), int(c.avl),
                   int(c.unusable))

    def to_c(self, c: Any) -> None:
        """Write into a ``struct kvm_segment`` (StateError, and nothing written, if a field
        does not fit)."""
        vals = list(vars(self).items())
        tmp = ffi.new("struct kvm_segment *")
        try:
            for name, v in vals:
                setattr(tmp[0], name, v)
        except (TypeError, OverflowError, AttributeError) as exc:  # (an unknown field)
            raise StateError(f"segment field out of range: {exc}") from None
        ffi.memmove(ffi.addressof(c), tmp, ffi.sizeof("struct kvm_segment"))

    def __str__(self) -> str:
        return (f"sel={self.selector:#06x} base={self.base:#x} limit={self.limit:#x} "
                f"type={self.type} s={self.s} dpl={self.dpl} p={self.present} db={self.db} "
                f"l={self.l} g={self.g}{' unusable' if self.unusable else ''}")


def fix_segments(sregs: Any) -> None:
    """gem5's VMX fix-ups before entry: accessed bit on usable segments, TR busy,
    SS.DPL = CS.DPL for non-conforming code (the CPU refuses the entry otherwise)."""
    if not sregs.cr0 & 1:
        return  # real mode: KVM builds the segments itself
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = getattr(sregs, name)
        if seg.present and not seg.unusable and seg.s:
            seg.type |= 1
    tr = sregs.tr
    if tr.present:
        if tr.type in (1, 3):
            tr.type = 3  # 16-bit TSS, busy
        else:
            tr.type = 11  # 32/64-bit TSS, busy
    if sregs.cs.s and not sregs.cs.type & 0x4:  # non-conforming code
        sregs.ss.dpl = sregs.cs.dpl


def mode_of(sregs: Any, rflags: int) -> str:
    """The CPU mode that ``struct kvm_sregs`` and RFLAGS describe (see ``X86Context.mode``)."""
    if not sregs.cr0 & 1:
        return "real"
    if rflags & (1 << 17):
        return "vm86"
    if sregs.efer & (1 << 10):
        return "long64" if sregs.cs.l else "compat"
    return "protected32" if sregs.cs.db else "protected16"


class CpuInfo:
    """Per-VM facts the context needs (filled by the plugin at vCPU init)."""

    def __init__(self, *, use_sregs2: bool, xsave_size: int, msr_indices: list[int],
                 xsave_offsets: dict[int, tuple[int, int]], has_xcrs: bool = True,
                 has_debugregs: bool = True, has_events: bool = True) -> None:
        self.use_sregs2 = use_sregs2
        self.xsave_size = xsave_size
        self.msr_indices = msr_indices
        self.xsave_offsets = xsave_offsets
        """XSAVE component -> (offset, size) in the standard (non-compacted) format."""
        self.xfeatures = 3 | sum(1 << c for c in xsave_offsets)
        """The XSAVE components an image may carry here (x87, SSE and the enabled ones)."""
        self.has_xcrs = has_xcrs
        self.has_debugregs = has_debugregs
        self.has_events = has_events


class X86Context:
    """The x86 register cache of one vCPU (see the module docstring for the groups).

    Registers are attributes (``ctx.rax``, ``ctx.rip``, ``ctx.cr0``, ``ctx.cs`` ...); MSRs
    through :meth:`get_msr`/:meth:`set_msr`; vector state through :meth:`xmm`,
    :meth:`ymm`, :meth:`zmm`, :meth:`opmask` and their setters.
    """

    # registers added as properties below (declared here for type checkers)
    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rsp: int
    rbp: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rip: int
    rflags: int
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment

    def __init__(self, cpu: KvmCPU, info: CpuInfo, *, eager: bool = False) -> None:
        object.__setattr__(self, "_init", True)
        self.cpu = cpu
        self.info = info
        self.eager = eager
        self.fetches = dict.fromkeys(GROUPS, 0)
        self.pushes = dict.fromkeys(GROUPS, 0)
        self.ioctls_get = 0
        """KVM ioctls issued to read state (what ``update_thread_context`` reports)."""
        self.ioctls_set = 0
        """KVM ioctls issued to write state."""
        self._valid = dict.fromkeys(GROUPS, False)
        self._dirty = dict.fromkeys(GROUPS, False)
        self._run_key: int | None = None
        self._regs = ffi.new("struct kvm_regs *")
        self._sregs = ffi.new("struct kvm_sregs2 *" if info.use_sregs2 else "struct kvm_sregs *")
        self._xsave = ffi.new("uint8_t[]", max(info.xsave_size, 4096))
        self._xcrs = ffi.new("struct kvm_xcrs *")
        self._debugregs = ffi.new("struct kvm_debugregs *")
        # what regs/sregs held before their latest fetch (see previous_state)
        self._prev_regs = ffi.new("struct kvm_regs *")
        self._prev_sregs = ffi.new(ffi.typeof(self._sregs))
        self._fetched_at: dict[str, int | None] = {"regs": None, "sregs": None}
        self._has_prev = {"regs": False, "sregs": False}
        self._events = ffi.new("struct kvm_vcpu_events *")
        n = len(info.msr_indices)
        hdr = ffi.sizeof("struct kvm_msrs")
        self._msr_buf = ffi.new("uint8_t[]", hdr + n * ffi.sizeof("struct kvm_msr_entry"))
        self._msr_entries = ffi.cast("struct kvm_msr_entry *", self._msr_buf + hdr)
        self._msrs: dict[int, int] = {}
        self._msr_dirty: set[int] = set()
        self._msr_unwritable: set[int] = set()
        """MSRs KVM refused to take back unchanged (e.g. MSR_KVM_ASYNC_PF_INT as read)."""
        # each struct group's buffer and size, and a copy of it as KVM gave it, taken at the
        # first write after a fetch: what the host changed is the difference (see
        # _complete_pending_access)
        self._bufs: dict[str, tuple[Any, int]] = {
            "regs": (self._regs, ffi.sizeof(self._regs[0])),
            "sregs": (self._sregs, ffi.sizeof(self._sregs[0])),
            "xsave": (self._xsave, info.xsave_size),
            "xcrs": (self._xcrs, ffi.sizeof(self._xcrs[0])),
            "debugregs": (self._debugregs, ffi.sizeof(self._debugregs[0])),
            "events": (self._events, ffi.sizeof(self._events[0])),
        }
        self._base = {g: ffi.new("uint8_t[]", n) for g, (_, n) in self._bufs.items()}
        self._pushing = False
        self.completions = 0
        """Pending IO/MMIO completions done before a push (see push_dirty)."""
        object.__setattr__(self, "_init", False)

    # --- group bookkeeping -------------------------------------------------------------

    def _need(self, group: str) -> None:
        if self.cpu.runs != self._run_key:
            self.invalidate()  # KVM ran since we last looked, even if nobody pulled
        if not self._valid[group]:
            self.fetch(group)

    def _need_w(self, group: str) -> None:
        """Before a write: the group is current, and its unchanged copy is kept."""
        self._need(group)
        if not self._dirty[group]:
            buf, n = self._bufs[group]
            ffi.memmove(self._base[group], buf, n)

    def _touch(self, group: str) -> None:
        self._dirty[group] = True
        self.cpu.mark_context_dirty()

    def fetch(self, group: str) -> int:
        """Read one group from KVM now (discarding unpushed writes to it); returns the
        number of ioctls issued."""
        v = self.cpu.vcpu
        n = 1
        if group == "regs":
            self._keep_previous("regs", self._prev_regs, self._regs)
            v.ioctl(X.KVM_GET_REGS, addr(self._regs))
        elif group == "sregs":
            self._keep_previous("sregs", self._prev_sregs, self._sregs)
            v.ioctl(X.KVM_GET_SREGS2 if self.info.use_sregs2 else X.KVM_GET_SREGS,
                    addr(self._sregs))
        elif group == "xsave":
            # the buffer holds max(xsave_size, 4096) bytes, xsave_size being what the VM fd
            # says KVM_GET_XSAVE2 writes; plain KVM_GET_XSAVE writes 4096
            v.ioctl(X.KVM_GET_XSAVE2 if self.info.xsave_size > 4096 else X.KVM_GET_XSAVE,
                    addr(self._xsave))
        elif group == "xcrs":
            n = 0
            if self.info.has_xcrs:
                v.ioctl(X.KVM_GET_XCRS, addr(self._xcrs))
                n = 1
        elif group == "msrs":
            n = self._fetch_msrs()
        elif group == "debugregs":
            n = 0
            if self.info.has_debugregs:
                v.ioctl(X.KVM_GET_DEBUGREGS, addr(self._debugregs))
                n = 1
        elif group == "events":
            n = 0
            if self.info.has_events:
                v.ioctl(X.KVM_GET_VCPU_EVENTS, addr(self._events))
                n = 1
        else:
            raise StateError(f"no x86 register group {group!r}")
        self._valid[group] = True
        self._dirty[group] = False
        self.fetches[group] += 1
        self.ioctls_get += n
        return n

    def _keep_previous(self, group: str, prev: Any, cur: Any) -> None:
        """Before a fetch: keep what the buffer held if it is from before KVM last ran."""
        runs = self.cpu.runs
        if self.fetches[group] and self._fetched_at[group] != runs:
            ffi.memmove(prev, cur, ffi.sizeof(cur[0]))
            self._has_prev[group] = True
        self._fetched_at[group] = runs

    def _fetch_msrs(self) -> int:
        idx = self.info.msr_indices
        if not idx:
            self._msrs = {}
            self._msr_dirty.clear()
            return 0
        hdr = ffi.cast("struct kvm_msrs *", self._msr_buf)
        hdr.nmsrs = len(idx)
        e = self._msr_entries
        for i, m in enumerate(idx):
            e[i].index = m
            e[i].data = 0
        got = self.cpu.vcpu.ioctl(X.KVM_GET_MSRS, addr(self._msr_buf))
        if got != len(idx):
            bad = idx[got] if 0 <= got < len(idx) else -1
            raise KvmError("KVM_GET_MSRS", 5, f"MSR {bad:#x} could not be read")
        self._msrs = {int(e[i].index): int(e[i].data) for i in range(len(idx))}
        self._msr_dirty.clear()
        return 1

    def push(self, group: str, *, all_msrs: bool = False) -> int:
        """Write one group to KVM now; returns the number of ioctls issued. If KVM refuses
        the group, the write is dropped (the group is read from KVM again on next use)
        and the KvmError raised: a refused value never stays queued for every entry."""
        try:
            return self._push(group, all_msrs)
        except KvmError:
            self._valid[group] = False
            self._dirty[group] = False
            if group == "msrs":
                self._msr_dirty.clear()
            raise

    def _push(self, group: str, all_msrs: bool) -> int:
        v = self.cpu.vcpu
        n = 1
        if group == "regs":
            v.ioctl(X.KVM_SET_REGS, addr(self._regs))
        elif group == "sregs":
            fix_segments(self._sregs)
            if self.info.use_sregs2:
                self._sregs.flags = 0  # PDPTRs are reloaded from CR3 (no PAE-mode override)
                v.ioctl(X.KVM_SET_SREGS2, addr(self._sregs))
            else:
                v.ioctl(X.KVM_SET_SREGS, addr(self._sregs))
        elif group == "xsave":
            v.ioctl(X.KVM_SET_XSAVE, addr(self._xsave))
        elif group == "xcrs":
            n = 0
            if self.info.has_xcrs:
                v.ioctl(X.KVM_SET_XCRS, addr(self._xcrs))
                n = 1
        elif group == "msrs":
            n = self._push_msrs(all_msrs)
        elif group == "debugregs":
            n = 0
            if self.info.has_debugregs:
                v.ioctl(X.KVM_SET_DEBUGREGS, addr(self._debugregs))
                n = 1
        elif group == "events":
            n = 0
            if self.info.has_events:
                ev = self._events
                ev.flags = int(ffi.cast("uint32_t", 0x1 | 0x4))  # NMI_PENDING | SHADOW
                v.ioctl(X.KVM_SET_VCPU_EVENTS, addr(self._events))
                n = 1
        else:
            raise StateError(f"no x86 register group {group!r}")
        self._dirty[group] = False
        self.pushes[group] += 1
        self.ioctls_set += n
        return n

    def _push_msrs(self, all_msrs: bool) -> int:
        """Write the changed MSRs (``all_msrs``: every one, except a TSC nobody changed:
        see the module docstring). Returns the number of ioctls issued."""
        dirty = self._msr_dirty
        if all_msrs:
            skip = self._msr_unwritable
            todo = [m for m in self._msrs if m in dirty or (m != MSR_IA32_TSC and m not in skip)]
        else:
            todo = sorted(dirty)
        hdr_size = ffi.sizeof("struct kvm_msrs")
        esize = ffi.sizeof("struct kvm_msr_entry")
        n = 0
        while todo:
            buf = ffi.new("uint8_t[]", hdr_size + len(todo) * esize)
            ffi.cast("struct kvm_msrs *", buf).nmsrs = len(todo)
            e = ffi.cast("struct kvm_msr_entry *", buf + hdr_size)
            for i, m in enumerate(todo):
                e[i].index = m
                e[i].data = self._msrs[m]
            done = self.cpu.vcpu.ioctl(X.KVM_SET_MSRS, addr(buf))
            n += 1
            if done == len(todo):
                break
            if not 0 <= done < len(todo):
                raise KvmError("KVM_SET_MSRS", 22, f"KVM reported {done} of {len(todo)} written")
            bad = todo[done]
            if bad in dirty:
                # gem5 ignores a partial write; a silently dropped MSR corrupts the guest
                raise KvmError("KVM_SET_MSRS", 22,
                               f"KVM refused MSR {bad:#x} = {self._msrs[bad]:#x} "
                               f"({done} of {len(todo)} written)")
            self._msr_unwritable.add(bad)  # not offered again unless changed
            todo = todo[done + 1:]  # an unchanged MSR KVM will not take back: keep going
        dirty.clear()
        return n

    # --- the hooks' entry points -------------------------------------------------------------

    def invalidate(self) -> None:
        """KVM ran: every group without unpushed writes is stale (fetched on next read)."""
        key = self.cpu.runs
        if key == self._run_key:
            return
        self._run_key = key
        for g in GROUPS:
            if not self._dirty[g]:
                self._valid[g] = False

    @property
    def _sync_all(self) -> bool:
        """gem5's all-or-nothing sync: ``eager`` here or the core's ``always_sync``."""
        return self.eager or bool(getattr(self.cpu, "always_sync", False))

    def pull(self, level: SyncLevel) -> int:
        """``update_thread_context``: lazy (invalidate) or, eager/always_sync, gem5's
        fetch of everything now. Returns the number of ioctls issued."""
        self.invalidate()
        if not self._sync_all:
            return 0
        groups = RUNTIME_GROUPS if level <= SyncLevel.RUNTIME else GROUPS
        n = 0
        for g in groups:
            if not self._valid[g]:
                n += self.fetch(g)
        return n

    def push_dirty(self, level: SyncLevel) -> int:
        """``update_kvm_state``: push dirty groups; FULL (or eager) pushes every valid one
        (eager/always_sync: every group and every MSR). Returns the number of ioctls issued.

        After an IO or MMIO exit KVM completes the access at the next entry (an IN's data
        into RAX, an MMIO read into its register, RIP past the instruction); a register
        write before that completion makes KVM lose the data. So when one is pending and
        something is to be pushed, the access is completed first (a half entry) and the
        host's changes are re-applied on top of what KVM then holds."""
        if self._pushing:
            return 0  # our own half entry: nothing may be written before the completion
        sync_all = self._sync_all
        full = sync_all or level >= SyncLevel.FULL
        n = 0
        if (full or any(self._dirty.values())) and self._access_pending():
            n += self._complete_pending_access()
            if sync_all:  # gem5's always-sync: every group goes back, so read it first
                for g in GROUPS:
                    if not self._valid[g]:
                        n += self.fetch(g)
        for g in GROUPS:
            if self._dirty[g] or (full and self._valid[g]):
                n += self.push(g, all_msrs=sync_all and g == "msrs")
        return n

    def _access_pending(self) -> bool:
        """Whether KVM still has to complete the last IO/MMIO exit at the next entry."""
        return getattr(self.cpu, "status", None) is RUNNING_SERVICE_COMPLETION

    def _complete_pending_access(self) -> int:
        """Complete the pending access with a half entry, then re-read every group the
        host changed and re-apply its changes (the bytes it wrote; the MSRs it set).
        Returns the ioctls issued (the entry included)."""
        changed = {g: (bytes(ffi.buffer(self._base[g], n)), bytes(ffi.buffer(buf, n)))
                   for g, (buf, n) in self._bufs.items() if self._dirty[g]}
        msrs = {i: self._msrs[i] for i in self._msr_dirty} if self._dirty["msrs"] else {}
        self._pushing = True
        try:
            self.cpu.half_entry()
        finally:
            self._pushing = False
        self.completions += 1
        self._discard()
        self._run_key = self.cpu.runs
        n = 1
        for g, (base, mine) in changed.items():
            n += self.fetch(g)
            buf, size = self._bufs[g]
            ffi.memmove(self._base[g], buf, size)
            merged = bytearray(ffi.buffer(buf, size))
            for i in _changed_words(base, mine):
                merged[i:i + 8] = mine[i:i + 8]
            ffi.buffer(buf, size)[:] = bytes(merged)
            self._dirty[g] = True
        if msrs:
            n += self.fetch("msrs")
            self._msrs.update(msrs)
            self._msr_dirty.update(msrs)
            self._dirty["msrs"] = True
        return n

    def fetch_all(self) -> None:
        for g in GROUPS:
            self._need(g)

    def dirty_groups(self) -> list[str]:
        return [g for g in GROUPS if self._dirty[g]]

    def valid_groups(self) -> list[str]:
        return [g for g in GROUPS if self._valid[g]]

    # --- registers ------------------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        if name[0] == "_" or name in _PLAIN_ATTRS or name in _PROPS \
                or self.__dict__.get("_init", True):
            object.__setattr__(self, name, value)
        else:
            raise AttributeError(f"x86 context has no register {name!r}")

    @property
    def pc(self) -> int:
        """The linear address of the next instruction (CS base + RIP)."""
        self._need("regs")
        self._need("sregs")
        return (int(self._sregs.cs.base) + int(self._regs.rip)) & 0xFFFFFFFFFFFFFFFF

    @pc.setter
    def pc(self, value: int) -> None:
        self._need("sregs")
        self.rip = (value - int(self._sregs.cs.base)) & 0xFFFFFFFFFFFFFFFF

    @property
    def gdt(self) -> tuple[int, int]:
        """``(base, limit)``."""
        self._need_w("sregs")
        return int(self._sregs.gdt.base), int(self._sregs.gdt.limit)

    @gdt.setter
    def gdt(self, value: tuple[int, int]) -> None:
        base, limit = _dtable(value, "GDT")
        self._need("sregs")
        self._sregs.gdt.base, self._sregs.gdt.limit = base, limit
        self._touch("sregs")

    @property
    def idt(self) -> tuple[int, int]:
        self._need_w("sregs")
        return int(self._sregs.idt.base), int(self._sregs.idt.limit)

    @idt.setter
    def idt(self, value: tuple[int, int]) -> None:
        base, limit = _dtable(value, "IDT")
        self._need("sregs")
        self._sregs.idt.base, self._sregs.idt.limit = base, limit
        self._touch("sregs")

    @property
    def mode(self) -> str:
        """``real``, ``protected16``, ``protected32``, ``long64``, ``compat`` or ``vm86``."""
        self._need("sregs")
        self._need("regs")
        return mode_of(self._sregs, int(self._regs.rflags))

    def previous_state(self) -> dict[str, Any] | None:
        """Mode, RIP, linear PC, CR0 and CR3 as regs/sregs held before the latest run's
        fetch: an earlier exit's state, or what the host last wrote (None if there was no
        earlier copy). After ``KVM_EXIT_SHUTDOWN`` on AMD SVM, where KVM re-initialises the vCPU,
        this is the last state the host saw of the guest that faulted."""
        self._need("regs")
        self._need("sregs")
        if not (self._has_prev["regs"] and self._has_prev["sregs"]):
            return None
        r, s = self._prev_regs, self._prev_sregs
        return {"mode": mode_of(s, int(r.rflags)), "rip": int(r.rip),
                "pc": (int(s.cs.base) + int(r.rip)) & 0xFFFFFFFFFFFFFFFF,
                "cr0": int(s.cr0), "cr3": int(s.cr3)}

    # --- MSRs --------------------------------------------------------------------------------

    def get_msr(self, index: int) -> int:
        self._need("msrs")
        try:
            return self._msrs[index]
        except KeyError:
            raise StateError(f"MSR {index:#x} is not one KVM lists as supported") from None

    def set_msr(self, index: int, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise StateError(f"MSR value must be an integer, not {type(value).__name__}")
        self._need("msrs")
        if index not in self._msrs:
            raise StateError(f"MSR {index:#x} is not one KVM lists as supported")
        self._msrs[index] = value & 0xFFFFFFFFFFFFFFFF
        self._msr_dirty.add(index)
        self._touch("msrs")

    @property
    def msrs(self) -> dict[int, int]:
        """A copy of every MSR (index -> value)."""
        self._need("msrs")
        return dict(self._msrs)

    # --- XCRs, debug registers, events ----------------------------------------------------------

    @property
    def xcrs(self) -> dict[int, int]:
        self._need("xcrs")
        x = self._xcrs
        return {int(x.xcrs[i].xcr): int(x.xcrs[i].value)
                for i in range(min(int(x.nr_xcrs), len(x.xcrs)))}

    def set_xcr(self, index: int, value: int) -> None:
        index = _uint(index, 32, "XCR index")
        value = _uint(value, 64, f"XCR{index}")
        self._need_w("xcrs")
        x = self._xcrs
        nr = int(x.nr_xcrs)
        cap = len(x.xcrs)
        for i in range(min(nr, cap)):
            if x.xcrs[i].xcr == index:
                x.xcrs[i].value = value
                break
        else:
            if nr >= cap:
                raise StateError(f"no room for XCR{index}: KVM takes at most {cap} XCRs")
            x.xcrs[nr].xcr = index
            x.xcrs[nr].value = value
            x.nr_xcrs = nr + 1
        self._touch("xcrs")

    @property
    def xcr0(self) -> int:
        return self.xcrs.get(0, 1)

    @xcr0.setter
    def xcr0(self, value: int) -> None:
        self.set_xcr(0, value)

    @property
    def dr(self) -> list[int]:
        """DR0-DR3, DR6, DR7."""
        self._need("debugregs")
        d = self._debugregs
        return [int(d.db[0]), int(d.db[1]), int(d.db[2]), int(d.db[3]), int(d.dr6), int(d.dr7)]

    def set_dr(self, n: int, value: int) -> None:
        """Set DR``n`` (0-3, 6 or 7)."""
        value = _uint(value, 64, f"DR{n}")
        self._need_w("debugregs")
        d = self._debugregs
        if n in (0, 1, 2, 3):
            d.db[n] = value
        elif n == 6:
            d.dr6 = value
        elif n == 7:
            d.dr7 = value
        else:
            raise StateError(f"no debug register DR{n}")
        self._touch("debugregs")

    @property
    def events(self) -> dict[str, Any]:
        """Pending/injected exception, interrupt, NMI and the interrupt shadow."""
        self._need("events")
        e = self._events
        return {
            "exception": {k: int(getattr(e.exception, k)) for k in
                          ("injected", "nr", "has_error_code", "pending", "error_code")},
            "interrupt": {k: int(getattr(e.interrupt, k)) for k in
                          ("injected", "nr", "soft", "shadow")},
            "nmi": {k: int(getattr(e.nmi, k)) for k in ("injected", "pending", "masked")},
            "sipi_vector": int(e.sipi_vector),
        }

    def set_event(self, kind: str, **values: int) -> None:
        """E.g. ``set_event("nmi", pending=1)``."""
        widths = EVENT_FIELDS.get(kind)
        if widths is None:
            raise StateError(f"no vCPU event {kind!r} (one of {', '.join(EVENT_FIELDS)})")
        checked = {}
        for k, v in values.items():
            if k not in widths:
                raise StateError(f"vCPU event {kind} has no field {k!r}")
            checked[k] = _uint(v, widths[k], f"{kind}.{k}")
        self._need_w("events")
        target = getattr(self._events, kind)
        for k, v in checked.items():
            setattr(target, k, v)
        self._touch("events")

    # --- x87 / SSE / AVX / AVX-512 (the XSAVE area) -----------------------------------

    @property
    def xsave(self) -> bytes:
        """The raw XSAVE area (standard format)."""
        self._need("xsave")
        return bytes(ffi.buffer(self._xsave, self.info.xsave_size))

    @xsave.setter
    def xsave(self, data: bytes) -> None:
        """Replace the XSAVE area (standard format, at most this host's size; a shorter
        image is zero-extended). A larger image, a compacted one or one carrying
        components this host does not enable is refused (StateError)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StateError(f"an XSAVE image is bytes, not {type(data).__name__}")
        data = bytes(data)
        size = self.info.xsave_size
        if not XS_MIN <= len(data) <= size:
            raise StateError(f"XSAVE image of {len(data)} bytes does not fit this host's "
                             f"XSAVE area ({XS_MIN} to {size} bytes)")
        xstate_bv, xcomp_bv = struct.unpack_from("<QQ", data, XS_HEADER)
        if xcomp_bv:
            raise StateError(f"XSAVE image is in compacted format (XCOMP_BV {xcomp_bv:#x}); "
                             "KVM takes the standard format")
        foreign = xstate_bv & ~self.info.xfeatures
        if foreign:
            raise StateError(f"XSAVE image holds components {foreign:#x} this host does not "
                             f"enable (it enables {self.info.xfeatures:#x})")
        self._need_w("xsave")
        dst = ffi.buffer(self._xsave, size)
        dst[0:len(data)] = data
        dst[len(data):size] = bytes(size - len(data))
        self._touch("xsave")

    def _xs_check(self, off: int, n: int) -> None:
        if off < 0 or n < 0 or off + n > self.info.xsave_size:
            raise StateError(f"{n} bytes at offset {off:#x} are outside this host's "
                             f"{self.info.xsave_size}-byte XSAVE area")

    def _xs_get(self, off: int, n: int) -> bytes:
        self._xs_check(off, n)
        self._need("xsave")
        return bytes(ffi.buffer(self._xsave + off, n))

    def _xs_set(self, off: int, data: bytes, component: int | None = None) -> None:
        self._xs_check(off, len(data))
        self._need_w("xsave")
        ffi.buffer(self._xsave + off, len(data))[:] = data
        if component is not None:
            hdr = ffi.buffer(self._xsave + XS_HEADER, 8)
            bv = struct.unpack("<Q", hdr)[0]
            hdr[:] = struct.pack("<Q", bv | (1 << component))
        self._touch("xsave")

    def _component(self, c: int) -> int:
        try:
            return self.info.xsave_offsets[c][0]
        except KeyError:
            raise StateError(f"XSAVE component {c} is not enabled by this KVM/host") from None

    @property
    def xstate_bv(self) -> int:
        return int.from_bytes(self._xs_get(XS_HEADER, 8), "little")

    @property
    def fcw(self) -> int:
        return int.from_bytes(self._xs_get(XS_FCW, 2), "little")

    @fcw.setter
    def fcw(self, v: int) -> None:
        self._xs_set(XS_FCW, _le(v, 2, "FCW"), 0)

    @property
    def fsw(self) -> int:
        return int.from_bytes(self._xs_get(XS_FSW, 2), "little")

    @property
    def mxcsr(self) -> int:
        return int.from_bytes(self._xs_get(XS_MXCSR, 4), "little")

    @mxcsr.setter
    def mxcsr(self, v: int) -> None:
        self._xs_set(XS_MXCSR, _le(v, 4, "MXCSR"), 1)

    def st(self, i: int) -> bytes:
        """x87 register ST``i`` as its 10-byte extended-precision image (no rounding)."""
        return self._xs_get(XS_ST + 16 * _index(i, 8, "ST"), 10)

    def set_st(self, i: int, raw: bytes) -> None:
        if not isinstance(raw, (bytes, bytearray)) or len(raw) > 10:
            raise StateError("an x87 register image is at most 10 bytes")
        self._xs_set(XS_ST + 16 * _index(i, 8, "ST"), bytes(raw).ljust(10, b"\0"), 0)

    def xmm(self, i: int) -> int:
        """XMM``i`` (0-15) as an unsigned 128-bit integer."""
        return int.from_bytes(self._xs_get(XS_XMM + 16 * _index(i, 16, "XMM"), 16), "little")

    def set_xmm(self, i: int, v: int) -> None:
        self._xs_set(XS_XMM + 16 * _index(i, 16, "XMM"), _le(v, 16, f"XMM{i}"), 1)

    def ymm(self, i: int) -> int:
        """YMM``i`` (0-15): XMM plus the YMM_Hi128 component."""
        hi = self._xs_get(self._component(XC_YMM) + 16 * _index(i, 16, "YMM"), 16)
        return self.xmm(i) | int.from_bytes(hi, "little") << 128

    def set_ymm(self, i: int, v: int) -> None:
        raw = _le(v, 32, f"YMM{i}")
        off = self._component(XC_YMM) + 16 * _index(i, 16, "YMM")
        self._xs_check(off, 16)
        self.set_xmm(i, int.from_bytes(raw[:16], "little"))
        self._xs_set(off, raw[16:], XC_YMM)

    def zmm(self, i: int) -> int:
        """ZMM``i`` (0-31) as an unsigned 512-bit integer."""
        if _index(i, 32, "ZMM") >= 16:
            return int.from_bytes(self._xs_get(self._component(XC_HI16_ZMM) + 64 * (i - 16),
                                               64), "little")
        hi = self._xs_get(self._component(XC_ZMM_HI256) + 32 * i, 32)
        return self.ymm(i) | int.from_bytes(hi, "little") << 256

    def set_zmm(self, i: int, v: int) -> None:
        raw = _le(v, 64, f"ZMM{i}")
        if _index(i, 32, "ZMM") >= 16:
            self._xs_set(self._component(XC_HI16_ZMM) + 64 * (i - 16), raw, XC_HI16_ZMM)
            return
        off = self._component(XC_ZMM_HI256) + 32 * i
        self._xs_check(off, 32)
        self.set_ymm(i, int.from_bytes(raw[:32], "little"))
        self._xs_set(off, raw[32:], XC_ZMM_HI256)

    def opmask(self, k: int) -> int:
        """AVX-512 mask register k``k`` (0-7)."""
        off = self._component(XC_OPMASK) + 8 * _index(k, 8, "k")
        return int.from_bytes(self._xs_get(off, 8), "little")

    def set_opmask(self, k: int, v: int) -> None:
        off = self._component(XC_OPMASK) + 8 * _index(k, 8, "k")
        self._xs_set(off, _le(v, 8, f"k{k}"), XC_OPMASK)

    @property
    def pkru(self) -> int:
        return int.from_bytes(self._xs_get(self._component(XC_PKRU), 4), "little")

    @pkru.setter
    def pkru(self, v: int) -> None:
        self._xs_set(self._component(XC_PKRU), _le(v, 4, "PKRU"), XC_PKRU)

    # --- plain data (checkpoints) ---------------------------------------------------------

    def save(self) -> dict[str, Any]:
        """Every group as plain data."""
        self.fetch_all()
        return {
            "regs": {r: getattr(self, r) for r in (*GPRS, "rip", "rflags")},
            "sregs": {**{s: vars(getattr(self, s)) for s in SEGMENTS},
                      **{c: getattr(self, c) for c in CONTROL},
                      "gdt": list(self.gdt), "idt": list(self.idt)},
            "xsave": self.xsave.hex(),
            "xcrs": {str(k): v for k, v in self.xcrs.items()},
            "msrs": {f"{k:#x}": v for k, v in self._msrs.items()},
            "debugregs": self.dr,
            "events": self.events,
        }

    def load(self, state: dict[str, Any]) -> None:
        """Load :meth:`save` output (every group dirty; pushed before the next entry).

        ``state`` comes from a file: a missing, malformed, out-of-range or foreign part
        raises StateError, and the context then falls back to what KVM holds (nothing
        half-loaded is pushed)."""
        if any(self._dirty.values()):
            self.push_dirty(SyncLevel.RUNTIME)  # so a failed load can fall back to KVM
        self.fetch_all()
        try:
            self._load(state)
        except StateError:
            self._discard()
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            self._discard()
            raise StateError(f"x86 CPU state is malformed: {type(exc).__name__}: "
                             f"{exc}") from None

    def _discard(self) -> None:
        """Drop every unpushed write: each group is read from KVM again on next use."""
        for g in GROUPS:
            self._valid[g] = False
            self._dirty[g] = False
        self._msr_dirty.clear()

    def _load(self, state: dict[str, Any]) -> None:
        regs = state["regs"]
        for k in regs:
            if k not in GPRS and k not in ("rip", "rflags"):
                raise StateError(f"x86 state names no register {k!r}")
        for k, v in regs.items():
            setattr(self, k, _uint(v, 64, k))
        sr = state["sregs"]
        for s in SEGMENTS:
            if not isinstance(sr[s], dict):
                raise StateError(f"segment {s} is not a mapping")
            setattr(self, s, Segment(**sr[s]))
        for c in CONTROL:
            setattr(self, c, _uint(sr[c], 64, c))
        self.gdt = tuple(sr["gdt"])  # type: ignore[assignment]
        self.idt = tuple(sr["idt"])  # type: ignore[assignment]
        xs = state["xsave"]
        if not isinstance(xs, str) or len(xs) > 2 * self.info.xsave_size:
            raise StateError(f"XSAVE image is not a hex string of at most "
                             f"{self.info.xsave_size} bytes")
        self.xsave = bytes.fromhex(xs)
        for k, v in state["xcrs"].items():
            self.set_xcr(int(k), v)
        for k, v in state["msrs"].items():
            index = int(k, 16)
            if index not in self._msrs:
                raise StateError(f"MSR {index:#x} is not one this host's KVM saves and "
                                 "restores (foreign state)")
            if self._msrs[index] != v:
                self.set_msr(index, _uint(v, 64, f"MSR {index:#x}"))
        drs = list(state["debugregs"])
        if len(drs) != 6:
            raise StateError(f"expected 6 debug registers, not {len(drs)}")
        for n, v in zip((0, 1, 2, 3, 6, 7), drs, strict=True):
            self.set_dr(n, v)
        ev = state["events"]
        for kind in ("exception", "interrupt", "nmi"):
            self.set_event(kind, **ev[kind])
        self._events.sipi_vector = _uint(ev["sipi_vector"], 32, "sipi_vector")


def _reg_property(group: str, struct_attr: str, field: str) -> property:
    def get(self: X86Context) -> int:
        self._need(group)
        return int(getattr(getattr(self, struct_attr), field))

    def set_(self: X86Context, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise StateError(f"{field} must be an integer, not {type(value).__name__}")
        self._need_w(group)
        setattr(getattr(self, struct_attr), field, value & U64)
        self._dirty[group] = True
        self.cpu.mark_context_dirty()

    return property(get, set_, doc=f"{field} ({group} group)")


def _seg_property(name: str) -> property:
    def get(self: X86Context) -> Segment:
        self._need("sregs")
        return Segment.from_c(getattr(self._sregs, name))

    def set_(self: X86Context, value: Segment) -> None:
        if not isinstance(value, Segment):
            raise StateError(f"{name} takes a Segment, not {type(value).__name__}")
        self._need_w("sregs")
        value.to_c(getattr(self._sregs, name))
        self._touch("sregs")

    return property(get, set_, doc=f"segment register {name} (a copy; assign to change)")


for _r in (*GPRS, "rip", "rflags"):
    setattr(X86Context, _r, _reg_property("regs", "_regs", _r))
for _c in CONTROL:
    setattr(X86Context, _c, _reg_property("sregs", "_sregs", _c))
for _s in SEGMENTS:
    setattr(X86Context, _s, _seg_property(_s))
_PROPS = frozenset(n for n in dir(X86Context) if isinstance(getattr(X86Context, n), property))
