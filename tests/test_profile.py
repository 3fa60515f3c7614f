"""``kvmfw run --profile`` and kvmfw.profile.ExitProfile: exits by reason and device,
compiled-path exits, sync and timer costs; nothing installed when not profiling."""

from __future__ import annotations

import subprocess
import sys

from kvmtest import PIO, SYNC, needs_kvm

from kvmfw.abi import ExitReason
from kvmfw.fastpath import FastRange
from kvmfw.profile import ExitProfile

pytestmark = needs_kvm


def test_profile_counts_exits_by_reason_device_and_port(make_machine) -> None:
    m, _arch, rec = make_machine(PIO)
    m.bus.pio.add_fast(FastRange("pio", 0x11, 1, constant=b"\x41"))
    p = ExitProfile(m)
    p.install()
    assert m.cpus[0].exit_table is not None
    m.run(timeout=20)
    p.stop()
    assert m.cpus[0].exit_table is None  # the plain table again: no cost once stopped
    # 6 IO exits: 'O', 'K', 'B', the word, the exit write through Python; the read of 0x11
    # answered in C
    assert p.by_reason[ExitReason.IO][0] == 5
    assert p.by_device[("pio", "recorder")][0] == 5
    assert p.ports == {0x10: 3, 0x12: 1, 0x13: 1}
    assert rec.reads == []  # the constant read never reached the device
    text = p.report()
    assert "6 exits" in text and "(1 answered by the compiled path)" in text
    assert "pio recorder (in C)" in text
    assert "answered in C (compiled path)" in text
    assert "top ports (Python-serviced): 0x0010 3" in text
    assert "timer_settime" in text


def test_profile_times_the_context_sync(make_machine) -> None:
    m, _arch, _rec = make_machine(SYNC)
    cpu = m.cpus[0]
    cpu.get_context().regs["rbx"] = 0x1234
    cpu.mark_context_dirty()
    p = ExitProfile(m)
    p.install()
    m.run(timeout=20)
    cpu.get_context()  # a pull after the run
    assert p.sync["push (update_kvm_state)"][0] == 1
    assert p.sync["pull (update_thread_context)"][0] == 1
    p.stop()
    assert not getattr(cpu._update_kvm_state, "_kvmfw_profiled", False)


def test_a_machine_without_profile_has_no_timing_table(make_machine) -> None:
    m, _arch, _rec = make_machine(PIO)
    m.run(timeout=20)
    assert m.cpus[0].exit_table is None


def test_cli_profile_prints_the_table_at_the_end() -> None:
    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvmfw.cli", "run", "--console", "none",
                               *extra], capture_output=True, text=True, timeout=120, cwd="/")

    r = run("--profile")
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert "exit profile:" in err and "exits by reason" in err and "exits by device" in err
    assert "pio uart16550" in err  # the embedded guest prints through the 16550
    assert "top ports (Python-serviced): 0x03f" in err
    assert "sync with KVM" in err and "run timer:" in err
    plain = run()
    assert plain.returncode == 0 and "exit profile" not in plain.stderr
