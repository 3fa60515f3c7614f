"""Issue 10, x86 side: state restored from outside data is bounded and typed, always_sync
really syncs (and says how many ioctls it cost), the TSC is never pushed stale, the
userspace irqchip keeps `cli; hlt` halted, the userspace LAPIC takes odd-sized accesses,
and the interrupt model's records are bounded."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import GUESTS, requires_kvm
from kvmfw.device import Range
from kvmfw.errors import StateError
from kvmfw.eventq import Event
from kvmfw.hookspecs import SyncLevel

from kvmfw_x86 import loaders
from kvmfw_x86.context import GROUPS, XS_HEADER
from kvmfw_x86.plugin import X86Plugin

pytestmark = [requires_kvm, pytest.mark.kvm]
HALTED = "all vCPUs halted and no event is pending"
MSR_IA32_TSC = 0x10


def x86(m: Any) -> Any:
    return X86Plugin.state(m.hooks.pm.get_plugin("arch:x86"), m)  # type: ignore[arg-type]


# --- item 1: memory safety on state restore ------------------------------------------------

PRELUDE = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import make_machine
from kvmfw.errors import StateError
m, _ = make_machine()
ctx = m.cpus[0].get_context()

def expect(name, fn):
    try:
        fn()
    except StateError as exc:
        print(name, "StateError", exc)
    except Exception as exc:
        print(name, type(exc).__name__, exc)
    else:
        print(name, "accepted")
"""


def isolated(body: str) -> list[str]:
    """Run ``body`` in a child: on the old code these cases wrote (or read) far outside
    their buffer, and a crash must fail the test, not end the test run."""
    # cwd "/": "python -c" puts the working directory first on sys.path, and a source
    # checkout there would shadow the installed (compiled) kvmfw
    r = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                       capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    return r.stdout.splitlines()


def test_oversized_state_is_a_state_error_not_a_crash() -> None:
    """A 1 MiB XSAVE image once sized the write into the 4 KiB buffer (heap corruption,
    a segfault); so did an XMM index, and a ONE_REG id's 32 KiB size field."""
    out = isolated("""
        before = ctx.xsave
        state = ctx.save()
        expect("xsave-1MiB", lambda: setattr(ctx, "xsave", b"\\xff" * (1 << 20)))
        expect("xsave+1", lambda: setattr(ctx, "xsave", before + b"\\0"))
        expect("load-1MiB", lambda: ctx.load({**state, "xsave": "ff" * (1 << 20)}))
        expect("xmm-index", lambda: ctx.xmm(100000))
        expect("st-index", lambda: ctx.st(-3))
        huge = 0x6030_0000_0000_0000 | (0xF << 52)
        expect("one-reg-set", lambda: m.cpus[0].vcpu.set_one_reg(huge, 1))
        expect("one-reg-get", lambda: m.cpus[0].vcpu.get_one_reg(huge))
        assert ctx.xsave == before
        print("intact")
        m.close()
    """)
    assert out[-1] == "intact"
    results = {line.split()[0]: line.split(None, 2)[1:] for line in out[:-1]}
    assert len(results) == 7
    for name, (kind, *_) in results.items():
        assert kind == "StateError", (name, results[name])
    assert "XSAVE image of 1048576 bytes" in " ".join(results["xsave-1MiB"])


def test_xsave_images_that_are_not_this_hosts_are_refused(machine_factory) -> None:
    m, _ = machine_factory()
    ctx = m.cpus[0].get_context()
    good = ctx.xsave
    size = ctx.info.xsave_size
    with pytest.raises(StateError, match="does not fit"):
        ctx.xsave = good[:100]
    compacted = bytearray(good)
    compacted[XS_HEADER + 15] = 0x80  # XCOMP_BV bit 63
    with pytest.raises(StateError, match="compacted"):
        ctx.xsave = bytes(compacted)
    foreign = bytearray(good)
    foreign[XS_HEADER + 7] = 0x40  # XSTATE_BV bit 62: no host enables it
    with pytest.raises(StateError, match="does not enable"):
        ctx.xsave = bytes(foreign)
    with pytest.raises(StateError):
        ctx.xsave = "00" * 600  # type: ignore[assignment]
    assert ctx.xsave == good and len(good) == size
    # a shorter (older host's) image is taken and zero-extended
    ctx.xsave = good[:4096 if size > 4096 else 1024]
    assert len(ctx.xsave) == size


def test_register_indexes_and_values_are_bounded(machine_factory) -> None:
    """Each of these once wrote outside its buffer (an index past the XSAVE area) or
    escaped as a cffi OverflowError/IndexError."""
    from kvmfw_x86.context import Segment

    m, _ = machine_factory()
    ctx = m.cpus[0].get_context()
    xs = ctx.xsave
    bad: list[tuple[str, Any]] = [
        ("set_xmm", lambda: ctx.set_xmm(16, 1)), ("set_xmm<0", lambda: ctx.set_xmm(-1, 1)),
        ("set_xmm big", lambda: ctx.set_xmm(0, 1 << 128)),
        ("set_xmm neg", lambda: ctx.set_xmm(0, -1)),
        ("set_st", lambda: ctx.set_st(8, b"\1")),
        ("set_st long", lambda: ctx.set_st(0, bytes(11))),
        ("set_zmm", lambda: ctx.set_zmm(32, 1)), ("set_opmask", lambda: ctx.set_opmask(9, 1)),
        ("fcw", lambda: setattr(ctx, "fcw", 1 << 16)),
        ("mxcsr", lambda: setattr(ctx, "mxcsr", -1)),
        ("dr", lambda: ctx.set_dr(0, 1 << 64)), ("dr5", lambda: ctx.set_dr(5, 0)),
        ("gdt", lambda: setattr(ctx, "gdt", (0, 0x10000))),
        ("idt", lambda: setattr(ctx, "idt", (0,))),
        ("event kind", lambda: ctx.set_event("smi", pending=1)),
        ("event field", lambda: ctx.set_event("nmi", nosuch=1)),
        ("event value", lambda: ctx.set_event("nmi", pending=256)),
        ("segment", lambda: setattr(ctx, "cs", Segment(limit=1 << 32))),
        ("segment type", lambda: setattr(ctx, "cs", "flat")),
        ("rax", lambda: setattr(ctx, "rax", "1")),
        ("msr value", lambda: ctx.set_msr(0xC0000102, 1.5)),
        ("xcr index", lambda: ctx.set_xcr(1 << 32, 1)),
    ]
    for name, fn in bad:
        with pytest.raises(StateError):
            fn()
        assert ctx.xsave == xs, name
    cs = ctx.cs
    assert cs.limit != 1 << 32
    # XCRs: at most the 16 KVM's struct holds
    with pytest.raises(StateError, match="at most 16"):
        for i in range(1, 40):
            ctx.set_xcr(i, 0)


def test_malformed_or_foreign_checkpoint_state_is_refused_and_rolled_back(
        machine_factory) -> None:
    m, _ = machine_factory()
    cpu = m.cpus[0]
    ctx = cpu.get_context()
    ctx.rip = 0x1234
    good = ctx.save()

    def variant(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
        import copy

        st = copy.deepcopy(good)
        d = st
        for k in path[:-1]:
            d = d[k]
        if value is KeyError:
            del d[path[-1]]
        else:
            d[path[-1]] = value
        return st

    cases = [
        (("xsave",), "zz"),
        (("regs", "_xsave"), 0),  # would have replaced the context's own buffer
        (("regs", "cpu"), 0),
        (("regs", "rip"), 1 << 64),
        (("regs",), KeyError),
        (("sregs", "cs", "limit"), 1 << 40),
        (("sregs", "cs", "bogus"), 1),
        (("sregs", "gdt"), [0, 1, 2]),
        (("xcrs",), {str(i): 0 for i in range(40)}),
        (("msrs", "0x4b564dff"), 5),  # not one this host's KVM lists
        (("msrs", "zz"), 5),
        (("debugregs",), [0] * 7),
        (("events", "nmi", "pending"), 300),
        (("events", "sipi_vector"), -1),
        (("events",), "none"),
    ]
    for path, value in cases:
        ctx.rip = 0x1234
        cpu.sync_kvm_state()
        with pytest.raises(StateError):
            ctx.load(variant(path, value))
        assert ctx.dirty_groups() == [], path  # nothing half-loaded left to push
        assert ctx.rip == 0x1234, path
        assert ctx.xsave.hex() == good["xsave"], path
    ctx.load(good)
    cpu.sync_kvm_state(SyncLevel.FULL)
    assert ctx.rip == 0x1234


def test_one_reg_size_is_bounded_by_the_buffer(machine_factory) -> None:
    """The id's size field (up to 32 KiB) once sized the copy into a 256-byte buffer (the
    crashing cases are in test_oversized_state_is_a_state_error_not_a_crash)."""
    m, _ = machine_factory()
    v = m.cpus[0].vcpu
    u64 = 0x6030_0000_0000_0000
    with pytest.raises(StateError, match="larger"):
        v.get_one_reg(u64 | (9 << 52))  # 512 bytes
    with pytest.raises(StateError, match="does not fit"):
        v.set_one_reg(u64, 1 << 64)
    with pytest.raises(StateError, match="does not fit"):
        v.set_one_reg(u64, -1)


# --- item 6: always_sync syncs for real and counts ioctls -----------------------------------

def test_always_sync_reads_and_writes_every_group_at_every_exit(machine_factory) -> None:
    m, rep = machine_factory()
    loaders.load(m, str(GUESTS / "long64.elf"), {})
    cpu = m.cpus[0]
    cpu.always_sync = True
    ctx = cpu.context
    got0, set0 = ctx.ioctls_get, ctx.ioctls_set
    m.run(timeout=30)
    assert rep.values[:2] == [1548008755920 & 0xFFFFFFFF, 1548008755920 >> 32]
    exits = cpu.stats.vm_exits
    assert exits >= 4
    for g in GROUPS:
        assert ctx.fetches[g] >= exits, (g, ctx.fetches)
        assert ctx.pushes[g] >= exits - 1, (g, ctx.pushes)
    per_group = len(GROUPS) - sum(not f for f in (ctx.info.has_xcrs, ctx.info.has_debugregs,
                                                    ctx.info.has_events))
    assert ctx.ioctls_get - got0 >= exits * per_group
    assert ctx.ioctls_set - set0 >= (exits - 1) * per_group


class TouchyUart:
    """A 16550 stand-in whose LSR read (an IN the guest polls) also writes a register of
    the CPU, as a debugger or an exit handler may: a register push before KVM completed
    the IN once lost the IN's data (the guest then polled forever)."""

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self.out = bytearray()
        self.touches = 0

    def read(self, offset: int, size: int) -> bytes:
        if offset == 5:
            ctx = self.machine.cpus[0].get_context()
            ctx.rbp = ctx.rbp ^ 1  # unused by the guest's print loop
            ctx.set_dr(0, 0x1000 + self.touches)
            self.touches += 1
            return b"\x60"
        return b"\0"

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0:
            self.out += data


@pytest.mark.parametrize("always_sync", [False, True])
def test_register_writes_during_an_in_exit_keep_its_data(machine_factory,
                                                         always_sync: bool) -> None:
    """The default guest polls the UART's LSR with ``in``. A push during that exit must
    wait for KVM to complete the IN (half entry), then re-apply the host's changes. With
    always_sync every exit pushes every group, so this is also its end-to-end test."""
    m, _ = machine_factory()
    cpu = m.cpus[0]
    cpu.always_sync = always_sync
    uart = TouchyUart(m)
    m.map_device(Range("pio", 0x3F8, 8, "uart"), uart)
    path = m.hooks.call("default_guest", machine=m)
    assert m.hooks.call("load_guest", machine=m, image=path, options={"cmdline": "quiet"})
    r = m.run(timeout=30)
    assert r.status == 0
    assert "Hello from kvmfw" in uart.out.decode() and "exiting" in uart.out.decode()
    ctx = cpu.get_context()
    assert uart.touches > 50 and ctx.completions >= uart.touches
    assert ctx.dr[0] == 0x1000 + uart.touches - 1  # the host's last write went in


def test_sync_hooks_return_the_ioctls_they_issued(machine_factory) -> None:
    m, _ = machine_factory()
    plugin = m.hooks.pm.get_plugin("arch:x86")
    cpu = m.cpus[0]
    ctx = cpu.get_context()
    assert plugin.update_kvm_state(cpu, ctx, SyncLevel.RUNTIME) == 0  # nothing dirty
    ctx.rax = 5
    assert plugin.update_kvm_state(cpu, ctx, SyncLevel.RUNTIME) == 1  # KVM_SET_REGS
    assert plugin.update_thread_context(cpu, ctx, SyncLevel.FULL) == 0  # lazy: invalidate
    cpu.always_sync = True
    cpu.runs += 1  # as if KVM ran: every group is stale
    info = ctx.info
    every = 3 + sum(map(bool, (info.msr_indices, info.has_xcrs, info.has_debugregs,
                               info.has_events)))
    assert plugin.update_thread_context(cpu, ctx, SyncLevel.FULL) == every
    # the first full MSR write learns which MSRs KVM will not take back (one more ioctl)
    assert every <= plugin.update_kvm_state(cpu, ctx, SyncLevel.FULL) <= every + 2
    cpu.runs += 1
    assert plugin.update_thread_context(cpu, ctx, SyncLevel.FULL) == every
    assert plugin.update_kvm_state(cpu, ctx, SyncLevel.FULL) == every


# --- item 10: TSC, XSAVE2, cli;hlt, LAPIC access sizes, bounded records ---------------------

class SlowPort:
    """Port 0xe8: each write reads the CPU's context (as a debugger or exit handler does:
    eager sync then pulls every group) and costs ``delay`` seconds of service time."""

    def __init__(self, machine: Any, delay: float) -> None:
        self.machine = machine
        self.delay = delay

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        ctx = self.machine.cpus[0].get_context()
        ctx.rbx = ctx.rbx  # a write: the context is pushed before the next entry
        time.sleep(self.delay)


def spy_msr_writes(cpu: Any) -> list[int]:
    """Record the index of every MSR the context writes with KVM_SET_MSRS."""
    from kvmfw_x86.abi import X, ffi

    written: list[int] = []
    real = cpu.vcpu.ioctl

    def ioctl(request: int, arg: int = 0, detail: str = "") -> int:
        if request == X.KVM_SET_MSRS:
            hdr = ffi.cast("struct kvm_msrs *", arg)
            ents = ffi.cast("struct kvm_msr_entry *", arg + ffi.sizeof("struct kvm_msrs"))
            written.extend(int(ents[i].index) for i in range(int(hdr.nmsrs)))
        return real(request, arg, detail)

    cpu.vcpu.ioctl = ioctl
    return written


@pytest.mark.parametrize("mode", ["eager", "always_sync"])
def test_tsc_is_never_pushed_back_under_eager_sync(machine_factory, mode: str) -> None:
    """The guest's TSC keeps counting while the host services an exit (host TSC plus
    KVM's offset): a value fetched at the exit is stale by the service time, and pushing
    it back (as eager sync's all-MSR push did) sets the guest's TSC backwards. (This
    host's KVM absorbs a host write within 1 s of the expected value, so the guest's
    delta cannot show it here; the MSRs written can.)"""
    m, rep = machine_factory(**({"x86_sync": "eager"} if mode == "eager" else {}))
    cpu = m.cpus[0]
    cpu.always_sync = mode == "always_sync"
    delay = 0.3
    m.map_device(Range("pio", 0xE8, 1, "slow"), SlowPort(m, delay))
    loaders.load(m, str(GUESTS / "hw64.elf"), {})
    cpu.get_context().rbx = 0
    written = spy_msr_writes(cpu)
    m.run(timeout=60)
    assert cpu.context.pushes["msrs"] >= 1 and len(written) > 5  # every MSR, but...
    assert MSR_IA32_TSC not in written  # ... not the TSC nobody changed
    lo, hi = rep.values[:2]
    delta = lo | hi << 32
    khz = x86(m).tsc_khz
    assert delta >= delay * khz * 1000 * 0.9, (delta, khz)  # the service time is in it
    # the TSC is still pushed when the host sets it
    ctx = cpu.get_context()
    ctx.set_msr(MSR_IA32_TSC, 1 << 40)
    cpu.sync_kvm_state()
    assert MSR_IA32_TSC in written
    assert cpu.get_context().get_msr(MSR_IA32_TSC) >= 1 << 40


def test_xsave2_size_is_asked_of_the_vm_fd(machine_factory) -> None:
    """KVM_CAP_XSAVE2's size depends on the VM (guest XSTATE permissions): the system fd's
    answer can be too small for what KVM_GET_XSAVE2 then writes."""
    from kvmfw.abi import Cap

    m, _ = machine_factory()
    st = x86(m)
    st._info = None
    real_vm, real_sys = m.vm.check_extension, m.kvm.check_extension
    seen: list[str] = []

    def vm_ext(cap: int) -> int:
        if cap == Cap.XSAVE2:
            seen.append("vm")
            return 8192
        return real_vm(cap)

    def sys_ext(cap: int) -> int:
        if cap == Cap.XSAVE2:
            seen.append("system")
            return 4096
        return real_sys(cap)

    m.vm.check_extension = vm_ext  # type: ignore[method-assign]
    m.kvm.check_extension = sys_ext  # type: ignore[method-assign]
    try:
        info = st.cpu_info(m.cpus[0].vcpu)
    finally:
        m.vm.check_extension = real_vm  # type: ignore[method-assign]
        m.kvm.check_extension = real_sys  # type: ignore[method-assign]
    assert seen == ["vm"] and info.xsave_size == 8192


def test_tsc_rate_comes_from_kvm_or_a_measurement_never_cpu_mhz(machine_factory,
                                                              monkeypatch) -> None:
    """``cpu MHz`` is the core's current clock (it scales), not the TSC rate."""
    from kvmfw_x86 import plugin as plugin_mod

    m, _ = machine_factory()
    src = plugin_mod.plugin.get_host_cycles(m.cpus[0])
    assert src.frequency_hz == x86(m).tsc_khz * 1000 and "KVM_GET_TSC_KHZ" in src.note
    # without KVM's answer: measured against CLOCK_MONOTONIC, and the note says why
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "cpu MHz\t\t: 1.000\n")
    khz, why = plugin_mod.host_tsc_khz()
    assert abs(khz - x86(m).tsc_khz) < x86(m).tsc_khz * 0.1, (khz, why)
    assert "measured" in why


def test_cli_hlt_stays_halted_until_nmi_with_userspace_irqchip(machine_factory) -> None:
    m, rep = machine_factory(irqchip="userspace")
    loaders.load(m, str(GUESTS / "clihlt.bin"), {"load_addr": 0x7C00})
    line = m.irq(0)
    st, cpu, eq = x86(m), m.cpus[0], m.eventq
    assert m.run(timeout=10).reason == HALTED and rep.values == []  # cli; hlt
    eq.schedule(Event(line.pulse, "timer"), eq.cur_tick + 1_000_000_000)
    assert m.run(timeout=10).reason == HALTED
    assert rep.values == [] and cpu.halted  # a masked interrupt does not end a hlt
    eq.schedule(Event(lambda: st.interrupts.nmi(0), "nmi"), eq.cur_tick + 1_000_000_000)
    r = m.run(timeout=10)
    assert r.reason == "reporter: guest done"
    assert rep.values == [2, 0x55, 0x20]  # NMI, past the hlt, then the vector after sti


def test_cli_hlt_stays_halted_when_the_interrupt_is_already_pending(machine_factory) -> None:
    """The vector is queued before the guest halts (core: ``interrupt_pending`` at HLT)."""
    m, rep = machine_factory(irqchip="userspace")
    loaders.load(m, str(GUESTS / "clihlt.bin"), {"load_addr": 0x7C00})
    st, cpu = x86(m), m.cpus[0]
    st.interrupts.post(0, 0x20)
    assert m.run(timeout=10).reason == HALTED
    assert rep.values == [] and cpu.halted
    st.interrupts.nmi(0)
    assert m.run(timeout=10).reason == "reporter: guest done"
    assert rep.values == [2, 0x55, 0x20]


def test_eight_byte_lapic_read_is_answered_not_fatal(machine_factory) -> None:
    m, rep = machine_factory(irqchip="userspace")
    loaders.load(m, str(GUESTS / "hw64.elf"), {})
    m.cpus[0].get_context().rbx = 1
    r = m.run(timeout=30)
    assert r.reason == "reporter: guest done"
    assert rep.values == [0, 0, 0x00050014]  # 8 bytes read as 0 (as QEMU), then VERSION


def test_lapic_odd_accesses_are_ignored(machine_factory) -> None:
    m, _ = machine_factory(irqchip="userspace")
    lapics = x86(m).lapics
    assert lapics is not None
    assert lapics.read(0x30, 8) == bytes(8)
    assert lapics.read(0x32, 4) == bytes(4)  # crosses the 32-bit register
    assert lapics.read(0x30, 4) == (0x00050014).to_bytes(4, "little")
    assert lapics.read(0x31, 1) == b"\x00"
    lapics.write(0x300, bytes(8))  # an 8-byte ICR write: ignored, sends nothing
    lapics.write(0x80, b"")
    assert lapics.ipis_sent == 0
    assert lapics.read(0x10_0000, 4) == bytes(4)  # past the last CPU's page


def test_interrupt_and_ipi_records_are_bounded(machine_factory) -> None:
    """A guest sending IPIs forever once grew two lists (and the pending queue) without
    bound; the APIC's IRR holds a vector at most once."""
    from kvmfw_x86.interrupts import RECORD_LIMIT

    m, _ = machine_factory(irqchip="userspace", cpus=2)
    st = x86(m)
    lapics = st.lapics
    n = 3 * RECORD_LIMIT
    for i in range(n):
        lapics.send_ipi(0, 0x30 + i % 4, 1 << 24)  # fixed, physical, to CPU 1
    assert len(lapics.ipis) == RECORD_LIMIT and lapics.ipis_sent == n
    assert sorted(st.interrupts.pending[1]) == [0x30, 0x31, 0x32, 0x33]
    for _ in range(n):
        st.interrupts.nmi(1)
    assert st.interrupts.nmis[1] <= 2


def test_cpuid_options_and_tables_are_checked() -> None:
    """CPUID model values from a config, and the table's size and values, are checked
    before KVM or cffi sees them (a cffi OverflowError once escaped for ``--cpus 1000``)."""
    from kvmfw.errors import ConfigError

    from kvmfw_x86.cpuid import CpuidEntry, CpuidModel, for_vcpu, pack_cpuid2

    for bad in ({"family": "six"}, {"model": 0x100}, {"stepping": -1}, {"mask": [1]},
                {"vendor": 12}, {"brand": ["x"]}):
        with pytest.raises(ConfigError):
            CpuidModel.from_options(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="12 characters"):
        CpuidModel(vendor="GenuineIntél").apply([CpuidEntry(0, 0, 0, 0xD, 0, 0, 0)])
    assert CpuidModel.from_options({"family": "0x6", "model": 85}) == CpuidModel(
        family=6, model=85)
    leaf1 = [CpuidEntry(1, 0, 0, 0x806F8, 0x800, 0, 0)]
    e = for_vcpu(leaf1, 1000, 1024)[0]
    assert e.ebx >> 24 == 1000 & 0xFF and (e.ebx >> 16) & 0xFF == 0xFF
    pack_cpuid2(for_vcpu(leaf1, 1000, 1024))  # fits
    with pytest.raises(ConfigError, match="at most 256"):
        pack_cpuid2(leaf1 * 257)
    with pytest.raises(ConfigError, match="32-bit"):
        pack_cpuid2([CpuidEntry(1, 0, 0, 1 << 32, 0, 0, 0)])


def test_host_changes_are_merged_by_whole_fields() -> None:
    """After completing a pending access the host's writes are re-applied per 8-byte
    field, never byte by byte (a RIP the host set must not mix with KVM's)."""
    from kvmfw_x86.context import _changed_words

    base = (0x1234).to_bytes(8, "little") + bytes(8)
    mine = (0x1299).to_bytes(8, "little") + bytes(7) + b"\1"
    assert _changed_words(base, mine) == [0, 8]
    assert _changed_words(base, base) == []
    assert _changed_words(bytes(12), bytes(11) + b"\1") == [8]


def test_illegal_ipi_vectors_and_irq_lines_are_refused(machine_factory) -> None:
    """Vectors 0-15 are not deliverable (the sender's ESR says so; KVM_INTERRUPT would
    have injected them as exceptions); an IRQ line past vector 255 is a config error
    (KVM_INTERRUPT once refused it mid-run)."""
    from kvmfw.errors import ConfigError

    from kvmfw_x86.lapic import APIC_ESR, ESR_SEND_ILLEGAL

    m, _ = machine_factory(irqchip="userspace", cpus=2)
    st = x86(m)
    st.lapics.send_ipi(0, 0x05, 1 << 24)  # fixed, vector 5, to CPU 1
    assert not st.interrupts.pending.get(1) and st.lapics.ipis_sent == 0
    assert st.lapics.regs[0][APIC_ESR] & ESR_SEND_ILLEGAL
    for bad in ((224,), (-1,), (0, 2)):
        with pytest.raises(ConfigError):
            st.interrupts.line(*bad)
    st.interrupts.line(0xDF)  # vector 0xFF: the last one


def test_tsc_rate_fallback_says_why() -> None:
    from types import SimpleNamespace

    from kvmfw.errors import KvmError

    from kvmfw_x86.plugin import vcpu_tsc_khz

    def fails(*a: Any) -> int:
        raise KvmError("KVM_GET_TSC_KHZ", 25)

    khz, why = vcpu_tsc_khz(SimpleNamespace(ioctl=fails))
    assert khz > 0 and "measured" in why and "ENOTTY" in why
    khz, why = vcpu_tsc_khz(SimpleNamespace(ioctl=lambda *a: 0))
    assert khz > 0 and "gave 0" in why


def test_in_kernel_lapic_and_mp_state_round_trip_and_are_checked(machine_factory) -> None:
    """With the in-kernel irqchip the vCPU's local APIC and MP state are part of its
    state; a restore checks their size and range before KVM sees them."""
    import copy

    from kvmfw_x86.abi import X, addr, ffi

    m, _ = machine_factory(irqchip="kernel")
    cpu = m.cpus[0]
    loaders.load(m, str(GUESTS / "long64.elf"), {})

    def lapic_tpr(value: int | None = None) -> int:
        st = ffi.new("struct kvm_lapic_state *")
        cpu.vcpu.ioctl(X.KVM_GET_LAPIC, addr(st))
        if value is not None:
            st.regs[0x80] = bytes([value])
            cpu.vcpu.ioctl(X.KVM_SET_LAPIC, addr(st))
        return ffi.buffer(st.regs)[0x80][0]

    lapic_tpr(0x30)
    state = m.hooks.call("save_arch_state", cpu=cpu)
    assert len(state["lapic"]) == 2048 and isinstance(state["mp_state"], int)
    lapic_tpr(0x50)
    assert m.hooks.call("restore_arch_state", cpu=cpu, state=state)
    assert lapic_tpr() == 0x30
    for key, value in (("lapic", "00" * 4096), ("lapic", "zz" * 1024), ("lapic", 5),
                       ("mp_state", 99), ("mp_state", "halted")):
        bad = copy.deepcopy(state)
        bad[key] = value
        with pytest.raises(StateError):
            m.hooks.call("restore_arch_state", cpu=cpu, state=bad)
    with pytest.raises(StateError):
        m.hooks.call("restore_arch_state", cpu=cpu, state=["not", "a", "mapping"])
    m2, _ = machine_factory(irqchip="userspace")
    with pytest.raises(StateError, match="userspace irqchip"):
        m2.hooks.call("restore_arch_state", cpu=m2.cpus[0], state=state)


def test_state_kvm_refuses_is_rolled_back_not_left_queued(machine_factory) -> None:
    """Found by test_state_fuzz: a restored MSR value KVM refuses (0x259 in
    MSR_KVM_POLL_CONTROL) once stayed dirty, so every later push and load failed too."""
    m, rep = machine_factory()
    loaders.load(m, str(GUESTS / "long64.elf"), {})
    cpu = m.cpus[0]
    good = m.hooks.call("save_arch_state", cpu=cpu)
    if "0x4b564d05" not in good["msrs"]:
        pytest.skip("this KVM has no MSR_KVM_POLL_CONTROL (Linux < 5.3)")
    bad = {**good, "msrs": {**good["msrs"], "0x4b564d05": 0x259},
           "regs": {**good["regs"], "rip": 0x4321}}
    with pytest.raises(StateError, match="KVM refused"):
        m.hooks.call("restore_arch_state", cpu=cpu, state=bad)
    ctx = cpu.get_context()
    assert ctx.dirty_groups() == [] and ctx.rip == good["regs"]["rip"]
    # the context is not poisoned: a user write KVM refuses is dropped after its error
    from kvmfw.errors import KvmError

    ctx.set_msr(0x4B564D05, 0x259)
    with pytest.raises(KvmError):
        cpu.sync_kvm_state()
    assert ctx.dirty_groups() == []
    assert m.run(timeout=30).reason == "reporter: guest done"
    assert rep.values[:2] == [1548008755920 & 0xFFFFFFFF, 1548008755920 >> 32]
