"""Host time for the run loop: the run timer that ends a KVM slice, and host-cycle sources.

Simulated time follows host time (see "Time" in :mod:`kvmfw.machine`): a slice bounded by an
event at tick T ends at the host instant that maps to T, computed from the run's fixed
clock base, so the timer is armed once per bounding event, not once per exit.

Cycle sources only feed statistics (``cycles``, ``instructions``). Where gem5 panics without
a PMU, kvmfw picks the best working source and says which and why: perf hardware cycles
(guest-only) if ``perf_event_open`` works; else a source an architecture plugin offers
through ``get_host_cycles`` (x86: the TSC); else the monotonic clock. A source owns its
perf fds: :meth:`CycleSource.close` closes them (the vCPU does on rebind and close).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable

from kvmfw.abi import lib
from kvmfw.eventq import TICKS_PER_SECOND
from kvmfw.record import Frozen, Record
from kvmfw.stats import KvmCpuStats

PERF_TYPE_HARDWARE = 0
PERF_COUNT_HW_CPU_CYCLES = 0
PERF_COUNT_HW_INSTRUCTIONS = 1


class RunTimer:
    """A POSIX timer on ``CLOCK_MONOTONIC`` that signals one thread (the vCPU's) at an
    absolute deadline; armed only when the deadline changes, so most exits cost no syscall.
    Every ``timer_settime`` (arm and disarm) is counted in ``stats.timer_settime``."""

    def __init__(self, signo: int, tid: int, stats: KvmCpuStats | None = None) -> None:
        t = lib.kvmfw_timer_create(signo, tid)
        if t < 0 and t > -4096:
            raise OSError(-t, f"timer_create: {os.strerror(-t)}")
        self._timer = t
        self.deadline_ns: int | None = None
        """The armed deadline; None when disarmed or known to have fired."""
        self.stats = stats if stats is not None else KvmCpuStats()

    def arm_at(self, deadline_ns: int) -> None:
        if deadline_ns == self.deadline_ns:
            return
        self.stats.timer_settime += 1
        r = lib.kvmfw_timer_arm(self._timer, deadline_ns)
        if r < 0:
            raise OSError(-r, "timer_settime")
        self.deadline_ns = deadline_ns

    def disarm(self) -> None:
        if self.deadline_ns is not None:
            self.stats.timer_settime += 1
            lib.kvmfw_timer_disarm(self._timer)
            self.deadline_ns = None

    def close(self) -> None:
        if self._timer:
            lib.kvmfw_timer_delete(self._timer)
            self._timer = 0


class CycleSource(Record):
    """A counter of cycles at ``frequency_hz``. A guest-only counter (perf) is read around
    each run; a host one (the TSC, the monotonic clock) is timed by the compiled entry
    and scaled to ``frequency_hz``, so the exit path reads no counter. ``instructions``:
    guest instructions retired, when a counter can measure them (perf only); ``fds``: file
    descriptors this source owns (perf counters), closed by :meth:`close`."""

    def __init__(self, name: str, read: Callable[[], int], frequency_hz: float,
                 counts_guest_only: bool = False, note: str = "",
                 instructions: Callable[[], int] | None = None,
                 fds: list[int] | None = None) -> None:
        self.name = name
        self.read = read
        self.frequency_hz = frequency_hz
        self.counts_guest_only = counts_guest_only
        self.note = note
        self.instructions = instructions
        self.fds: list[int] = [] if fds is None else fds

    def close(self) -> None:
        """Close the counters this source owns (idempotent)."""
        while self.fds:
            os.close(self.fds.pop())

    def ticks(self, cycles: int, host_factor: float) -> int:
        return int(cycles * host_factor * TICKS_PER_SECOND / self.frequency_hz)


def monotonic_source() -> CycleSource:
    return CycleSource("monotonic", time.monotonic_ns, 1e9)


class PerfProbe(Frozen):
    """Whether perf hardware counters work here, and if not, why."""

    available: bool
    reason: str


def probe_perf(config: int = PERF_COUNT_HW_CPU_CYCLES) -> PerfProbe:
    """Open (and close) a guest-only hardware counter (cycles by default; or
    ``PERF_COUNT_HW_INSTRUCTIONS``) to see if perf gives it here."""
    what = "cycle" if config == PERF_COUNT_HW_CPU_CYCLES else "instruction"
    fd = lib.kvmfw_perf_open(PERF_TYPE_HARDWARE, config, 1)
    if fd >= 0:
        os.close(fd)
        return PerfProbe(True, f"perf hardware {what} counter works")
    err = -fd
    if err == errno.ENOENT:
        why = "no hardware PMU is exposed to this host (ENOENT)"
        if what == "instruction" and probe_perf().available:
            why = ("the PMU counts cycles but has no instructions-retired event (ENOENT; "
                   "QEMU's emulated PMU counts instructions only with -icount)")
    elif err in (errno.EACCES, errno.EPERM):
        try:
            with open("/proc/sys/kernel/perf_event_paranoid") as f:
                level = f.read().strip()
        except OSError:
            level = "?"
        why = (f"not permitted ({errno.errorcode[err]}): kernel.perf_event_paranoid={level}; "
               "sysctl kernel.perf_event_paranoid=1 allows it")
    elif err == errno.EOPNOTSUPP:
        why = "the PMU does not support guest-only counting (EOPNOTSUPP)"
    else:
        why = f"perf_event_open failed: {errno.errorcode.get(err, err)} ({os.strerror(err)})"
    return PerfProbe(False, why)


def perf_source(frequency_hz: float) -> CycleSource | None:
    """Guest-only hardware cycles on the calling thread, or None if perf does not work."""
    fd = lib.kvmfw_perf_open(PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES, 1)
    if fd < 0:
        return None
    read = lib.kvmfw_perf_read
    ifd = lib.kvmfw_perf_open(PERF_TYPE_HARDWARE, PERF_COUNT_HW_INSTRUCTIONS, 1)
    insns = (lambda: read(ifd)) if ifd >= 0 else None
    return CycleSource("perf-cycles", lambda: read(fd), frequency_hz, counts_guest_only=True,
                       instructions=insns, fds=[fd] + ([ifd] if ifd >= 0 else []))


def select_cycle_source(prefer_perf: bool, host_frequency_hz: float,
                        plugin_source: CycleSource | None) -> tuple[CycleSource, str]:
    """Pick the cycle source and return it with a one-line reason for the choice."""
    if prefer_perf:
        src = perf_source(host_frequency_hz)
        if src is not None:
            if src.instructions is not None:
                return src, "perf hardware cycles (guest only), instructions counted"
            why = probe_perf(PERF_COUNT_HW_INSTRUCTIONS).reason
            return src, f"perf hardware cycles (guest only); no instruction count: {why}"
        why = probe_perf().reason
    else:
        why = "perf disabled by configuration"
    if plugin_source is not None:
        return plugin_source, f"{plugin_source.name} (perf unavailable: {why})"
    return monotonic_source(), f"monotonic clock (perf unavailable: {why})"
