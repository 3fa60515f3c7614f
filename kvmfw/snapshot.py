"""In-process snapshots for fuzzers and sweeps: :meth:`Machine.snapshot` and
:meth:`Machine.reset_to`.

A harness drives them in a loop::

    snap = machine.snapshot()          # drains, captures state, copies RAM once
    for case in cases:
        write_input(machine, case)     # machine.memory.write(...): tracked
        result = machine.run(timeout=1)
        machine.reset_to(snap)         # only the pages dirtied since are copied back
    snap.close()                       # or ``with machine.snapshot() as snap:``

What a snapshot holds: the machine's state as :func:`kvmfw.checkpoint.state.capture` gives
it (every vCPU's ``save_arch_state``, the VM-wide ``save_vm_state``: in-kernel irqchip, PIT,
KVM clock, vGIC; every device's ``save()``; simulated time and the run state) and a private
copy of every RAM region (the baseline), plus a :class:`~kvmfw.dirty.DirtyTracker` that
records which pages the guest (KVM's dirty log) or kvmfw (device DMA, loaders,
``GuestMemory.write``) changed since the snapshot or the last ``reset_to``.

:meth:`Machine.reset_to` drains the machine, copies back from the baseline only those
pages (in runs of adjacent pages), tells every other live tracker (an incremental
checkpoint chain, another snapshot) that those pages changed, then restores the state in
:func:`~kvmfw.checkpoint.state.apply`'s order: VM state, vCPUs, devices, time. Its cost
grows with the pages dirtied, not with RAM size; ``benchmarks/snapshot.py`` measures it.

Why a copy rather than a copy-on-write mapping: a reset of a few pages is then a few
memcpy calls into RAM that KVM keeps mapped; remapping pages (``MADV_DONTNEED`` over a
``MAP_PRIVATE`` file) would make the guest fault every one of them in again. The price is
a second copy of RAM per snapshot (taken once; all-zero chunks of the baseline stay
unallocated).

Host state behind devices that the device state refers to is put back where the device
can (:meth:`~kvmfw.device.Device.snapshot_take`): a virtio-blk disk with ``snapshot=on``
(or in a forked child) keeps its writes in an overlay, and ``reset_to`` puts back the
overlay's sectors the guest overwrote since (kept once each, on their first write after
the snapshot). Not covered: a plain writable disk (the guest's writes reach the image and
stay: give fuzzed guests ``snapshot=on``, a read-only or a scratch disk), and memory
regions added or removed after the snapshot (``reset_to`` refuses). The state is trusted
(this machine made it), so ``reset_to`` does not roll back: if restoring fails it raises
:class:`~kvmfw.errors.CheckpointError` and the machine must be reset to a snapshot again
or closed.
"""

from __future__ import annotations

import mmap
import time
from typing import TYPE_CHECKING, Any

from kvmfw.dirty import DirtyTracker, bitmap_runs
from kvmfw.errors import CheckpointError, KvmfwError
from kvmfw.memory import PAGE_SIZE, MemoryRegion

if TYPE_CHECKING:
    from kvmfw.checkpoint.state import MachineState
    from kvmfw.machine import Machine

__all__ = ["Snapshot", "take", "reset_to"]

_CHUNK = 1 << 21
_ZERO_CHUNK = bytes(_CHUNK)


class Snapshot:
    """A machine's state and RAM at one instant; made by :meth:`Machine.snapshot`."""

    def __init__(self, machine: Machine, state: MachineState, tracker: DirtyTracker,
                 baseline: dict[MemoryRegion, mmap.mmap],
                 devices: list[tuple[Any, Any]] | None = None) -> None:
        self.machine = machine
        self.state = state
        self._devices = devices or []
        """(device, handle) of every device whose :meth:`~kvmfw.device.Device.snapshot_take`
        gave one (a disk overlay's sectors)."""
        self.tracker: DirtyTracker | None = tracker
        self._baseline = baseline
        self._views = {r: memoryview(m) for r, m in baseline.items()}
        self.resets = 0
        self.pages_restored = 0
        self.timing: dict[str, float] = {"harvest": 0.0, "copy": 0.0, "drain": 0.0,
                                         "state": 0.0}
        """Seconds spent in each part of every ``reset_to`` so far (the benchmark's split)."""

    @property
    def closed(self) -> bool:
        return self.tracker is None

    def close(self) -> None:
        """Release the baseline copy and the dirty tracker (idempotent)."""
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            tracker.close()
        devices, self._devices = self._devices, []
        for d, handle in devices:
            d.snapshot_release(handle)
        for v in self._views.values():
            v.release()
        self._views.clear()
        for m in self._baseline.values():
            m.close()
        self._baseline.clear()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        return {"resets": self.resets, "pages_restored": self.pages_restored,
                **{f"{k}_seconds": v for k, v in self.timing.items()}}


def _copy_region(region: MemoryRegion) -> mmap.mmap:
    """A private copy of ``region``; all-zero chunks are left unwritten (an anonymous
    mapping reads them as zero without allocating them)."""
    copy = mmap.mmap(-1, region.size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    src = region.view
    for off in range(0, region.size, _CHUNK):
        end = min(off + _CHUNK, region.size)
        data = src[off:end].tobytes()  # bytes compare is a memcmp; a memoryview's is not
        if data != _ZERO_CHUNK[:end - off]:
            copy[off:end] = data
    return copy


def take(machine: Machine) -> Snapshot:
    """Drain ``machine`` and snapshot it (:meth:`Machine.snapshot`)."""
    from kvmfw.checkpoint.state import capture

    machine.drain()
    tracker = machine.dirty_tracker()  # before the copy: nothing written after is missed
    baseline: dict[MemoryRegion, mmap.mmap] = {}
    devices: list[tuple[Any, Any]] = []
    try:
        state = capture(machine)
        for region in machine.memory:
            baseline[region] = _copy_region(region)
        for d in machine.devices:
            handle = d.snapshot_take()
            if handle is not None:
                devices.append((d, handle))
    except BaseException:
        tracker.close()
        for m in baseline.values():
            m.close()
        for d, handle in devices:
            d.snapshot_release(handle)
        raise
    return Snapshot(machine, state, tracker, baseline, devices)


def _settle(machine: Machine) -> None:
    """What of a drain a reset needs: no IO/MMIO completion may stay pending in KVM (the
    next KVM_RUN would finish it into the restored registers). The usual case after a run
    that a device ended (an OUT to an exit port) is one half entry; the vCPU's other state
    is about to be replaced, so it need not be pulled or settled. Anything else (an exit
    not yet serviced, a device still completing an access, a device with requests in
    flight) takes the full :meth:`Machine.drain`."""
    full = False
    for cpu in machine.cpus:
        st = cpu.status.value
        if st == "RunningServiceCompletion":
            cpu.half_entry()
        elif st in ("RunningService", "RunningMMIOPending"):
            full = True
    if full or not all(d.is_drained() for d in machine.devices):
        machine.drain()


def reset_to(machine: Machine, snap: Snapshot) -> int:
    """Put ``machine`` back to ``snap`` (:meth:`Machine.reset_to`); returns the number of
    pages copied back."""
    from kvmfw.checkpoint.state import apply

    tracker = snap.tracker
    if snap.machine is not machine:
        raise KvmfwError("this snapshot was taken of another machine")
    if tracker is None:
        raise KvmfwError("this snapshot is closed")
    if tracker.lost_regions or set(machine.memory) != set(snap._baseline):
        raise CheckpointError("reset_to: guest memory regions changed since the snapshot "
                              "(a region was added or removed)")
    t0 = time.perf_counter()
    _settle(machine)
    t1 = time.perf_counter()
    dirty = tracker.collect_bits()
    t2 = time.perf_counter()
    pages = 0
    views = snap._views
    for region, bits in dirty.items():
        if not bits:
            continue
        dst, src = region.view, views[region]
        for first, n in bitmap_runs(bits):
            a, b = first * PAGE_SIZE, (first + n) * PAGE_SIZE
            dst[a:b] = src[a:b]
            pages += n
    log = machine.memory.dirty
    if pages and log is not None:  # restored pages changed for everyone else
        for other in list(log.trackers):
            if other is not tracker:
                other.add_bits(dirty)
    for d, handle in snap._devices:  # host state the device state refers to (a disk)
        d.snapshot_reset(handle)
    t3 = time.perf_counter()
    try:
        apply(machine, snap.state, rollback=False)
    except CheckpointError as exc:
        raise CheckpointError(f"reset_to: {exc}; the machine is not in a known state: "
                              "reset it to a snapshot again or close it") from exc
    t4 = time.perf_counter()
    tm = snap.timing
    tm["drain"] += t1 - t0
    tm["harvest"] += t2 - t1
    tm["copy"] += t3 - t2
    tm["state"] += t4 - t3
    snap.resets += 1
    snap.pages_restored += pages
    return pages
