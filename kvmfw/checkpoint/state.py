"""A drained machine's state as plain data: :class:`MachineState`, :func:`capture`,
:func:`apply`.

The groups and who produces them:

* ``vm``: VM-wide architectural state, the arch's ``save_vm_state`` (x86: in-kernel
  PIC/IO-APIC, PIT, KVM clock; ARMv8: the vGIC). None: the arch has none.
* ``cpus``: one dict per vCPU in id order, exactly the arch's ``save_arch_state``.
* ``devices``: every device's ``save()``, keyed ``"<index>:<name>"`` in attach order (the
  board is rebuilt from the same configuration, so index and name identify a device).
  A device saves its own pending events as delays relative to the current tick and
  reschedules them in ``restore()``.
* ``time``: what the core itself holds -- simulated time (``tick``), each vCPU's run state
  (running, idle or halted, a posted interrupt, idle accounting), open guest work items and a
  pending machine reset. The guest's own clocks (TSC, kvmclock, timers) are arch state.

Restore order (:func:`apply`), and why:

0. every group is checked (shape, counts, device keys, bounds) before anything changes;
1. the simulated clock is set to ``time.tick`` first, because devices reschedule their
   events relative to it;
2. ``vm`` (``restore_vm_state``): VM-wide state before any vCPU, since per-vCPU state may
   depend on it (x86: the in-kernel irqchip must hold its state before a LAPIC is loaded;
   ARMv8: the vGIC distributor before its redistributors);
3. ``cpus`` (``restore_arch_state``, id order; the arch orders its own groups: x86 loads
   CPUID before MSRs, MSRs before the LAPIC, vCPU events last);
4. ``devices`` (``restore``): their IRQ lines and events are re-asserted against the
   restored interrupt controller and clock;
5. the run state of ``time``: vCPU status and tick events, work items, a pending reset;
   simulated time resumes from ``tick`` at the next run (host time between is not simulated).

A check or a hook refusing a group raises :class:`~kvmfw.errors.CheckpointError` naming the
group and field. With ``rollback`` (the default) the machine is then put back into the state
it had before :func:`apply` began, so nothing half-applied runs; a caller that discards the
machine on failure (restore into a new machine) can skip the cost with ``rollback=False``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvmfw.errors import CheckpointError, KvmfwError
from kvmfw.eventq import Event

if TYPE_CHECKING:
    from kvmfw.machine import Machine

__all__ = ["MachineState", "capture", "apply", "check", "device_key", "TICK_MAX"]

TICK_MAX = (1 << 63) - 1
"""Largest simulated tick a state may hold (about 106 days of simulated time)."""
WORK_ITEMS_MAX = 4096
"""Open guest work items a state may hold (each is one begin without its end)."""
_RUN_STATES = ("Idle", "Running")
"""vCPU statuses a drained machine can be in."""
_INT_MAX = (1 << 63) - 1


@dataclass
class MachineState:
    """A drained machine's state as plain data (JSON-serialisable: bytes as hex)."""

    cpus: list[dict[str, Any]]
    vm: dict[str, Any] | None
    devices: dict[str, dict[str, Any]]
    time: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "vm": self.vm, "devices": self.devices, "time": self.time}

    @classmethod
    def from_dict(cls, data: Any, where: str = "state") -> MachineState:
        """The inverse of :meth:`as_dict`, checking the top-level shape only (the groups
        are checked by :func:`check` against a machine)."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: not a mapping")
        missing = {"cpus", "vm", "devices", "time"} - set(data)
        if missing:
            raise CheckpointError(f"{where}: field {sorted(missing)[0]!r} is missing")
        st = cls(cpus=data["cpus"], vm=data["vm"], devices=data["devices"], time=data["time"])
        _shape(st, where)
        return st


def device_key(index: int, device: Any) -> str:
    """The key of a device's state: its attach index and name (``"0:uart16550"``)."""
    return f"{index}:{device.name}"


def _device_keys(machine: Machine) -> list[str]:
    return [device_key(i, d) for i, d in enumerate(machine.devices)]


# --- capture -------------------------------------------------------------------------------

def capture(machine: Machine) -> MachineState:
    """The state of ``machine``, which must be drained (:meth:`Machine.drain
    <kvmfw.machine.Machine.drain>`) and not running on another thread. Raises
    :class:`~kvmfw.errors.StateError` if a vCPU or device is not drained."""
    from kvmfw.errors import StateError

    busy = [f"cpu{c.id}" for c in machine.cpus if not c.is_drained()]
    busy += [d.name for d in machine.devices if not d.is_drained()]
    if busy:
        raise StateError(f"cannot capture state: not drained: {', '.join(busy)} "
                         "(call Machine.drain() first)")
    hooks = machine.hooks
    with machine.lock:
        cpus = []
        for cpu in machine.cpus:
            s = hooks.call("save_arch_state", cpu=cpu)
            if s is None:
                raise StateError(f"the {machine.arch} plugin cannot save vCPU state "
                                 "(no save_arch_state)")
            cpus.append(s)
        # after every vCPU (the hook's contract): KVM clock and irqchip as the vCPUs left them
        vm = hooks.call("save_vm_state", machine=machine)
        devices = {device_key(i, d): copy.deepcopy(d.save())
                   for i, d in enumerate(machine.devices)}
        time = _capture_time(machine)
    return MachineState(cpus=cpus, vm=vm, devices=devices, time=time)


def _capture_time(machine: Machine) -> dict[str, Any]:
    eq = machine.eventq
    cpus = []
    for c in machine.cpus:
        cpus.append({"status": c.status.value, "halted": bool(c.halted),
                     "interrupt_pending": bool(c.interrupt_pending),
                     "suspended_ticks": int(c.suspended_ticks),
                     "idle_since": c._idle_since})
    reset = getattr(machine, "_reset_event", None)
    pending_reset = None
    if reset is not None and reset.scheduled:
        pending_reset = dict(getattr(machine, "_reset_args", {"reason": "reset",
                                                             "wakeup": False}))
    return {
        "tick": int(eq.cur_tick),
        "cpus": cpus,
        "work_items": [[w, t, tick] for (w, t), tick in sorted(machine.work_items.items())],
        "work": dict(machine._work),
        "reset": pending_reset,
    }


# --- checking ------------------------------------------------------------------------------

def _int(v: Any, where: str, lo: int = 0, hi: int = _INT_MAX) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CheckpointError(f"{where}: must be an integer in [{lo}, {hi}], "
                              f"not {_short(v)}")
    return v


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _shape(state: MachineState, where: str) -> None:
    if not isinstance(state.cpus, list) or not all(isinstance(c, dict) for c in state.cpus):
        raise CheckpointError(f"{where}: field 'cpus' must be a list of mappings")
    if state.vm is not None and not isinstance(state.vm, dict):
        raise CheckpointError(f"{where}: field 'vm' must be a mapping or null")
    if not isinstance(state.devices, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in state.devices.items()):
        raise CheckpointError(f"{where}: field 'devices' must map names to mappings")
    if not isinstance(state.time, dict):
        raise CheckpointError(f"{where}: field 'time' must be a mapping")


def check(machine: Machine, state: MachineState, where: str = "state") -> None:
    """Everything :func:`apply` can check without changing the machine: the groups' shape,
    that they fit this machine (vCPU count, the device list, hooks to load them), and the
    core's own time group in full. Raises :class:`~kvmfw.errors.CheckpointError`."""
    if not isinstance(state, MachineState):
        raise CheckpointError(f"{where}: not a MachineState")
    _shape(state, where)
    if len(state.cpus) != len(machine.cpus):
        raise CheckpointError(f"{where}: field 'cpus' holds {len(state.cpus)} vCPUs; the "
                              f"machine has {len(machine.cpus)}")
    if state.vm is not None and not machine.hooks.impls("restore_vm_state"):
        raise CheckpointError(f"{where}: field 'vm': the {machine.arch} plugin cannot "
                              "restore VM-wide state (no restore_vm_state)")
    if state.cpus and not machine.hooks.impls("restore_arch_state"):
        raise CheckpointError(f"{where}: field 'cpus': the {machine.arch} plugin cannot "
                              "restore vCPU state (no restore_arch_state)")
    keys = _device_keys(machine)
    if list(state.devices) != keys:
        extra = [k for k in state.devices if k not in keys]
        missing = [k for k in keys if k not in state.devices]
        if extra or missing:
            what = f"has device {extra[0]!r} the machine lacks" if extra else \
                f"lacks device {missing[0]!r}"
        else:
            what = "lists the devices in another order"
        raise CheckpointError(f"{where}: field 'devices' {what}")
    _check_time(machine, state.time, f"{where}: field 'time'")


def _check_time(machine: Machine, t: dict[str, Any], where: str) -> None:
    for key in ("tick", "cpus", "work_items", "work", "reset"):
        if key not in t:
            raise CheckpointError(f"{where}.{key} is missing")
    tick = _int(t["tick"], f"{where}.tick", 0, TICK_MAX)
    cpus = t["cpus"]
    if not isinstance(cpus, list) or len(cpus) != len(machine.cpus):
        raise CheckpointError(f"{where}.cpus must list {len(machine.cpus)} vCPUs")
    for i, c in enumerate(cpus):
        w = f"{where}.cpus[{i}]"
        if not isinstance(c, dict):
            raise CheckpointError(f"{w}: not a mapping")
        if c.get("status") not in _RUN_STATES:
            raise CheckpointError(f"{w}.status must be one of {', '.join(_RUN_STATES)} "
                                  f"(a drained vCPU), not {_short(c.get('status'))}")
        for flag in ("halted", "interrupt_pending"):
            if not isinstance(c.get(flag), bool):
                raise CheckpointError(f"{w}.{flag} must be true or false")
        _int(c.get("suspended_ticks"), f"{w}.suspended_ticks", 0, TICK_MAX)
        if c.get("idle_since") is not None:
            _int(c["idle_since"], f"{w}.idle_since", 0, tick)
    items = t["work_items"]
    if not isinstance(items, list) or len(items) > WORK_ITEMS_MAX:
        raise CheckpointError(f"{where}.work_items must be a list of at most "
                              f"{WORK_ITEMS_MAX} entries")
    for i, item in enumerate(items):
        if not isinstance(item, list) or len(item) != 3:
            raise CheckpointError(f"{where}.work_items[{i}] must be [work_id, thread_id, "
                                  "tick]")
        _int(item[0], f"{where}.work_items[{i}][0]", -_INT_MAX, _INT_MAX)
        _int(item[1], f"{where}.work_items[{i}][1]", -_INT_MAX, _INT_MAX)
        _int(item[2], f"{where}.work_items[{i}][2]", 0, tick)
    work = t["work"]
    if not isinstance(work, dict) or set(work) != set(machine._work):
        raise CheckpointError(f"{where}.work must hold {', '.join(sorted(machine._work))}")
    for k, v in work.items():
        _int(v, f"{where}.work.{k}", 0, _INT_MAX)
    reset = t["reset"]
    if reset is not None:
        if not isinstance(reset, dict) or not isinstance(reset.get("reason"), str) \
                or len(reset["reason"]) > 4096 or not isinstance(reset.get("wakeup"), bool):
            raise CheckpointError(f"{where}.reset must be null or {{reason, wakeup}}")


# --- apply ---------------------------------------------------------------------------------

def apply(machine: Machine, state: MachineState, *, rollback: bool = True) -> None:
    """Load ``state`` (from :func:`capture` on a machine built from the same
    configuration) into ``machine``, which must be stopped (no vCPU in ``KVM_RUN``), in the
    order of the module docstring. Everything the core can check is checked first; a group
    a plugin or device refuses raises :class:`~kvmfw.errors.CheckpointError` naming it, and
    with ``rollback`` the machine's previous state is put back first."""
    check(machine, state)
    backup = capture(machine) if rollback else None
    try:
        _apply(machine, state)
    except BaseException as exc:
        if backup is not None:
            try:
                _apply(machine, backup)
            except BaseException as again:  # the machine is no longer trustworthy
                raise CheckpointError(f"{_reason(exc)}; putting the previous state back "
                                      f"failed too ({_reason(again)}): close this "
                                      "machine") from exc
        if isinstance(exc, CheckpointError):
            raise
        if isinstance(exc, KvmfwError):
            raise CheckpointError(_reason(exc)) from exc
        raise


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _apply(machine: Machine, state: MachineState) -> None:
    hooks = machine.hooks
    eq = machine.eventq
    with machine.lock:
        for cpu in machine.cpus:  # no vCPU may tick while its state is replaced
            if cpu.tick_event.scheduled:
                eq.deschedule(cpu.tick_event)
        reset = getattr(machine, "_reset_event", None)
        if reset is not None and reset.scheduled:
            eq.deschedule(reset)
        machine._reset_event = None
        # 1. simulated time: devices reschedule their events relative to it
        eq.cur_tick = state.time["tick"]
        # 2. VM-wide state before any vCPU
        if state.vm is not None:
            _group("field 'vm'", lambda: hooks.call("restore_vm_state", machine=machine,
                                                    state=state.vm), machine.arch)
        # 3. vCPUs in id order
        for cpu, s in zip(machine.cpus, state.cpus, strict=True):
            _group(f"field 'cpus'[{cpu.id}]",
                   lambda c=cpu, s=s: hooks.call("restore_arch_state", cpu=c, state=s),
                   machine.arch)
        # 4. devices
        for i, d in enumerate(machine.devices):
            key = device_key(i, d)
            try:
                d.restore(copy.deepcopy(state.devices[key]))
            except CheckpointError as exc:
                raise CheckpointError(f"device {key}: {exc}") from exc
            except KvmfwError as exc:
                raise CheckpointError(f"device {key}: {exc}") from exc
            except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
                raise CheckpointError(f"device {key}: saved state refused: "
                                      f"{type(exc).__name__}: {exc}") from exc
        # 5. the run state
        _apply_run_state(machine, state.time)


def _group(where: str, call: Any, arch: str) -> None:
    try:
        ok = call()
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    except KvmfwError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    if not ok:
        raise CheckpointError(f"{where}: the {arch} plugin did not restore it")


def _apply_run_state(machine: Machine, t: dict[str, Any]) -> None:
    from kvmfw.cpu import CpuStatus

    eq = machine.eventq
    for cpu, c in zip(machine.cpus, t["cpus"], strict=True):
        cpu.status = CpuStatus(c["status"])
        cpu.halted = c["halted"]
        cpu.interrupt_pending = c["interrupt_pending"]
        cpu.suspended_ticks = c["suspended_ticks"]
        cpu._idle_since = c["idle_since"]
        cpu.drain_pending = False
        if cpu.status is not CpuStatus.IDLE and not cpu.parallel:
            eq.schedule(cpu.tick_event, eq.cur_tick)
    machine.work_items = {(w, th): tick for w, th, tick in t["work_items"]}
    machine._work.update(t["work"])
    reset = t["reset"]
    if reset is not None:
        reason, wakeup = reset["reason"], reset["wakeup"]
        ev = Event(lambda: machine._do_reset(reason, wakeup), "machine-reset")
        machine._reset_event = ev
        machine._reset_args = {"reason": reason, "wakeup": wakeup}
        eq.schedule(ev, eq.cur_tick)
    machine._start_clock()
