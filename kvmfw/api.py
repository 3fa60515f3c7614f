"""The pieces of the Python API that are not the machine itself: how a run ended
(:class:`RunEnd`) and what the guest printed (:class:`Console`).

::

    from kvmfw import Machine

    with Machine(arch="x86", memory="64M", devices=["debug-exit"]) as m:
        m.load("examples/guests/hello.elf")
        result = m.run(timeout=10)
        print(result.end, result.status, result.console)
"""

from __future__ import annotations

import enum
import re
import threading
from collections.abc import Callable
from typing import Any

CONSOLE_LIMIT = 1 << 20
"""Bytes of guest console output a :class:`Console` keeps (the newest): a guest printing
forever must not grow host memory."""


WATCH_OVERLAP = 256
"""Bytes before new output a regular-expression ``until`` rescans (a match may straddle
writes; a longer one is found only if it arrives in one write)."""


class RunEnd(enum.Enum):
    """Why :meth:`kvmfw.Machine.run` returned."""

    GUEST = "guest"
    """The guest or a device ended the run (pseudo-op exit, debug-exit, power-off, ...)."""
    HALTED = "halted"
    """Every vCPU halted with interrupts off and no event is pending."""
    UNTIL = "until"
    """The ``until`` condition was met."""
    TICK_LIMIT = "tick-limit"
    """``max_ticks`` simulated ticks passed."""
    INTERRUPTED = "interrupted"
    """Ctrl-C (``KeyboardInterrupt``) on the thread that ran the machine."""
    TIMEOUT = "timeout"
    """The host ``timeout`` passed: only in the ``result`` of the
    :class:`~kvmfw.errors.RunTimeoutError` that :meth:`~kvmfw.Machine.run` raises."""


class Console:
    """What the guest printed on its console devices, as a binary sink the UARTs write to.

    Keeps the newest :data:`CONSOLE_LIMIT` bytes (``dropped`` counts the rest) and passes
    every write on to ``tee`` (a binary stream, e.g. ``sys.stdout.buffer``) if given.
    """

    def __init__(self, tee: Any = None, limit: int = CONSOLE_LIMIT) -> None:
        if limit < 1:
            raise ValueError("a console keeps at least one byte")
        self.tee = tee
        self.limit = limit
        self._buf = bytearray()
        self._total = 0
        self._lock = threading.Lock()  # UARTs write from vCPU threads with 2+ vCPUs
        self._watch: tuple[re.Pattern[bytes], Callable[[], None]] | None = None
        self._scan_from = 0
        self._overlap = 0

    @property
    def dropped(self) -> int:
        """Bytes printed but no longer kept (older than the newest ``limit``)."""
        return self._total - min(len(self._buf), self.limit)

    # --- the sink side (devices) --------------------------------------------------------

    def write(self, data: bytes) -> int:
        with self._lock:
            self._buf += data
            self._total += len(data)
            over = len(self._buf) - 2 * self.limit
            if over > 0:
                # trim to ``limit`` only once twice that piled up: a byte-at-a-time UART
                # must not pay for moving the whole buffer on every byte
                cut = len(self._buf) - self.limit
                del self._buf[:cut]
                self._scan_from = max(0, self._scan_from - cut)
            watch = self._watch
            hit = False
            if watch is not None:
                m = watch[0].search(self._buf, self._scan_from)
                hit = m is not None
                # next time, rescan only the tail a marker could straddle (a literal's
                # length - 1; up to WATCH_OVERLAP bytes for a regular expression)
                self._scan_from = max(self._scan_from, len(self._buf) - self._overlap)
        if self.tee is not None:
            self.tee.write(data)
        if hit:
            assert watch is not None
            self._watch = None
            watch[1]()
        return len(data)

    def flush(self) -> None:
        if self.tee is not None:
            self.tee.flush()

    # --- the reader side (users) --------------------------------------------------------

    @property
    def data(self) -> bytes:
        """The kept output, as bytes."""
        with self._lock:
            return bytes(self._buf[-self.limit:])

    @property
    def text(self) -> str:
        """The kept output, decoded as UTF-8 (undecodable bytes replaced)."""
        return self.data.decode("utf-8", "replace")

    def __str__(self) -> str:
        return self.text

    def __contains__(self, needle: str | bytes) -> bool:
        if isinstance(needle, str):
            needle = needle.encode()
        return needle in self.data

    def clear(self) -> None:
        """Forget what was printed so far (``dropped`` too)."""
        with self._lock:
            self._buf.clear()
            self._total = 0
            self._scan_from = 0

    def watch(self, pattern: str | bytes | re.Pattern[Any] | None,
              callback: Callable[[], None]) -> None:
        """Call ``callback`` once, as soon as the output since now matches ``pattern``
        (text is matched literally, a compiled pattern as a regular expression). None
        removes the watch."""
        with self._lock:
            self._scan_from = len(self._buf)
            self._watch = None if pattern is None else (_compile(pattern), callback)
            self._overlap = WATCH_OVERLAP if isinstance(pattern, re.Pattern) or pattern is None \
                else max(0, len(pattern if isinstance(pattern, bytes) else pattern.encode()) - 1)


def _compile(pattern: str | bytes | re.Pattern[Any]) -> re.Pattern[bytes]:
    if isinstance(pattern, re.Pattern):
        p = pattern.pattern
        return re.compile(p.encode() if isinstance(p, str) else p, pattern.flags & ~re.UNICODE)
    if isinstance(pattern, str):
        pattern = pattern.encode()
    return re.compile(re.escape(pattern))
