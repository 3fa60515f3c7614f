"""Exact instruction stops without a PMU (``Machine.run(until_instructions=N)``, ``--max-insts``).

How the N instructions are counted, per vCPU, and reported in the stats group
``system.cpu<i>.insts`` (gem5's ``totalInsts`` with its provenance):

- ``measured``: instructions KVM ran, read from a perf instruction counter
  (``cycle_source.instructions``). The approach on KVM uses it when it exists
  (:func:`kvm_approach`, the seam for a perf-overflow stop, gem5's ``PerfKvmCounter``);
- ``emulated``: instructions the emulated CPU (:mod:`kvmfw.emu`) completed, each counted;
- ``estimated``: instructions KVM ran without a counter (not used for a stop: without a
  PMU there is no exact way to stop KVM at an instruction, and single-stepping KVM costs
  one exit per instruction, more than Unicorn's emulation of it).

Without a PMU (here: no perf counter in a VM, or ``kvm_pvm``) the whole budget is
emulated, which is exact by construction; the ``method`` stat says which path ran.
The stop is early (status 0, the reason says so) if the guest reaches a wait instruction
(``hlt``/``wfi``): the instruction count is then what ran, never more than N.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from kvmfw.config import MAX_INSTS
from kvmfw.errors import ConfigError

if TYPE_CHECKING:
    from kvmfw.cpu import KvmCPU
    from kvmfw.machine import Machine, RunResult


def kvm_approach(machine: Machine, cpu: KvmCPU, n: int) -> int:
    """Run ``cpu`` on KVM for at most ``n`` instructions as measured by a PMU, leaving the
    rest to the emulator; returns the instructions run (0: no PMU, nothing ran).

    The seam for a perf-overflow stop (an arch plugin or the perf cycle source arms an
    instruction counter with ``sample_period = n - margin`` that kicks the vCPU on
    overflow): none is wired yet, so this returns 0 and the emulator does all of it."""
    return 0


def run_until_instructions(machine: Machine, n: int, *, timeout: float | None = None,
                           trace: Any = None) -> RunResult:
    """Run vCPU 0 for exactly ``n`` instructions (see the module docstring)."""
    from kvmfw.emu import EmulatedCPU, insts_stats
    from kvmfw.machine import RunResult

    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_INSTS:
        raise ConfigError(f"instruction limit must be 0..{MAX_INSTS}, not {n!r}")
    if len(machine.cpus) != 1:
        raise ConfigError("an exact instruction stop needs a single vCPU (--cpus 1)")
    cpu = machine.cpus[0]
    st = insts_stats(machine, cpu)
    st["requested"] += n
    t0 = time.monotonic()
    measured = kvm_approach(machine, cpu, n)
    st["measured"] += measured
    machine.stop_requested = False  # (why the previous run stopped: a new run)
    emu = EmulatedCPU(machine, trace=trace)
    emu.take_over_from(cpu)
    try:
        done = emu.run(n - measured, timeout=timeout)
    finally:
        emu.switch_out()
    st["method"] = "perf+emulated" if measured else "emulated"
    if machine.stop_requested and machine.exit_reason:
        reason = machine.exit_reason  # the guest ended the run meanwhile
        return RunResult(machine.exit_status, reason, machine.eventq.cur_tick,
                         time.monotonic() - t0)
    if measured + done < n:
        reason = (f"stopped after {measured + done} of {n} instructions: "
                  f"{emu.stop_reason}")
    else:
        reason = f"instruction limit of {n} reached"
    machine.exit_status, machine.exit_reason = 0, reason
    return RunResult(0, reason, machine.eventq.cur_tick, time.monotonic() - t0)
