"""The KvmCPU run loop on real guests: exits, lazy sync, time, and every way a run ends."""

from __future__ import annotations

import errno
import logging
import sys
from typing import Any

import pytest
from kvmtest import (
    COUNT,
    EMUFAIL,
    HALT,
    MMIO,
    PIO,
    PIOLOOP,
    SPIN,
    SYNC,
    TRIPLE,
    Recorder,
    needs_kvm,
)

from kvmfw.abi import ExitReason
from kvmfw.bus import PendingAccess
from kvmfw.cpu import CpuStatus
from kvmfw.device import Range
from kvmfw.errors import (
    DeviceError,
    EmulationFailureError,
    EntryFailureError,
    GuestExceptionError,
    InternalKvmError,
    PluginHookError,
    RunTimeoutError,
    TripleFaultError,
    UnhandledExitError,
)
from kvmfw.eventq import TICKS_PER_MS, Event
from kvmfw.hookspecs import SyncLevel

pytestmark = needs_kvm


def test_port_io_reaches_the_device_and_in_data_reaches_the_guest(make_machine) -> None:
    m, arch, rec = make_machine(PIO)
    result = m.run(timeout=10)
    assert (result.status, result.reason) == (0, "guest wrote the exit port")
    # 'O', 'K', then the byte read from port 0x11 (0x41) plus one, then a 16-bit write
    assert rec.writes == [(0, b"O"), (0, b"K"), (0, b"B"), (2, b"\xef\xbe")]
    assert rec.reads == [(1, 1)]
    stats = m.cpus[0].stats
    assert stats.io == 6 and stats.vm_exits == 6 and stats.mmio == 0


def test_mmio_reads_and_writes_go_through_the_bus(make_machine) -> None:
    m, arch, rec = make_machine(MMIO)
    m.run(timeout=10)
    assert rec.writes == [(0x10, b"\x5a"), (0x30, b"\x34\x12"), (0, b"\x33")]
    assert (0x20, 1) in rec.reads
    assert m.cpus[0].stats.mmio == 3


# --- bus accesses the run loop services in its own frame (an address the bus has cached) --

_CACHED = {"mmio": (0x20010, 0x20020, 0x20030),  # the MMIO program's write, read, word write
           "pio": (0x10, 0x11, 0x12, 0x13)}  # the PIO program's ports


class _Odd:
    """The test programs' device, answering as ``mode`` says; records who called it. On
    port IO, a write at offset 3 ends the run (the programs' exit port)."""

    def __init__(self, machine: Any, mode: str, space: str) -> None:
        self.machine, self.mode, self.space = machine, mode, space
        self.log: list[tuple[str, int, bytes | int]] = []
        self.callers: list[str] = []
        self.pending: list[PendingAccess] = []

    def _later(self, p: PendingAccess, data: bytes = b"") -> PendingAccess:
        self.pending.append(p)
        eq = self.machine.eventq
        eq.schedule(Event(lambda: p.complete(data), "late"), eq.cur_tick + TICKS_PER_MS)
        return p

    def read(self, offset: int, size: int) -> Any:
        self.callers.append(sys._getframe(1).f_code.co_name)
        self.log.append(("r", offset, size))
        if self.mode == "raise":
            raise ValueError("no such register")
        if self.mode == "short":
            return b"\x33" * (size + 1)
        if self.mode == "bytearray":
            return bytearray(b"\x44" * size)
        if self.mode == "pending":
            return self._later(PendingAccess(size), b"\x55" * size)
        return b"\x33" * size

    def write(self, offset: int, data: bytes) -> Any:
        self.callers.append(sys._getframe(1).f_code.co_name)
        self.log.append(("w", offset, data))
        if self.space == "pio" and offset == 3:
            self.machine.request_exit(data[0], "guest wrote the exit port")
        elif self.mode == "pending":
            return self._later(PendingAccess(len(data), is_write=True))
        return None


def _run_odd(make_machine: Any, space: str, mode: str, how: str) -> tuple[Any, _Odd, Any, Any]:
    """Run the MMIO or PIO program against an :class:`_Odd` device: ``how`` is "loop" (the
    bus has the addresses cached: the loop services them), "handler" (not cached: the exit
    handler and the bus do) or "traced" (cached, but IO tracing puts its own handlers in
    the exit table). Port IO goes straight to the bus (``direct_port_io``)."""
    m, arch, rec = make_machine(MMIO if space == "mmio" else PIO)
    base = 0x20000 if space == "mmio" else 0x10
    m.bus.space(space).unregister(base)
    dev = _Odd(m, mode, space)
    m.map_device(Range(space, base, 0x100 if space == "mmio" else 4, "odd"), dev)
    m.cpus[0].direct_port_io = True
    if how != "handler":
        for a in _CACHED[space]:
            m.bus.space(space).lookup(a)  # (fills the bus's cache, as an earlier access would)
    io = logging.getLogger("kvmfw.io")
    level = io.level
    if how == "traced":
        io.setLevel(logging.DEBUG)
    try:
        result: Any = m.run(timeout=10)
    except DeviceError as exc:
        result = exc
    finally:
        io.setLevel(level)
    return m, dev, rec, result


@pytest.mark.parametrize("mode", ["plain", "bytearray", "pending", "raise", "short"])
@pytest.mark.parametrize("space", ["mmio", "pio"])
def test_an_access_the_loop_services_looks_the_same_to_the_guest_and_the_device(
        make_machine, space: str, mode: str) -> None:
    seen = {}
    for how in ("loop", "handler", "traced"):
        m, dev, rec, result = _run_odd(make_machine, space, mode, how)
        cpu = m.cpus[0]
        outcome = (f"{type(result).__name__}: {result}" if isinstance(result, Exception)
                   else (result.status, result.reason))
        seen[how] = (outcome, dev.log, rec.writes, cpu.get_context().regs["rax"] & 0xFFFF,
                     cpu.stats.mmio, cpu.stats.io, cpu.stats.mmio_pending,
                     [p.done for p in dev.pending])
        # who called the device: the loop itself when the address was cached (in "handler",
        # after the first access to it: the PIO program writes port 0x10 twice in a row)
        if how == "loop":
            assert set(dev.callers) == {"_loop"}, dev.callers
        elif how == "handler":
            assert dev.callers[0] == "write", dev.callers  # the bus's
        else:
            assert "_loop" not in dev.callers, dev.callers
    assert seen["loop"] == seen["handler"] == seen["traced"]
    outcome, log, out = seen["loop"][:3]
    w, r = ("w", 0x10, b"\x5a"), ("r", 0x20, 1)  # the MMIO program's write and read
    if space == "pio":
        w, r = ("w", 0, b"O"), ("r", 1, 1)
    if mode in ("raise", "short") or (space, mode) == ("pio", "pending"):
        # the run ended at the read (at the first write for a pending port write: port IO
        # is answered at once), with the bus's error
        assert outcome.startswith("DeviceError: device odd ")
        assert log == ([w] if mode == "pending" else [w, ("w", 0, b"K"), r] if space == "pio"
                       else [w, r])
        return
    assert outcome == (0, "guest wrote the exit port")
    value = {"plain": 0x33, "bytearray": 0x44, "pending": 0x55}[mode]
    if space == "mmio":
        assert log == [w, r, ("w", 0x30, b"\x34\x12")]
        assert out == [(0, bytes([value]))]  # AL, as read, goes out on port 0x10
    else:
        assert log == [w, ("w", 0, b"K"), r, ("w", 0, bytes([value + 1])),
                       ("w", 2, b"\xef\xbe"), ("w", 3, b"\x00")]
    if mode == "pending":
        assert seen["loop"][6] == 3 and seen["loop"][7] == [True] * 3


def test_context_written_before_entry_reaches_the_guest_and_reads_back(make_machine) -> None:
    m, arch, rec = make_machine(SYNC)
    cpu = m.cpus[0]
    ctx = cpu.get_context()
    ctx.regs["rbx"] = 0x1234
    cpu.mark_context_dirty()
    m.run(timeout=10)
    assert rec.writes == [(2, b"\x34\x12")]  # the guest saw the host's BX
    assert cpu.get_context().regs["rbx"] == 0x1235  # and the host sees the guest's change
    assert cpu.get_context().regs["rsi"] == 0x5151


def test_no_pull_when_nobody_reads_the_context(make_machine) -> None:
    m, arch, rec = make_machine(PIO)
    m.run(timeout=10)
    assert "pull" not in arch.calls
    assert arch.calls.count("push") == 1  # the initial program selection only
    cpu = m.cpus[0]
    cpu.get_context(SyncLevel.RUNTIME)
    cpu.get_context(SyncLevel.RUNTIME)
    assert arch.calls.count("pull") == 1  # pulled once, then cached until KVM runs again


def test_always_sync_pushes_before_every_entry(make_machine) -> None:
    m, arch, rec = make_machine(PIO, always_sync=True)
    m.run(timeout=10)
    assert arch.calls.count("push") == m.cpus[0].stats.vm_exits


def test_run_timer_ends_a_guest_that_loops_forever(make_machine) -> None:
    m, arch, rec = make_machine(SPIN)
    result = m.run(max_ticks=5 * TICKS_PER_MS, timeout=20)
    assert result.reason == "simulated tick limit reached"
    assert result.ticks == 5 * TICKS_PER_MS
    assert m.cpus[0].stats.exit_signal >= 1
    assert m.cpus[0].status is CpuStatus.RUNNING  # resumable


def test_event_bounds_the_slice_and_runs_on_time(make_machine) -> None:
    m, arch, rec = make_machine(COUNT)
    seen = []

    def fire() -> None:
        seen.append((m.eventq.cur_tick, m.cpus[0].get_context().regs["rsi"]))
        if len(seen) < 3:
            m.eventq.schedule_in(ev, 2 * TICKS_PER_MS)

    ev = Event(fire, "test-event")
    m.eventq.schedule(ev, 2 * TICKS_PER_MS)
    m.run(max_ticks=7 * TICKS_PER_MS, timeout=20)
    assert [t for t, _ in seen] == [2 * TICKS_PER_MS, 4 * TICKS_PER_MS, 6 * TICKS_PER_MS]
    # the guest runs in between for as much host time as servicing leaves it (simulated
    # time follows host time): on a busy host that may be none, so only the order is sure
    counts = [c for _, c in seen]
    assert counts[0] <= counts[1] <= counts[2] <= m.cpus[0].get_context().regs["rsi"]


def test_a_run_can_be_continued(make_machine) -> None:
    m, arch, rec = make_machine(COUNT)
    m.run(max_ticks=2 * TICKS_PER_MS, timeout=20)
    first = m.cpus[0].get_context().regs["rsi"]
    runs = 1
    while runs < 100:  # a busy host may spend a whole 2 ms run outside the guest
        m.run(max_ticks=2 * TICKS_PER_MS, timeout=20)
        runs += 1
        if m.cpus[0].get_context().regs["rsi"] > first:
            break
    assert m.eventq.cur_tick == runs * 2 * TICKS_PER_MS  # each run ends exactly at its limit
    assert m.cpus[0].get_context().regs["rsi"] > first


def test_host_timeout_stops_the_run(make_machine) -> None:
    m, arch, rec = make_machine(SPIN)
    with pytest.raises(RunTimeoutError, match="host timeout of 0.3 s"):
        m.run(timeout=0.3)


def test_triple_fault_ends_the_run_with_a_typed_error_and_a_dump(make_machine) -> None:
    m, arch, rec = make_machine(TRIPLE)
    with pytest.raises(TripleFaultError) as info:
        m.run(timeout=10)
    err = info.value
    assert err.exit_reason == ExitReason.SHUTDOWN
    assert "triple-faulted" in str(err)
    assert "rip=" in err.dump and "rax=" in err.dump


def test_emulation_failure_names_the_pc_and_instruction_bytes(make_machine) -> None:
    m, arch, rec = make_machine(EMUFAIL)
    with pytest.raises(EmulationFailureError) as info:
        m.run(timeout=10)
    err = info.value
    assert err.details["suberror_name"] == "EMULATION"
    # fildl (0x40): DB /0 with a 16-bit displacement, the instruction that failed
    assert err.details["insn_bytes"].startswith("db 06 40 00")
    assert "at pc 0x" in str(err) and "bytes db 06 40 00" in str(err)


def test_hlt_suspends_and_an_idle_machine_ends_the_run(make_machine) -> None:
    m, arch, rec = make_machine(HALT)
    result = m.run(timeout=10)
    cpu = m.cpus[0]
    assert cpu.stats.halt == 1
    assert cpu.status is CpuStatus.IDLE and cpu.halted
    assert result.reason == "all vCPUs halted and no event is pending"


def test_wakeup_reactivates_a_halted_cpu(make_machine) -> None:
    m, arch, rec = make_machine(HALT)
    m.run(timeout=10)
    cpu = m.cpus[0]
    cpu.wakeup()
    assert cpu.status is CpuStatus.RUNNING and not cpu.halted
    assert cpu.tick_event.scheduled


def _inject_exit(cpu, reason: int) -> None:
    """Make the vCPU look as if KVM had just exited with ``reason`` (payload set by caller)."""
    cpu.vcpu.run.exit_reason = reason
    cpu.last_exit = reason
    cpu.status = CpuStatus.RUNNING_SERVICE


@pytest.mark.parametrize("reason,error,fill", [
    (ExitReason.FAIL_ENTRY, EntryFailureError,
     lambda run: setattr(run.fail_entry, "hardware_entry_failure_reason", 0x21)),
    (ExitReason.EXCEPTION, GuestExceptionError,
     lambda run: setattr(run.ex, "exception", 13)),
    (ExitReason.UNKNOWN, UnhandledExitError,
     lambda run: setattr(run.hw, "hardware_exit_reason", 0x7f)),
    (ExitReason.INTERNAL_ERROR, InternalKvmError,
     lambda run: setattr(run.internal, "suberror", 3)),
    (ExitReason.DEBUG, UnhandledExitError, lambda run: None),
    (ExitReason.HYPERCALL, UnhandledExitError, lambda run: setattr(run.hypercall, "nr", 9)),
    (55, UnhandledExitError, lambda run: None),
])
def test_every_fatal_exit_gives_its_typed_error(make_machine, reason, error, fill) -> None:
    m, arch, rec = make_machine(PIO)
    cpu = m.cpus[0]
    m.run(timeout=10)  # a real run first, so the vCPU has real state to dump
    fill(cpu.vcpu.run)
    _inject_exit(cpu, reason)
    with pytest.raises(error) as info:
        cpu.tick()
    assert info.value.exit_reason == int(reason)
    assert "rip=" in info.value.dump
    assert str(info.value).startswith("vcpu 0: ")


def test_system_event_shutdown_ends_the_run_cleanly(make_machine) -> None:
    m, arch, rec = make_machine(PIO)
    cpu = m.cpus[0]
    cpu.vcpu.run.system_event.type = 1  # KVM_SYSTEM_EVENT_SHUTDOWN
    _inject_exit(cpu, ExitReason.SYSTEM_EVENT)
    cpu.tick()
    assert m.stop_requested and m.exit_status == 0 and "powered off" in m.exit_reason


def test_a_plugin_that_raises_in_a_hook_is_named(make_machine) -> None:
    m, arch, rec = make_machine(PIO)

    def broken(cpu, io):
        raise ValueError("port table corrupt")

    m.cpus[0]._handle_exit_io = broken
    with pytest.raises(PluginHookError, match="port table corrupt") as info:
        m.run(timeout=10)
    assert "KVM_EXIT_IO" in str(info.value)
    assert info.value.plugin == "test_run_loop"


def test_unclaimed_access_policy_fatal(make_machine) -> None:
    from kvmfw.errors import UnclaimedAccessError

    m, arch, rec = make_machine(PIO, unclaimed="fatal")
    m.bus.pio.unregister(rec)
    with pytest.raises(UnclaimedAccessError, match="port|pio"):
        m.run(timeout=10)


def test_unclaimed_access_policy_ignore_counts_and_reads_all_ones(make_machine) -> None:
    m, arch, rec = make_machine(PIO)
    m.bus.pio.unregister(rec)
    result = m.run(timeout=10)  # the exit port is gone too: the guest halts
    assert result.reason == "all vCPUs halted and no event is pending"
    assert m.bus.pio.unclaimed_writes == 5 and m.bus.pio.unclaimed_reads == 1
    assert m.cpus[0].get_context().regs["rax"] & 0xFF == 0  # the guest's last 'exit' value


def test_state_transitions(make_machine) -> None:
    m, arch, rec = make_machine(PIOLOOP)
    cpu = m.cpus[0]
    assert cpu.status is CpuStatus.IDLE
    cpu.activate()
    assert cpu.status is CpuStatus.RUNNING and cpu.tick_event.scheduled
    cpu.suspend()
    assert cpu.status is CpuStatus.IDLE and not cpu.tick_event.scheduled
    cpu.halt()
    assert cpu.halted
    cpu.activate()
    # Running -> RunningService (an IO exit) -> RunningServiceCompletion (serviced)
    cpu.get_context().regs["rcx"] = 3
    cpu.mark_context_dirty()
    cpu._run_slice(None)
    assert cpu.status is CpuStatus.RUNNING_SERVICE
    cpu._dispatch_exit()
    assert cpu.status is CpuStatus.RUNNING_SERVICE_COMPLETION
    # a half entry completes the OUT without running on: still two iterations to go
    cpu.half_entry()
    assert cpu.status is CpuStatus.RUNNING and cpu.stats.vm_half_entries == 1
    assert cpu.get_context().regs["rcx"] == 3
    # RunningMMIOPending -> RunningServiceCompletion
    cpu.status = CpuStatus.RUNNING_MMIO_PENDING
    cpu.finish_mmio_pending()
    assert cpu.status is CpuStatus.RUNNING_SERVICE_COMPLETION
    # drain: completes the pending access, then is drained
    cpu.drain_pending = True
    cpu.run_drain()
    assert cpu.is_drained() and not cpu.drain_pending


def test_kvm_run_error_is_typed(make_machine) -> None:
    from kvmfw.errors import KvmError

    m, arch, rec = make_machine(PIO)
    cpu = m.cpus[0]
    m.run(timeout=10)
    cpu.vcpu.close()
    with pytest.raises(KvmError) as info:
        cpu._run_slice(None)
    assert info.value.ioctl == "KVM_RUN" and info.value.errno == errno.EBADF


def test_coalesced_mmio_writes_are_replayed_in_order(make_machine) -> None:
    from kvmtest import MMIOLOOP

    m, arch, rec = make_machine(MMIOLOOP, use_coalesced_mmio=True)
    m.vm.register_coalesced_mmio(0x20000, 0x100)
    cpu = m.cpus[0]
    cpu.get_context().regs["rcx"] = 500
    cpu.mark_context_dirty()
    m.run(timeout=20)
    # the guest stores AL (= its program number, 9) at 0x20010 each time round the loop
    assert [w for w in rec.writes if w[0] == 0x10] == [(0x10, b"\x09")] * 500
    stats = cpu.stats
    assert stats.coalesced_mmio + stats.mmio == 500
    assert stats.coalesced_mmio > 400 and stats.vm_exits < 100  # most writes never exited


def test_a_device_replaying_the_ring_from_a_replayed_write_sees_each_write_once(
        make_machine) -> None:
    from kvmtest import MMIOLOOP

    m, arch, rec = make_machine(MMIOLOOP)
    m.vm.register_coalesced_mmio(0x20000, 0x100)
    seen: list[int] = []

    class Replaying(Recorder):  # as a console whose zone ends inside a write
        def write(self, offset: int, data: bytes) -> None:
            seen.append(m.cpus[0].stats.coalesced_mmio)
            if len(seen) % 50 == 1:  # (not on every write: a regression must fail, not hang)
                m.replay_coalesced()  # nested: delivers the rest before this write returns

    m.bus.mmio.unregister(0x20000)
    m.map_device(Range("mmio", 0x20000, 0x100, "replaying"), Replaying(m))
    cpu = m.cpus[0]
    cpu.get_context().regs["rcx"] = 500
    cpu.mark_context_dirty()
    m.run(timeout=20)
    assert len(seen) == 500 and cpu.stats.coalesced_mmio > 400  # each store delivered once


def test_a_coalesced_zone_keeps_exits_on_the_hot_path_and_a_stop_replays_the_ring(
        make_machine) -> None:
    from kvmtest import MMIOLOOP

    m, arch, rec = make_machine(MMIOLOOP)
    m.vm.register_coalesced_mmio(0x20000, 0x100)
    cpu = m.cpus[0]
    # the C entry watches the ring (its offset set), so an exit pays for it only when
    # writes wait there: none of the run loop's cold parts is switched on for it
    assert cpu.use_coalesced_mmio and cpu._ctx.ring_off > 0 and not cpu._extras
    from kvmfw.coalesced import CURSOR

    assert cpu._ctx.cursor_off == cpu._ctx.ring_off + CURSOR  # it reads kvmfw's cursor
    n = 10**9
    cpu.get_context().regs["rcx"] = n
    cpu.mark_context_dirty()
    left = n
    for _ in range(200):  # slices of 20 ms of simulated time, stopped inside the loop (on
        m.run(max_ticks=20 * 10**9)  # a busy host a slice may run no guest code at all)
        left = cpu.get_context().regs["rcx"]
        if left < n:
            break
    done = [w for w in rec.writes if w[0] == 0x10]
    assert 0 < n - left < n
    # every store the guest made reached the device, in order, when the run stopped (a
    # stop between a store and its `dec` leaves one more store than iterations)
    assert len(done) in (n - left, n - left + 1) and set(done) == {(0x10, b"\x09")}
    assert cpu.stats.coalesced_mmio > 0


def test_cycle_source_fallback_is_automatic_and_says_why(make_machine) -> None:
    from kvmfw.timer import probe_perf

    m, arch, rec = make_machine(PIO)
    m.run(timeout=10)
    cpu = m.cpus[0]
    assert cpu.cycle_source is not None
    if not probe_perf().available:
        assert cpu.cycle_source.name == "monotonic"  # the test arch offers no TSC source
        assert "perf unavailable" in cpu.cycle_source_reason
    assert cpu.stats.cycles > 0 and cpu.stats.ticks_in_kvm > 0


def test_drain_completes_the_pending_io_instruction(make_machine) -> None:
    m, arch, rec = make_machine(PIO)
    answer = rec.read

    def read_and_stop(offset: int, size: int) -> bytes:
        m.request_exit(0, "stopped at the IN")
        return answer(offset, size)

    rec.read = read_and_stop  # type: ignore[method-assign]
    m.run(timeout=10)  # stopped with the IN serviced but its data not yet in AL
    cpu = m.cpus[0]
    assert cpu.status is CpuStatus.RUNNING_SERVICE_COMPLETION and not cpu.is_drained()
    assert cpu.get_context().regs["rax"] & 0xFF != 0x41
    m.drain()
    assert cpu.is_drained() and cpu.stats.vm_half_entries == 1
    assert cpu.get_context().regs["rax"] & 0xFF == 0x41  # the half entry completed the IN
    assert rec.writes == [(0, b"O"), (0, b"K")]  # and nothing after it ran


def test_an_event_posted_from_another_thread_interrupts_a_spinning_guest(make_machine) -> None:
    import threading

    m, arch, rec = make_machine(SPIN)
    fired = []

    def post() -> None:
        with m.lock:
            m.eventq.schedule(Event(lambda: (fired.append(1), m.request_exit(0, "posted"))),
                              m.eventq.cur_tick)

    threading.Timer(0.2, post).start()
    result = m.run(timeout=10)  # no event bounds the slice: only the post can end it
    assert result.reason == "posted" and fired == [1]


class _Counter:
    """Counts port writes; after ``limit`` of them it unmaps itself and maps ``then``."""

    def __init__(self, machine: Any, limit: int, then: Any = None) -> None:
        self.machine, self.limit, self.then, self.writes = machine, limit, then, 0

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1
        if self.writes == self.limit:
            self.machine.bus.pio.unregister(self)
            if self.then is not None:
                self.machine.map_device(Range("pio", 0x10, 1, "second"), self.then)


@pytest.mark.parametrize("fast", [True, False], ids=["fastpath", "no-fastpath"])
def test_devices_mapped_and_unmapped_during_a_run_take_effect_at_the_next_exit(
        make_machine, fast: bool) -> None:
    """The bus caches lookups (and the compiled path's table): a device mapped at a port
    the guest has been writing, and one unmapped, are seen by the very next exit."""
    m, _arch, rec = make_machine(PIOLOOP, options={"fastpath": fast})
    m.bus.pio.unregister(rec)
    m.map_device(Range("pio", 0x13, 1, "exit"), rec)  # (offset 0: recorded, then exit)
    rec.write = lambda offset, data: m.request_exit(0, "guest wrote the exit port")
    second = _Counter(m, 5)
    first = _Counter(m, 5, then=second)
    m.map_device(Range("pio", 0x10, 1, "first"), first)
    cpu = m.cpus[0]
    cpu.get_context().regs["rcx"] = 20
    cpu.mark_context_dirty()
    result = m.run(timeout=30)
    assert result.reason == "guest wrote the exit port"
    assert (first.writes, second.writes) == (5, 5)
    assert m.bus.pio.unclaimed_writes == 10  # after the second unmapped itself
    assert cpu.stats.io == 21


def test_port_exits_reach_the_arch_as_tuples_with_field_names(make_machine) -> None:
    from kvmfw.cpu import IoExit

    m, arch, rec = make_machine(PIO)
    cpu = m.cpus[0]
    plain = cpu._handle_exit_io
    seen: list[Any] = []

    def spy(c: Any, io: Any) -> Any:
        seen.append(io)
        return plain(c, io)

    cpu._handle_exit_io = spy
    m.run(timeout=10)
    first = seen[0]
    assert isinstance(first, tuple) and type(first) is IoExit
    direction, size, port, count, off = first
    assert (first.direction, first.size, first.port, first.count, first.data_offset) == (
        direction, size, port, count, off) == (1, 1, 0x10, 1, off)
    assert first.is_write and not seen[2].is_write  # 'O' out, then the in from 0x11
    assert IoExit((0, 2, 0x12, 1, 4096)).size == 2
    assert repr(IoExit((0, 2, 0x12, 1, 4096))) == \
        "IoExit(direction=0, size=2, port=18, count=1, data_offset=4096)"


def _spy_io(cpu: Any) -> list[Any]:
    plain, seen = cpu._handle_exit_io, []

    def spy(c: Any, io: Any) -> Any:
        seen.append(tuple(io))
        return plain(c, io)

    cpu._handle_exit_io = spy
    return seen


@pytest.mark.parametrize("direct", [False, True], ids=["via-arch", "direct"])
def test_direct_port_io_gives_the_guest_the_same_and_skips_only_the_hook(
        make_machine, direct: bool) -> None:
    """An arch that sets ``cpu.direct_port_io`` (it does for a single access only what the
    bus does) is not called for those exits; its reserved ports still reach it."""
    m, arch, rec = make_machine(PIO)
    m.bus.pio.reserve(0x12, 1, "arch-port")  # the 16-bit write of 0xbeef
    cpu = m.cpus[0]
    assert not cpu.direct_port_io  # (the default: every port exit reaches the arch)
    cpu.direct_port_io = direct  # (as an arch's vcpu_init would)
    seen = _spy_io(cpu)
    result = m.run(timeout=10)
    assert (result.status, result.reason) == (0, "guest wrote the exit port")
    assert rec.writes == [(0, b"O"), (0, b"K"), (0, b"B"), (2, b"\xef\xbe")]
    assert rec.reads == [(1, 1)]
    assert cpu.stats.io == 6
    ports = [port for _, _, port, _, _ in seen]
    assert ports == ([0x12] if direct else [0x10, 0x10, 0x11, 0x10, 0x12, 0x13])


def test_direct_port_io_leaves_string_io_to_the_arch(make_machine) -> None:
    m, arch, rec = make_machine(PIO)
    cpu = m.cpus[0]
    cpu.direct_port_io = True
    m.run(timeout=10)  # a real run first: the vCPU is set up
    seen = _spy_io(cpu)
    run = cpu.vcpu.run
    run.io.direction, run.io.size, run.io.port, run.io.count = 1, 1, 0x10, 3
    run.io.data_offset = 4096
    _inject_exit(cpu, ExitReason.IO)
    cpu._dispatch_exit()
    assert seen == [(1, 1, 0x10, 3, 4096)]  # (the test arch then does one write of it)


def test_a_reserved_range_outside_the_space_is_refused() -> None:
    from kvmfw.bus import AddressSpace
    from kvmfw.errors import BusError

    pio = AddressSpace("pio", limit=1 << 16)
    for base, size in ((0xFFFF, 2), (0x10, 0), (-1, 2), (0, 1 << 40)):
        with pytest.raises(BusError, match="reserved range"):
            pio.reserve(base, size, "bad")
    pio.reserve(0xCF8, 8, "pci")
    assert pio.reserved_ports == frozenset(range(0xCF8, 0xD00))


@pytest.mark.parametrize("guest_only", [False, True], ids=["host-cycles", "guest-only"])
def test_a_host_cycle_source_is_timed_by_the_entry_and_a_guest_only_one_is_read(
        make_machine, guest_only: bool) -> None:
    """A source of host cycles (x86: the TSC) counts the time the C entry already takes
    around KVM_RUN: it is derived from that, at the source's rate, with no read per exit;
    a guest-only counter (perf) is read around each entry. Both give cycles and ticks."""
    from kvmfw.timer import CycleSource

    reads = [0]

    def read() -> int:
        reads[0] += 1
        return reads[0] * 1000

    src = CycleSource("test-cycles", read, 2e9, counts_guest_only=guest_only)
    m, arch, rec = make_machine(PIOLOOP)
    m._cycle_source = lambda cpu: (src, "a test source")
    cpu = m.cpus[0]
    cpu.get_context().regs["rcx"] = 50
    cpu.mark_context_dirty()
    m.run(timeout=20)
    s = cpu.stats
    assert s.vm_exits == 51
    if guest_only:
        assert reads[0] == 2 * s.vm_exits and s.cycles == 1000 * s.vm_exits
        assert s.ticks_in_kvm == s.vm_exits * int(1000 * 1e12 / 2e9)
    else:
        assert reads[0] == 0
        assert abs(s.cycles - 2 * s.host_ns_in_kvm) <= 2  # (2 GHz; rounded when folded)
        assert abs(s.ticks_in_kvm - 1000 * s.host_ns_in_kvm) <= 1000 * s.vm_exits


class _Scheduler:
    """Port 0x10: at its third write schedules an event 5 ms of simulated time ahead."""

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self.writes = 0
        self.fired_at: int | None = None
        self.when: int | None = None

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1
        if self.writes == 3:
            eq = self.machine.eventq
            self.when = eq.cur_tick + 5 * TICKS_PER_MS
            eq.schedule(Event(self.fire, "scheduled-by-a-device"), self.when)

    def fire(self) -> None:
        self.fired_at = self.machine.eventq.cur_tick
        self.machine.request_exit(0, "the device's event")


def test_an_event_a_device_schedules_during_an_exit_bounds_the_next_entries(
        make_machine) -> None:
    """The loop bounds each entry by the queue's head as it is after the last exit was
    serviced: an event a device schedules from its handler ends the run at its tick, long
    before the guest's loop would."""
    m, _arch, rec = make_machine(PIOLOOP)
    m.bus.pio.unregister(rec)
    dev = _Scheduler(m)
    m.map_device(Range("pio", 0x10, 1, "scheduler"), dev)
    cpu = m.cpus[0]
    cpu.get_context().regs["rcx"] = 10**8  # hours of exits: the event must end it
    cpu.mark_context_dirty()
    result = m.run(timeout=60)
    assert result.reason == "the device's event"
    assert dev.fired_at == dev.when
    assert 3 <= dev.writes < 10**8
