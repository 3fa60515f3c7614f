"""What :class:`~kvmfw.machine.Machine` calls: take a checkpoint (full or incremental),
and take one the guest or the host requested during a run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmfw.checkpoint import writer
from kvmfw.checkpoint.reader import load_manifest
from kvmfw.checkpoint.state import capture
from kvmfw.debug import get_logger
from kvmfw.errors import CheckpointError

if TYPE_CHECKING:
    from kvmfw.machine import Machine

log = get_logger("kvmfw.checkpoint")


def checkpoint(machine: Machine, path: str | os.PathLike[str], *,
               incremental: bool = False) -> Path:
    """Drain ``machine`` and write a checkpoint to ``path``. ``incremental``: store only the
    pages changed since this machine's previous checkpoint (or the one it was restored
    from), with a link to it; the first checkpoint of a machine is always full."""
    machine.drain()
    state = capture(machine)
    parent = getattr(machine, "_ckpt_parent", None)
    tracker = getattr(machine, "_ckpt_tracker", None)
    incremental = incremental or machine.checkpoint_incremental
    if incremental and parent is not None and tracker is not None:
        out = writer.write(machine, path, state=state, parent=parent,
                           dirty=tracker.collect())
    else:
        out = writer.write(machine, path, state=state)
        if incremental:  # the base of the next one: track from now on
            if tracker is None:
                tracker = _tracker(machine)
            tracker.collect()
    if tracker is not None:
        machine._ckpt_tracker = tracker  # type: ignore[attr-defined]
    machine._ckpt_parent = load_manifest(out)  # type: ignore[attr-defined]
    machine.checkpoints_taken.append(out)
    return out


def track_from_here(machine: Machine) -> None:
    """Start tracking dirty pages now, so the next ``incremental`` checkpoint stores only
    the pages changed since the checkpoint this machine was restored from (or its last)."""
    if getattr(machine, "_ckpt_tracker", None) is None:
        machine._ckpt_tracker = _tracker(machine)  # type: ignore[attr-defined]


def _tracker(machine: Machine) -> Any:
    make = getattr(machine, "dirty_tracker", None)
    if make is None:
        raise CheckpointError("incremental checkpoints need dirty-page tracking "
                              "(kvmfw.dirty), which this kvmfw lacks")
    return make()


def next_path(directory: str | os.PathLike[str], tick: int) -> Path:
    """``directory/cpt.<tick>``, or ``cpt.<tick>.<n>`` if that exists."""
    d = Path(directory)
    p = d / f"cpt.{tick}"
    n = 1
    while p.exists():
        p = d / f"cpt.{tick}.{n}"
        n += 1
    return p


def take_requested(machine: Machine) -> None:
    """The run loop stopped for :meth:`Machine.request_checkpoint
    <kvmfw.machine.Machine.request_checkpoint>`: write ``cpt.<tick>`` into the
    machine's checkpoint directory; end the run if asked to. A failure raises
    :class:`~kvmfw.errors.CheckpointError` out of the run: a checkpoint the user asked for
    is never lost silently."""
    machine.checkpoint_pending = False
    directory = machine.checkpoint_dir or "."
    why = _refusal(machine, directory)
    if why is not None:
        if not machine.checkpoints_refused:
            log.warning("checkpoint refused: %s (later refusals are counted, not logged)", why)
        machine.checkpoints_refused.append(why)
        return
    path = next_path(directory, machine.eventq.cur_tick)
    out = checkpoint(machine, path, incremental=machine.checkpoint_incremental)
    log.info("checkpoint written to %s", out)
    if machine.exit_after_checkpoint:
        machine.request_exit(0, f"checkpoint written to {out}")


def _refusal(machine: Machine, directory: str) -> str | None:
    """Why a requested checkpoint must not be written (a guest may ask in a loop)."""
    if len(machine.checkpoints_taken) >= machine.checkpoint_limit:
        return (f"{machine.checkpoint_limit} checkpoints written already (the limit; "
                "raise Machine.checkpoint_limit or --checkpoint-limit)")
    try:
        st = os.statvfs(directory)
    except OSError:
        return None  # the write itself reports a directory that is not there
    free = st.f_bavail * st.f_frsize
    if free < machine.checkpoint_min_free:
        return (f"{free >> 20} MiB free in {directory}, below the floor of "
                f"{machine.checkpoint_min_free >> 20} MiB (free space or lower "
                "Machine.checkpoint_min_free)")
    return None
