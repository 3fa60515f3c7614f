"""The compiled exit path (kvmfw.fastpath): each kind of fast exit is taken (stats), the
guest sees the same as with ``fastpath=off``, and kicks, the run timer, events and
signals end or bound a run of fast exits exactly as they do the Python loop."""

from __future__ import annotations

import signal
import threading
from typing import Any

import pytest
from kvmtest import MMIO, PIO, PIOLOOP, needs_kvm

from kvmfw.config import parse_options
from kvmfw.device import Range
from kvmfw.errors import BusError, BusOverlapError
from kvmfw.eventq import TICKS_PER_MS, Event
from kvmfw.fastpath import LIMIT, FastRange, LiveConstant

pytestmark = needs_kvm


class Regs:
    """A device whose registers behave as it declares them: port 0x10 (MMIO +0x30) keeps
    the last value written (coalescible), port 0x11 (MMIO +0x20) reads 0x41 (+0x33),
    port 0x12 (MMIO +0x10) ignores writes, port 0x13 ends the run."""

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self.last: dict[int, bytes] = {}
        self.calls: list[tuple[str, int]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.calls.append(("read", offset))
        return bytes([{1: 0x41, 0x20: 0x33}.get(offset, 0)]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.calls.append(("write", offset))
        if offset == 3:
            self.machine.request_exit(data[0], "guest wrote the exit port")
        elif offset in (0, 0x30):
            self.last[offset] = data


class Out:
    """Ports 0x10-0x13: records what the guest writes; 0x13 ends the run."""

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self.data: list[bytes] = []

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        if offset == 3:
            self.machine.request_exit(0, "done")
        else:
            self.data.append(data)


def _regs_machine(make_machine: Any, program: int, fast: bool, declare: bool = True,
                  mmio: bool = True) -> tuple[Any, Regs]:
    m, _arch, _rec = make_machine(program, options={"fastpath": fast})
    m.bus.pio.unregister(0x10)
    m.bus.mmio.unregister(0x20000)
    dev = Regs(m)
    m.map_device(Range("pio", 0x10, 4, "regs"), dev)
    if mmio:
        m.map_device(Range("mmio", 0x20000, 0x100, "regs-mmio"), dev)
    if declare:
        m.bus.pio.add_fast(FastRange("pio", 0x10, 1, coalesce=True))
        m.bus.pio.add_fast(FastRange("pio", 0x11, 1, constant=b"\x41"))
        m.bus.pio.add_fast(FastRange("pio", 0x12, 1, sink=True))
        if mmio:
            m.bus.mmio.add_fast(FastRange("mmio", 0x20010, 1, sink=True))
            m.bus.mmio.add_fast(FastRange("mmio", 0x20020, 1, constant=b"\x33"))
            m.bus.mmio.add_fast(FastRange("mmio", 0x20030, 2, coalesce=True))
    return m, dev


def test_port_io_fast_paths_are_taken_and_the_guest_sees_the_same(make_machine) -> None:
    seen = {}
    for fast in (True, False):
        m, dev = _regs_machine(make_machine, PIO, fast)
        r = m.run(timeout=20)
        s = m.cpus[0].stats
        seen[fast] = (r.status, dev.last, s.io, s.vm_exits)
        if fast:
            # 'O', 'K' (coalesced), the constant read, 'B' (coalesced) answered in C; the
            # word write to 0x12 is wider than the sink and goes to Python
            assert s.fast_exits == 4
            assert dev.calls == [("write", 0), ("write", 2), ("write", 3)]
        else:
            assert s.fast_exits == 0
            assert ("read", 1) in dev.calls and dev.calls.count(("write", 0)) == 3
    # the guest read 0x41 in both (it wrote back 0x41 + 1 = 'B'); the device's register
    # holds the last write; the same number of exits, each counted once
    assert seen[True] == seen[False] == (0, {0: b"B"}, 6, 6)


def test_a_live_constant_answers_with_its_current_value_and_closed_goes_to_python(
        make_machine) -> None:
    got = {}
    for value in (0x50, None):
        m, dev = _regs_machine(make_machine, PIO, True, declare=False, mmio=False)
        live = LiveConstant(1)
        m.bus.pio.add_fast(FastRange("pio", 0x11, 1, constant=live))
        if value is not None:
            live.set(0, 0x33)
            live.close(0)
            live.set(0, value)
        m.run(timeout=20)
        got[value] = (dev.last, ("read", 1) in dev.calls, m.cpus[0].stats.fast_exits,
                      live.get(0))
    # the guest writes back what it read + 1: 0x50 from C ('Q'); closed, the device's 0x41
    assert got == {0x50: ({0: b"Q"}, False, 1, 0x50), None: ({0: b"B"}, True, 0, None)}
    with pytest.raises(BusError):
        m.bus.pio.add_fast(FastRange("pio", 0x12, 2, constant=LiveConstant(1)))
    with pytest.raises(BusError):
        LiveConstant(0)


def test_mmio_fast_paths_are_taken_and_the_guest_sees_the_same(make_machine) -> None:
    seen = {}
    for fast in (True, False):
        m, dev = _regs_machine(make_machine, MMIO, fast)
        m.bus.pio.unregister(0x10)  # the guest's final "out %al" (the byte it read): record it
        out = Out(m)
        m.map_device(Range("pio", 0x10, 4, "out"), out)
        m.run(timeout=20)
        s = m.cpus[0].stats
        seen[fast] = (out.data, dev.last, s.mmio)
        assert s.fast_exits == (3 if fast else 0)
        if fast:
            assert dev.calls == [("write", 0x30)]  # the coalesced word, delivered by Python
    assert seen[True] == seen[False] == ([b"\x33"], {0x30: b"\x34\x12"}, 3)


def test_unclaimed_accesses_are_answered_in_c_as_the_ignore_policy(make_machine) -> None:
    seen = {}
    for fast in (True, False):
        m, _dev = _regs_machine(make_machine, MMIO, fast, declare=False, mmio=False)
        m.bus.pio.unregister(0x10)
        out = Out(m)
        m.map_device(Range("pio", 0x10, 4, "out"), out)
        m.run(timeout=20)
        s = m.cpus[0].stats
        seen[fast] = (out.data, m.bus.mmio.unclaimed_reads, m.bus.mmio.unclaimed_writes, s.mmio)
        assert s.fast_exits == (3 if fast else 0)
    assert seen[True] == seen[False] == ([b"\xff"], 1, 2, 3)


def test_fatal_policy_and_reserved_ranges_are_never_answered_in_c(make_machine) -> None:
    from kvmfw.errors import UnclaimedAccessError

    m, _dev = _regs_machine(make_machine, MMIO, True, declare=False, mmio=False)
    m.bus.unclaimed = "fatal"
    with pytest.raises(UnclaimedAccessError):
        m.run(timeout=20)
    assert m.cpus[0].stats.fast_exits == 0
    m, _dev = _regs_machine(make_machine, MMIO, True, declare=False, mmio=False)
    m.bus.mmio.reserve(0x20000, 0x100, "arch")
    from kvmfw.fastpath import build_entries
    assert not [e for e in build_entries(m.bus)
                if e.space == "mmio" and e.base < 0x20100 and e.end > 0x20000]


def test_a_long_run_of_fast_exits_returns_to_python_every_limit(make_machine) -> None:
    n = 3 * LIMIT + 10
    m, _arch, rec = make_machine(PIOLOOP)
    m.bus.pio.unregister(0x10)
    dev = Regs(m)
    m.map_device(Range("pio", 0x10, 4, "regs"), dev)
    m.bus.pio.add_fast(FastRange("pio", 0x10, 1, sink=True))
    m.cpus[0].get_context().regs["rcx"] = n
    m.cpus[0].mark_context_dirty()
    r = m.run(timeout=60)
    s = m.cpus[0].stats
    assert r.reason == "guest wrote the exit port"
    assert s.io == n + 1 and s.vm_exits >= n + 1
    # every LIMIT-th answered exit is left to Python (whose bus path drops it the same way)
    assert s.fast_exits >= n - n // LIMIT - 1
    assert dev.calls.count(("write", 0)) == n - s.fast_exits


def _endless_fast_exits(make_machine: Any) -> Any:
    m, _arch, _rec = make_machine(PIOLOOP)
    m.bus.pio.add_fast(FastRange("pio", 0x10, 1, sink=True))
    m.cpus[0].get_context().regs["rcx"] = 0  # dec wraps: 2^32 iterations
    m.cpus[0].mark_context_dirty()
    return m


def test_run_timer_and_events_bound_a_run_of_fast_exits(make_machine) -> None:
    m = _endless_fast_exits(make_machine)
    fired = []
    m.eventq.schedule(Event(lambda: fired.append(m.eventq.cur_tick), "ev"), TICKS_PER_MS)
    # 500 ms: simulated time follows host time, and in the nested environment (TCG below a
    # hardware KVM) a few ms can pass before the guest's first exit
    r = m.run(max_ticks=500 * TICKS_PER_MS, timeout=60)
    assert r.reason == "simulated tick limit reached"
    assert fired == [TICKS_PER_MS]
    assert m.cpus[0].stats.fast_exits > 0


def test_a_kick_from_another_thread_stops_a_run_of_fast_exits(make_machine) -> None:
    m = _endless_fast_exits(make_machine)
    t = threading.Timer(0.3, lambda: m.request_exit(7, "stopped from a thread"))
    t.start()
    try:
        r = m.run(timeout=60)
    finally:
        t.cancel()
    assert (r.status, r.reason) == (7, "stopped from a thread")
    assert m.cpus[0].stats.fast_exits > 0


def test_a_signal_handled_by_python_interrupts_a_run_of_fast_exits(make_machine) -> None:
    m = _endless_fast_exits(make_machine)

    class Alarm(Exception):
        pass

    def handler(signum: int, frame: Any) -> None:
        raise Alarm

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(Alarm):
            m.run(timeout=60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert m.cpus[0].stats.fast_exits > 0


def test_fastpath_option_is_a_core_boolean() -> None:
    assert parse_options(["fastpath=off"], None) == {"fastpath": False}


def test_fast_ranges_are_checked(make_machine) -> None:
    m, _arch, _rec = make_machine(PIO)
    with pytest.raises(BusError, match="not inside"):
        m.bus.pio.add_fast(FastRange("pio", 0x80, 1, sink=True))
    with pytest.raises(BusError, match="exactly size"):
        m.bus.pio.add_fast(FastRange("pio", 0x10, 2, constant=b"\x01"))
    with pytest.raises(BusError, match="exclude"):
        m.bus.pio.add_fast(FastRange("pio", 0x10, 1, sink=True, coalesce=True))
    with pytest.raises(BusError, match="declares nothing"):
        m.bus.pio.add_fast(FastRange("pio", 0x10, 1))
    m.bus.pio.add_fast(FastRange("pio", 0x10, 2, sink=True))
    with pytest.raises(BusOverlapError):
        m.bus.pio.add_fast(FastRange("pio", 0x11, 1, constant=b"\x00"))
    m.bus.pio.unregister(0x10)  # the device goes, and its fast ranges with it
    assert m.bus.pio.fast_ranges() == []


def test_stats_read_during_a_run_include_the_counts_kept_in_c(make_machine) -> None:
    """The C entry counts exits and time; a stats dump from a device mid-run (a guest's
    pseudo-op dump) must see them, and a reset must not leave old counts behind."""
    m, _arch, _rec = make_machine(PIO)
    m.bus.pio.unregister(0x10)
    seen: list[dict[str, int]] = []

    class Dumper(Regs):
        def write(self, offset: int, data: bytes) -> None:
            if offset == 2:  # the 5th exit: the word write
                seen.append(dict(m.stats.snapshot()["system.cpu0"]))
                m.stats.reset()
            super().write(offset, data)

    m.map_device(Range("pio", 0x10, 4, "regs"), Dumper(m))
    m.run(timeout=20)
    assert seen[0]["vm_exits"] == 5 and seen[0]["io"] == 5
    assert seen[0]["host_ns_in_kvm"] > 0
    s = m.cpus[0].stats
    assert (s.vm_exits, s.io) == (1, 1)  # the exit write after the reset
    runs = m.cpus[0].runs
    assert runs >= 6  # never reset: every entry counts


def test_the_c_entry_leaves_the_exit_reason_and_the_simulated_tick_for_the_loop(
        make_machine) -> None:
    """The run loop reads the reason and the tick from the C entry's words instead of the
    cffi fields and Python arithmetic: they must be what those give, and a tick past 64
    bits is -1 (the loop then computes it itself) rather than a wrapped value."""
    from kvmfw.abi import lib
    from kvmfw.fastpath import NOW, REASON, T1

    m, arch, rec = make_machine(PIOLOOP)
    cpu = m.cpus[0]
    cpu.get_context().regs["rcx"] = 5
    cpu.mark_context_dirty()
    m.run(timeout=20)
    ctx, words = cpu._fs.ctx, cpu._fs.words
    assert ctx.ticks_per_ns_int == 1000  # host_factor 1: the C entry computes the tick
    assert words[REASON] == cpu.vcpu.run.exit_reason == 2  # the guest's exit port write
    assert words[T1] == ctx.t1
    assert words[NOW] == ctx.tick0 + (ctx.t1 - ctx.host0) * 1000
    assert m.eventq.cur_tick >= words[NOW]  # (the service after it took time too)
    ctx.tick0, ctx.host0 = (1 << 63) - 5, 0
    assert lib.kvmfw_run_ctx(ctx) >= 0  # one more exit of the guest's loop
    assert words[NOW] == -1  # past 64 bits: the loop computes the tick in Python
    assert words[REASON] == cpu.vcpu.run.exit_reason
