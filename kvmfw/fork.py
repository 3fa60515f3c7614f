"""Fork a drained machine into another process that keeps running on KVM (gem5's
``m5.fork``, without gem5's rule that a forked child must leave KVM).

:func:`fork` returns in both processes like :func:`os.fork`. What the child gets, and how:

* **Guest RAM**: shared copy-on-write. Guest RAM is ``MAP_PRIVATE`` (anonymous, or a file
  mapped privately), so after ``fork(2)`` the child's pages are the parent's until either
  side writes one; nothing is copied at fork. The child installs the *same* host mappings
  as the memory slots of its own VM. (A ``MAP_SHARED`` file-backed region would be shared
  for real, writes and all: :func:`fork` refuses it.)
* **KVM objects**: a VM and its vCPUs belong to the process that created them (KVM binds a
  VM to its creator's ``mm``), so the child closes the inherited fds -- VM, vCPUs, in-kernel
  devices, ``kvm_run`` mappings, perf counters; the parent's VM is untouched, since closing
  an inherited fd only drops the child's reference -- and builds a new VM in the same
  ``VM``/``VCpu`` objects (every closure and device that holds them stays valid): the arch's
  ``fork_child`` (it forgets its per-VM state: the hook's contract), ``machine_configure``
  (VM-wide set-up; whatever RAM or bus mappings it adds are already there and are
  discarded), the vCPUs (``vcpu_init``, ``create_thread_context``), the
  arch's ``machine_created``, the coalesced-MMIO zones, then the state the parent captured
  just before the fork (``restore_vm_state``, ``restore_arch_state`` per vCPU, as
  :func:`kvmfw.checkpoint.state.apply` orders them). Devices, the event queue and
  simulated time need no restore: they are Python objects, and the child has them as they
  were.
* **Threads**: ``fork(2)`` keeps only the calling thread. The machine is drained and not
  running, so no vCPU thread exists (a parallel run starts its threads per run); the run
  timer and kick binding are re-made on the child's thread at its next run.
* **Host resources of devices**: every device's :meth:`Device.after_fork
  <kvmfw.device.Device.after_fork>` runs in the child with the child's pid (console output
  to a per-child file, disk images copy-on-write in the child, listening sockets closed:
  see that method). A GDB server is refused: detach it before forking.
* **Dirty tracking**: trackers are harvested before the fork, so both processes' trackers
  hold every page dirtied until then; the child's new VM logs from the fork on.

Only the forked machine is rebuilt: other machines of the process are not usable in the
child (their KVM objects are the parent's); close them there, or fork before making them.
Sectors of a copy-on-write disk the child has not written are read from the image, which
the parent may still write: for fully independent disks keep the parent idle while
children run (as :func:`run_variants` does) or make the disk read-only.

A child that cannot rebuild its machine writes one line to stderr and ends with
:data:`CHILD_FAILED` (it must never return into the parent's code path).

:func:`run_variants` forks one child per value, runs ``fn(machine, value)`` in each and
collects exit statuses and results.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmfw.abi import address_of, constants
from kvmfw.bus import Bus
from kvmfw.debug import get_logger
from kvmfw.errors import KvmfwError
from kvmfw.memory import GuestMemory

if TYPE_CHECKING:
    from kvmfw.checkpoint.state import MachineState
    from kvmfw.machine import Machine

log = get_logger("kvmfw.fork")

__all__ = ["fork", "run_variants", "VariantResult", "CHILD_FAILED", "RESULT_MAX"]

CHILD_FAILED = 125
"""Exit status of a child that could not rebuild its machine (or whose variant raised)."""
RESULT_MAX = 64 << 20
"""Largest pickled variant result the parent reads back (bytes)."""


class ForkError(KvmfwError):
    """The machine cannot be forked (a GDB server attached, a shared RAM mapping)."""


def _fork() -> int:
    """``os.fork()``, without Python's multi-threaded-fork warning when this process has no
    thread but the caller's: KVM's per-VM kernel worker (``kvm-nx-lpage-recovery``) is
    listed among the process's threads, so Python 3.12+ warns on every fork of a process
    that has a VM, though no code of the process can hold a lock there. With another
    Python thread running the warning stands (that thread is not copied)."""
    if threading.active_count() > 1:
        return os.fork()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*multi-threaded.*fork\(\)",
                                category=DeprecationWarning)
        return os.fork()


def fork(machine: Machine) -> int:
    """Drain ``machine`` and fork the process; returns the child's pid in the parent and 0
    in the child, whose machine runs on its own VM from the same state (module docstring).
    Call it from the thread that runs the machine, between runs."""
    from kvmfw.checkpoint.state import capture

    if machine._closed or machine.vm is None:
        raise ForkError("this machine is closed")
    if any(c.parallel for c in machine.cpus):
        raise ForkError("cannot fork during a parallel run: fork(2) would keep only this "
                        "thread of the vCPU threads (fork between runs)")
    if machine.gdb is not None:
        raise ForkError("cannot fork a machine with a GDB server attached: its connection "
                        "would be shared by both processes (detach GDB first)")
    shared = [r.name for r in machine.memory if r.path is not None and not r.private
              and not r.readonly]
    if shared:
        raise ForkError(f"cannot fork: memory region {shared[0]} is a shared file mapping, "
                        "which parent and child would both write (map it private)")
    machine.drain()
    state = capture(machine)
    dirty = machine.memory.dirty
    if dirty is not None:
        dirty.harvest()  # the KVM log of the parent's VM is out of the child's reach
    for stream in (sys.stdout, sys.stderr):  # else buffered output is written twice
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    pid = _fork()
    if pid:
        machine.forks += 1
        return pid
    try:
        rebuild_in_child(machine, state)
        for d in machine.devices:
            d.after_fork(os.getpid())
    except BaseException as exc:  # never return into the parent's code path
        try:
            sys.stderr.write(f"kvmfw: error: forked child {os.getpid()} could not rebuild "
                             f"its machine: {type(exc).__name__}: {exc}\n")
            sys.stderr.flush()
        finally:
            os._exit(CHILD_FAILED)
    machine.forks = 0
    return 0


def rebuild_in_child(machine: Machine, state: MachineState) -> None:
    """In a forked child: drop the parent's KVM objects and build this process's own VM
    and vCPUs in their place, loaded with ``state`` (captured before the fork)."""
    vm = machine.vm
    kvm = machine.kvm
    assert vm is not None and kvm is not None
    # 1. the parent's KVM objects: only this process's references are dropped
    for cpu in machine.cpus:
        t = cpu._timer
        if t is not None:  # timers are not inherited by fork(2): nothing to delete
            t._timer = 0
        cpu.close()
        cpu.cycle_source = None
    for v in vm.vcpus:
        v.close()
    vm.vcpus.clear()
    for d in vm.devices:
        d.close()
    vm.devices.clear()
    os.close(vm.fd)
    vm.fd = -1
    machine.hooks.call("fork_child", machine=machine)  # the arch forgets the old VM
    # 2. a new VM in the same object
    from kvmfw.abi import IOCTLS, ioctl

    vm.fd = ioctl(kvm.fd, IOCTLS.KVM_CREATE_VM, getattr(vm, "machine_type", 0))
    vm._free_slots = []
    vm._next_slot = 0
    vm._next_vcpu_id = 0
    vm.irqchip_in_kernel = False
    zones = list(vm.coalesced_zones)
    vm.coalesced_zones = []
    memory, bus = vm.memory, machine.bus
    scratch = GuestMemory()
    vm.memory, machine.bus = scratch, Bus(bus.unclaimed)
    try:  # VM-wide set-up; its RAM and bus mappings exist already in this process
        machine.hooks.call("machine_configure", machine=machine)
    finally:
        vm.memory, machine.bus = memory, bus
        for r in list(scratch):
            if r.slot is not None:
                vm._set_slot(r.slot, None)
                r.slot = None
            r.close()
        vm._free_slots = []
        vm._next_slot = 0
    logged = memory.dirty is not None
    for r in memory:
        r.slot = vm._alloc_slot()
        flags = constants.KVM_MEM_READONLY if r.readonly else 0
        if logged and not r.readonly:
            flags |= constants.KVM_MEM_LOG_DIRTY_PAGES
        vm._set_slot(r.slot, r, flags)
    # 3. the vCPUs, in id order, into the same KvmCPU/VCpu objects
    for cpu in machine.cpus:
        vcpu = cpu.vcpu
        vcpu.__init__(vm, vm.alloc_vcpu_id())  # type: ignore[misc]
        vm.vcpus.append(vcpu)
        _attach_run_area(cpu)
        cpu.startup()
    # a historic hook cannot be called again through pluggy: call its implementations
    for impl in machine.pm.hook.machine_created.get_hookimpls():
        impl.function(*[machine for _ in impl.argnames])
    for addr, size, pio in zones:
        vm.register_coalesced_mmio(addr, size, pio)
    # 4. the state of the parent at the fork (VM-wide first, then each vCPU)
    from kvmfw.checkpoint.state import _group

    with machine.lock:
        if state.vm is not None:
            _group("field 'vm'", lambda: machine.hooks.call(
                "restore_vm_state", machine=machine, state=state.vm), machine.arch)
        for cpu, s in zip(machine.cpus, state.cpus, strict=True):
            _group(f"field 'cpus'[{cpu.id}]",
                   lambda c=cpu, s=s: machine.hooks.call("restore_arch_state", cpu=c,
                                                         state=s), machine.arch)
    machine._start_clock()


def _attach_run_area(cpu: Any) -> None:
    """Point the run loop's cached ``kvm_run`` references at the re-created vCPU (the
    fields :class:`~kvmfw.cpu.KvmCPU` caches in ``__init__``: keep this in step with it;
    tests/test_fork.py fails if a cached fd or run area is missed)."""
    vcpu = cpu.vcpu
    cpu._fd = vcpu.fd
    cpu._run = vcpu.run
    cpu._map = vcpu.run_map
    cpu._view = vcpu.run_view
    cpu._run_addr = address_of(vcpu.run)
    cpu._run_size = len(vcpu.run_map)
    fs = getattr(cpu, "_fs", None)
    if fs is not None:  # a C fast-path state that caches the fd and run area too
        runs = cpu.runs  # counted partly in it: kept monotonic across the swap
        cpu._fs = type(fs)(vcpu.fd, cpu._run_addr, cpu._run_size)
        cpu._ctx = cpu._fs.ctx
        cpu.runs = runs
    for name in ("use_coalesced_mmio", "_use_coalesced_mmio"):
        if name in vars(cpu):
            setattr(cpu, name, getattr(cpu, name) and bool(vcpu.coalesced_ring_offset))
    cpu._update_extras()  # (sets the C entry state's ring offset, new with it)


# --- variants -------------------------------------------------------------------------

@dataclass
class VariantResult:
    """One child of :func:`run_variants`."""

    index: int
    value: Any
    pid: int
    status: int
    """The child's exit status (0: ``fn`` returned; :data:`CHILD_FAILED`: it raised or the
    child could not rebuild; ``-N``: killed by signal N)."""
    result: Any = None
    """What ``fn`` returned (pickled across), or None."""
    error: str = ""
    """The exception ``fn`` raised, as one line."""
    seconds: float = 0.0


def run_variants(machine: Machine, values: Iterable[Any],
                 fn: Callable[[Machine, Any], Any], *,
                 max_parallel: int | None = None) -> list[VariantResult]:
    """Fork one child of ``machine`` per value; each calls ``fn(machine, value)`` on its
    own copy and exits; the parent (whose machine is left as it was) returns their
    results in ``values`` order. At most ``max_parallel`` children run at once (default:
    the number of host CPUs)."""
    items = list(values)
    limit = max(1, max_parallel or os.cpu_count() or 1)
    results: list[VariantResult] = []
    running: dict[int, tuple[VariantResult, float]] = {}
    with tempfile.TemporaryDirectory(prefix="kvmfw-variants-") as tmp:
        out = Path(tmp)
        for i, value in enumerate(items):
            while len(running) >= limit:
                _reap(running, out)
            pid = machine.fork()
            if pid == 0:
                _variant_child(machine, fn, value, out / f"{i}.result")
            r = VariantResult(i, value, pid, -1)
            results.append(r)
            running[pid] = (r, time.monotonic())
        while running:
            _reap(running, out)
    return results


def _variant_child(machine: Machine, fn: Callable[[Machine, Any], Any], value: Any,
                   path: Path) -> None:
    status = 0
    try:
        payload: Any = ("ok", fn(machine, value))
    except BaseException as exc:
        payload = ("error", f"{type(exc).__name__}: {exc}")
        status = CHILD_FAILED
    try:
        data = pickle.dumps(payload)
        if len(data) > RESULT_MAX:
            data = pickle.dumps(("error", f"result of {len(data)} bytes is larger than "
                                          f"{RESULT_MAX}"))
            status = CHILD_FAILED
        path.write_bytes(data)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


def _reap(running: dict[int, tuple[VariantResult, float]], out: Path) -> None:
    """Wait until one of ``running`` ends and record it (only our own pids are waited
    for: other children of this process are left alone)."""
    while True:
        for pid in list(running):
            done, wstatus = os.waitpid(pid, os.WNOHANG)
            if done:
                _record(running.pop(pid), wstatus, out)
                return
        time.sleep(0.002)


def _record(entry: tuple[VariantResult, float], wstatus: int, out: Path) -> None:
    r, t0 = entry
    r.seconds = time.monotonic() - t0
    r.status = os.waitstatus_to_exitcode(wstatus)
    path = out / f"{r.index}.result"
    try:
        with path.open("rb") as f:
            data = f.read(RESULT_MAX + 1)
    except FileNotFoundError:
        r.error = r.error or "the child wrote no result"
        return
    if len(data) > RESULT_MAX:
        r.error = "the child's result is too large"
        return
    try:
        kind, payload = pickle.loads(data)
    except Exception as exc:
        r.error = f"the child's result is unreadable: {exc}"
        return
    if kind == "ok":
        r.result = payload
    else:
        r.error = str(payload)
