"""The ``kvmfw`` console script: the CLI, with Python's cyclic garbage collector paused
while it starts.

Starting a run allocates some 100k objects (modules, classes, the methods dataclasses
generate, the machine and its devices) and frees almost none of them, while the collector
traverses them again and again as they pile up: 24 collections, ~10 ms of a ~100 ms
start-up here, ten times that on an emulated host. Paused, it runs none. :func:`resume`
(``kvmfw run`` calls it just before the guest starts, every other command before it does
its work) freezes what start-up left (:func:`gc.freeze`: those objects are never traversed
again, so later collections stay short) and turns the collector back on.

Kept apart from :mod:`kvmfw.cli`, whose import is most of the start-up."""

from __future__ import annotations

import gc

_paused = False


def main() -> None:
    """The ``kvmfw`` command (:func:`kvmfw.cli.main`) with the start-up pause."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True
    try:
        from kvmfw.cli import main as cli_main

        cli_main()
    finally:
        resume()


def resume() -> None:
    """End the start-up pause: freeze the objects start-up made and turn the collector
    back on. Idempotent; nothing to do when :func:`main` did not pause it (the CLI called
    from Python, or the collector was off already)."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()
