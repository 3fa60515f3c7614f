"""Simulated time: ticks (1 tick = 1 ps, as gem5), events, the event queue, clocked objects.

Devices schedule :class:`Event` objects; the run loop bounds every KVM slice by the next
event (``EventQueue.next_tick``), so a device timer due at tick T is serviced at T even
while the guest spins. The queue is thread-safe for posting from other threads (a console
reader, another vCPU); servicing happens on the thread that runs the machine.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable

TICKS_PER_SECOND = 10**12
TICKS_PER_NS = 1000
TICKS_PER_US = 10**6
TICKS_PER_MS = 10**9

# Priorities: lower runs first among events at the same tick (gem5 convention). A CPU's
# tick runs after every other event of its tick, so events due "now" are serviced before
# the CPU enters KVM again.
PRIO_DEFAULT = 0
PRIO_EXIT = 100
PRIO_CPU_TICK = 200


def ticks_from_seconds(seconds: float) -> int:
    return int(round(seconds * TICKS_PER_SECOND))


def seconds_from_ticks(ticks: int) -> float:
    return ticks / TICKS_PER_SECOND


class Event:
    """Something that happens at a tick; subclass and override :meth:`process`, or pass a
    callback."""

    __slots__ = ("callback", "name", "priority", "when", "_seq", "_queue")

    def __init__(self, callback: Callable[[], object] | None = None, name: str = "event",
                 priority: int = PRIO_DEFAULT) -> None:
        self.callback = callback
        self.name = name
        self.priority = priority
        self.when: int | None = None
        self._seq = 0
        self._queue: EventQueue | None = None

    @property
    def scheduled(self) -> bool:
        return self.when is not None

    def process(self) -> None:
        if self.callback is not None:
            self.callback()

    def __repr__(self) -> str:
        return f"<Event {self.name} at {self.when}>"


class EventQueue:
    """A priority queue of events in simulated time."""

    def __init__(self) -> None:
        self.cur_tick = 0
        self._heap: list[tuple[int, int, int, Event]] = []
        self._seq = itertools.count()
        self.lock = threading.RLock()
        self.on_post: Callable[[], None] | None = None
        """Called after an event is scheduled, e.g. to kick a vCPU that is in KVM."""

    def schedule(self, event: Event, when: int) -> None:
        """Schedule ``event`` at absolute tick ``when`` (not in the past)."""
        with self.lock:
            if event.when is not None:
                raise ValueError(f"{event!r} is already scheduled")
            if when < self.cur_tick:
                raise ValueError(f"cannot schedule {event.name} at {when} < now {self.cur_tick}")
            self._push(event, when)
        if self.on_post is not None:
            self.on_post()

    def _push(self, event: Event, when: int) -> None:
        """Put ``event`` on the heap at ``when`` (the lock is held)."""
        event.when = when
        event._seq = next(self._seq)
        event._queue = self
        heapq.heappush(self._heap, (when, event.priority, event._seq, event))

    def post(self, event: Event, not_before: int = 0) -> bool:
        """Schedule ``event`` as soon as possible (at ``not_before`` if that is later);
        safe from any thread.

        The vCPU thread moves ``cur_tick`` on without taking the lock (the exit path), so
        another thread cannot schedule "at ``cur_tick``": by the time :meth:`schedule` checks
        it, time may have moved. A posted event's tick may therefore be a little in the past;
        it runs at the next service point, which never moves time backwards. Returns False if
        ``event`` was already scheduled (it will run; posting it twice would be one run)."""
        with self.lock:
            if event.when is not None:
                return False
            self._push(event, max(self.cur_tick, not_before))
        if self.on_post is not None:
            self.on_post()
        return True

    def schedule_in(self, event: Event, delay: int) -> None:
        self.schedule(event, self.cur_tick + delay)

    def deschedule(self, event: Event) -> None:
        """Remove ``event``; lazily dropped from the heap (its sequence no longer matches)."""
        with self.lock:
            event.when = None
            event._seq = -1

    def reschedule(self, event: Event, when: int) -> None:
        with self.lock:
            if event.when is not None:
                self.deschedule(event)
            self.schedule(event, when)

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap:
            when, _, seq, ev = heap[0]
            if ev.when == when and ev._seq == seq:
                return
            heapq.heappop(heap)

    def next_tick(self) -> int | None:
        """Tick of the earliest pending event, or None if the queue is empty."""
        heap = self._heap
        if heap:
            when, _, seq, ev = heap[0]
            if ev._seq == seq and ev.when == when:
                return when
            with self.lock:
                self._drop_stale()
                if heap:
                    return heap[0][0]
        return None

    def empty(self) -> bool:
        return self.next_tick() is None

    def service_one(self) -> Event | None:
        """Advance time to the earliest event and run it; None if nothing is pending."""
        with self.lock:
            self._drop_stale()
            if not self._heap:
                return None
            when, _, _, ev = heapq.heappop(self._heap)
            self.cur_tick = max(self.cur_tick, when)
            ev.when = None
        ev.process()
        return ev

    def service_due(self) -> None:
        """Run every event due at or before ``cur_tick``."""
        while True:
            nt = self.next_tick()
            if nt is None or nt > self.cur_tick:
                return
            self.service_one()

    def __len__(self) -> int:
        with self.lock:
            self._drop_stale()
            return sum(1 for w, _, s, e in self._heap if e.when == w and e._seq == s)


class ClockedObject:
    """Something with a clock: converts cycles to ticks and finds clock edges."""

    def __init__(self, eventq: EventQueue, frequency_hz: float) -> None:
        if frequency_hz <= 0:
            raise ValueError("clock frequency must be positive")
        self.eventq = eventq
        self.frequency_hz = frequency_hz
        self.clock_period = max(1, int(round(TICKS_PER_SECOND / frequency_hz)))

    def cycles_to_ticks(self, cycles: int) -> int:
        return cycles * self.clock_period

    def ticks_to_cycles(self, ticks: int) -> int:
        return ticks // self.clock_period

    def clock_edge(self, cycles: int = 0) -> int:
        """The tick of the clock edge ``cycles`` after the current (or next) edge."""
        now = self.eventq.cur_tick
        edge = -(-now // self.clock_period) * self.clock_period
        return edge + cycles * self.clock_period

    @property
    def cur_cycle(self) -> int:
        return self.eventq.cur_tick // self.clock_period
