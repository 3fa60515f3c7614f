"""Simulated time: the event queue and clocked objects."""

from __future__ import annotations

import pytest

from kvmfw.eventq import (
    PRIO_CPU_TICK,
    PRIO_EXIT,
    TICKS_PER_SECOND,
    ClockedObject,
    Event,
    EventQueue,
    seconds_from_ticks,
    ticks_from_seconds,
)


def test_events_run_in_time_then_priority_then_schedule_order() -> None:
    q = EventQueue()
    order: list[str] = []
    for name, when, prio in [("c", 20, 0), ("cpu", 10, PRIO_CPU_TICK), ("exit", 10, PRIO_EXIT),
                             ("a", 10, 0), ("b", 10, 0)]:
        q.schedule(Event(lambda n=name: order.append(n), name, prio), when)
    while q.service_one():
        pass
    assert order == ["a", "b", "exit", "cpu", "c"]
    assert q.cur_tick == 20


def test_deschedule_and_reschedule() -> None:
    q = EventQueue()
    hits: list[int] = []
    ev = Event(lambda: hits.append(q.cur_tick))
    q.schedule(ev, 100)
    q.deschedule(ev)
    assert q.next_tick() is None and not ev.scheduled and len(q) == 0
    q.schedule(ev, 50)
    q.reschedule(ev, 70)
    assert q.next_tick() == 70 and len(q) == 1
    q.service_one()
    assert hits == [70] and q.service_one() is None


def test_scheduling_in_the_past_or_twice_is_refused() -> None:
    q = EventQueue()
    q.cur_tick = 10
    with pytest.raises(ValueError, match="cannot schedule"):
        q.schedule(Event(), 5)
    ev = Event()
    q.schedule(ev, 20)
    with pytest.raises(ValueError, match="already scheduled"):
        q.schedule(ev, 30)


def test_an_event_can_reschedule_itself() -> None:
    q = EventQueue()
    times: list[int] = []

    def fire() -> None:
        times.append(q.cur_tick)
        if len(times) < 3:
            q.schedule_in(ev, 5)

    ev = Event(fire)
    q.schedule(ev, 1)
    while q.service_one():
        pass
    assert times == [1, 6, 11]


def test_service_due_runs_only_what_is_due() -> None:
    q = EventQueue()
    hits: list[str] = []
    q.schedule(Event(lambda: hits.append("now")), 0)
    q.schedule(Event(lambda: hits.append("later")), 10)
    q.service_due()
    assert hits == ["now"]


def test_on_post_is_called_for_cross_thread_wakeups() -> None:
    q = EventQueue()
    posts: list[int] = []
    q.on_post = lambda: posts.append(1)
    q.schedule(Event(), 3)
    assert posts == [1]


def test_clocked_object_edges_and_conversions() -> None:
    q = EventQueue()
    clk = ClockedObject(q, 1e9)  # 1 GHz: 1000 ticks per cycle
    assert clk.clock_period == 1000
    assert clk.cycles_to_ticks(3) == 3000 and clk.ticks_to_cycles(2500) == 2
    q.cur_tick = 1500
    assert clk.clock_edge() == 2000 and clk.clock_edge(2) == 4000
    assert clk.cur_cycle == 1
    with pytest.raises(ValueError):
        ClockedObject(q, 0)


def test_tick_second_conversions() -> None:
    assert ticks_from_seconds(1.5) == 3 * TICKS_PER_SECOND // 2
    assert seconds_from_ticks(TICKS_PER_SECOND // 1000) == pytest.approx(0.001)


class _TimeMovesOnEveryRead(EventQueue):
    """A queue whose time moves on between any two reads of ``cur_tick``: what another
    thread sees while the vCPU thread advances time without the lock."""

    @property  # type: ignore[override]
    def cur_tick(self) -> int:
        self._t += 1000
        return self._t

    @cur_tick.setter
    def cur_tick(self, value: int) -> None:
        self._t = value


def test_post_never_refuses_an_event_because_time_moved_on() -> None:
    """The vCPU thread moves cur_tick on without the lock; a console or gdb thread that
    scheduled "at cur_tick" had its event refused as being in the past (in CI: the console
    reader died and the guest never got its input). post() reads the time once."""
    eq = _TimeMovesOnEveryRead()
    ev = Event(lambda: None, "input")
    with pytest.raises(ValueError, match="cannot schedule"):
        eq.schedule(ev, eq.cur_tick)  # the old way: read, then checked against a later time
    assert eq.post(ev)
    assert eq.service_one() is ev


def test_post_is_a_no_op_for_a_pending_event_and_honours_not_before() -> None:
    eq = EventQueue()
    eq.cur_tick = 500
    ev = Event(lambda: None, "e")
    assert eq.post(ev, not_before=100) and ev.when == 500
    assert not eq.post(ev)
    eq.deschedule(ev)
    assert eq.post(ev, not_before=900) and ev.when == 900
