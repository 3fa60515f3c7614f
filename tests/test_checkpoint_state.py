"""kvmfw.checkpoint.state: capture a drained running guest, apply it to a new machine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ckpt_arch import Ticker, regs_of  # noqa: E402
from ckpt_arch import build as _build  # noqa: E402
from kvmtest import Recorder  # noqa: E402

from kvmfw.checkpoint.state import MachineState, apply, capture, check  # noqa: E402
from kvmfw.errors import CheckpointError, StateError  # noqa: E402
from kvmfw.eventq import TICKS_PER_MS  # noqa: E402
from kvmfw.machine import Machine  # noqa: E402


def build() -> tuple[Machine, Recorder, Ticker]:
    rig = _build()
    return rig.machine, rig.rec, rig.ticker


def result(rec: Recorder) -> bytes:
    return next(d for off, d in rec.writes if off == 0)  # port 0x10


def test_round_trip_of_a_running_guest_gives_the_uninterrupted_result() -> None:
    ref, ref_rec, ref_t = build()
    with ref:
        assert ref.run(timeout=60).status == 0
        expected, expected_count = result(ref_rec), ref_t.count
    m, _, t = build()
    with m:
        while t.count < 20:  # mid-computation
            m.run(max_ticks=TICKS_PER_MS // 2, timeout=60)
        m.drain()
        state = capture(m)
        assert state.time["tick"] == m.eventq.cur_tick
        assert list(state.devices) == ["0:ticker"]
        assert state.cpus[0]["regs"]["rcx"] > 0
        ram = [bytes(r.view) for r in m.memory]
        count_at = t.count
        regs = regs_of(m.cpus[0])
    m2, rec2, t2 = build()
    with m2:
        for r, data in zip(m2.memory, ram, strict=True):
            r.view[:] = data
        apply(m2, state)
        assert regs_of(m2.cpus[0]) == regs
        assert t2.count == count_at
        assert m2.eventq.cur_tick == state.time["tick"]
        assert t2.ev.when - m2.eventq.cur_tick == state.devices["0:ticker"]["due_in"]
        assert m2.run(timeout=60).status == 0
        assert result(rec2) == expected
        assert t2.count == expected_count


def test_apply_refuses_a_state_of_another_machine_and_changes_nothing() -> None:
    m, _, t = build()
    with m:
        m.run(max_ticks=TICKS_PER_MS // 4, timeout=60)
        m.drain()
        good = capture(m)
        before = capture(m)
        bad = MachineState(cpus=good.cpus * 2, vm=None, devices=good.devices, time=good.time)
        with pytest.raises(CheckpointError, match="cpus.*2 vCPUs"):
            apply(m, bad)
        bad = MachineState(cpus=good.cpus, vm=None, devices={"0:other": {}}, time=good.time)
        with pytest.raises(CheckpointError, match="devices"):
            apply(m, bad)
        bad_time = dict(good.time, tick=-1)
        with pytest.raises(CheckpointError, match="time.*tick"):
            apply(m, MachineState(good.cpus, None, good.devices, bad_time))
        # a group the arch refuses after others were applied: rolled back
        cpu_bad = [dict(good.cpus[0], sregs="00")]
        later = dict(good.time, tick=good.time["tick"] + 5)
        with pytest.raises(CheckpointError, match=r"cpus'\[0\].*sregs"):
            apply(m, MachineState(cpu_bad, None, {"0:ticker": {"count": 99, "due_in": 1}},
                                  later))
        dev_bad = MachineState(good.cpus, None, {"0:ticker": {"count": "x"}}, later)
        with pytest.raises(CheckpointError, match="0:ticker"):
            apply(m, dev_bad)
        assert capture(m) == before
        assert t.count == before.devices["0:ticker"]["count"]


def test_capture_refuses_an_undrained_machine() -> None:
    m, _, _ = build()
    with m:
        m.run(max_ticks=TICKS_PER_MS // 4, timeout=60)
        m.cpus[0].status = type(m.cpus[0].status)("RunningServiceCompletion")
        with pytest.raises(StateError, match="not drained: cpu0"):
            capture(m)
        m.drain()
        capture(m)


def test_check_passes_a_fresh_capture() -> None:
    m, _, _ = build()
    with m:
        m.drain()
        check(m, capture(m))
