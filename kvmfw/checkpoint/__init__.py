"""Checkpoints: a drained machine's state (:mod:`.state`), written to and read from a
directory (:mod:`.format`, :mod:`.writer`, :mod:`.reader`). See ``docs/checkpoint.md``."""

from kvmfw.checkpoint.state import MachineState, apply, capture

__all__ = ["MachineState", "apply", "capture"]
