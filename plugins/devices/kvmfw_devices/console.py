"""Console plumbing shared by the UARTs (16550, PL011): where output goes, where input comes from.

Output (``output=`` key): ``console`` (the machine's console sink, else standard output),
``stderr``, ``none``, or a file path (``file:PATH`` or just ``PATH``).

Input (``input=`` key): ``console`` (the machine's console input, if any), ``stdin`` (the
host terminal in raw mode, restored on close; ``Ctrl-A x`` ends the run, ``Ctrl-A Ctrl-A``
sends a literal ``Ctrl-A``), ``none``, a file or named pipe (``file:PATH``), or a socket
(``unix:PATH``, ``tcp:HOST:PORT``).

Host input is read by a daemon thread and handed to the device on the machine thread through
an event posted on the event queue, so a device only ever runs on one thread. Input is never
dropped and never piles up: the device's ``deliver(data)`` returns how many bytes it took (None:
all), the rest waits in the inbox until the device calls :meth:`ConsoleInput.resume`, and the
reader stops reading while ``INBOX_LIMIT`` bytes wait (a fast file, pipe or socket peer is
throttled to the guest's pace instead of growing host memory).

Posted output (``coalesce=`` key, :class:`PostedOutput`): while a UART's output register
raises no interrupt and feeds nothing back (the device says when), its writes wait in
KVM's coalesced ring instead of exiting one by one; the ring is replayed, in order, before
the next exit of any kind is serviced, and every ``FLUSH_MS`` by an event.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from kvmfw.device import ConfigKey, DeviceContext, parse_bool
from kvmfw.errors import ConfigError
from kvmfw.eventq import TICKS_PER_MS, TICKS_PER_SECOND, Event

from kvmfw_devices._util import cancel, schedule_at

if TYPE_CHECKING:
    import socket

CTRL_A = 0x01
INBOX_LIMIT = 64 * 1024
"""Host bytes read ahead of the device; the reader waits while this many are pending."""
READ_CHUNK = 4096
DELIVER_CHUNK = 16 * 1024

OUTPUT_KEY = ConfigKey(str, "console", "console | stderr | none | file:PATH")
"""The ``output=`` key every console device takes."""

COALESCE_KEY = ConfigKey(parse_bool, True, "output writes that raise no interrupt wait in "
                         "KVM's coalesced ring (replayed within 20 ms): console output "
                         "without an exit per byte")
"""The ``coalesce=`` key of a UART with :class:`PostedOutput`."""

FLUSH_MS = 20
"""Posted output waits at most this long (simulated ms) for a guest that stops exiting."""


def input_key(default: str = "console") -> ConfigKey:
    """The ``input=`` key every console device takes."""
    return ConfigKey(str, default,
                     "console | stdin | none | file:PATH | unix:PATH | tcp:HOST:PORT")


class NullSink:
    """An output that drops everything."""

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass


class ConsoleOutput:
    """A binary sink for a guest console, written in batches.

    A UART hands over one byte per guest access; writing each to the host (a ``write(2)``
    per byte, ~4 ms to a pipe under nested virtualization) cost a Linux boot a quarter of
    a second. Bytes wait in a bounded buffer and go out on a newline, when
    ``FLUSH_BYTES`` wait, ``FLUSH_DELAY`` simulated ticks after the first of them (an
    event: a prompt without a newline still shows promptly), and whenever the owner calls
    :meth:`flush` (run end, save for a checkpoint or fork, restore, close)."""

    FLUSH_BYTES = 4096
    FLUSH_DELAY = TICKS_PER_SECOND // 50  # 20 ms

    def __init__(self, ctx: DeviceContext, spec: str) -> None:
        self._owned: IO[bytes] | None = None
        self.sink: Any
        self.writes = 0
        """Batches handed to the sink (each one host write and flush)."""
        self._pending = bytearray()
        self._eventq = ctx.eventq
        self._event = Event(self.flush, name="console.flush")
        if spec == "console":
            self.sink = ctx.console_output if ctx.console_output is not None else sys.stdout.buffer
        elif spec == "stderr":
            self.sink = sys.stderr.buffer
        elif spec == "none":
            self.sink = NullSink()
        else:
            path = spec.removeprefix("file:")
            try:
                self._owned = open(path, "wb")  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise ConfigError(f"cannot open console output {path}: {exc.strerror}") from exc
            self.sink = self._owned

    def after_fork(self, child: int) -> None:
        """In a forked child: output to a file goes to ``<path>.<pid>`` from now on (the
        parent's file keeps what was written before the fork); a terminal, standard output
        or the machine's console sink stays shared."""
        self._pending.clear()  # (the parent's to write; a fork flushes first: save())
        if self._event.scheduled:
            self._eventq.deschedule(self._event)
        if self._owned is None:
            return
        path = f"{self._owned.name}.{child}"
        self._owned.close()  # this process's descriptor; flushed before the fork
        self._owned = None
        self.sink = NullSink()
        try:
            self._owned = open(path, "wb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise ConfigError(f"cannot open console output {path}: {exc.strerror}") from exc
        self.sink = self._owned

    def write(self, data: bytes) -> None:
        pending = self._pending
        pending += data
        if b"\n" in data or len(pending) >= self.FLUSH_BYTES:
            self.flush()
        elif not self._event.scheduled:
            eq = self._eventq
            eq.post(self._event, eq.cur_tick + self.FLUSH_DELAY)

    def flush(self) -> None:
        """Write out what waits (a no-op when nothing does)."""
        if not self._pending:
            return
        data = bytes(self._pending)
        self._pending.clear()
        self.writes += 1
        try:
            self.sink.write(data)
            self.sink.flush()
        except (OSError, ValueError):
            pass  # a closed terminal or pipe must not stop the guest

    @property
    def pending(self) -> int:
        """Bytes written by the guest and not yet handed to the sink."""
        return len(self._pending)

    def close(self) -> None:
        self.flush()
        if self._event.scheduled:
            self._eventq.deschedule(self._event)
        if self._owned is not None:
            self._owned.close()
            self._owned = None


class PostedOutput:
    """A UART's output register as a zone of KVM's coalesced ring, while its writes may wait.

    A write may wait when it changes nothing a read sees, in Python or in the compiled
    path (no interrupt, no loopback): the device says so at each output write reaching
    it (:meth:`wrote`; the first such write opens the zone) and after anything that may
    change it (:meth:`check`; the zone ends, what waits in the ring delivered first).
    Writes in the ring reach the device as ordinary writes, in order, before the next
    exit is serviced (a write to the device's other registers comes after them) and at
    the latest ``FLUSH_MS`` later (an event); the zone ends at a flush that finds no
    write since the one before, so an idle guest pays for no event and a halted guest's
    run ends at most two flushes later. Where KVM has no ring for the space, or
    ``enabled`` is false, every write exits as before.
    """

    def __init__(self, ctx: DeviceContext, space: str, addr: int, size: int, name: str,
                 enabled: bool) -> None:
        self.ctx = ctx
        self.zone = (addr, size, space == "pio")
        self.active = False
        """Output writes wait in the ring now."""
        self._refused = not enabled  # off, or KVM has no ring for this space
        self._ending = False  # the zone is being ended: what its replay delivers stays out
        self._writes = 0  # output writes since the zone's last flush
        self._event = Event(self._flush, name=f"{name}.flush")

    def wrote(self, may_wait: bool) -> None:
        """An output write reached the device (from an exit or the ring): open the zone if
        the next ones ``may_wait``."""
        self._writes += 1
        if not self.active and may_wait and not self._refused and not self._ending:
            addr, size, pio = self.zone
            service = self.ctx.services.get("coalesced")
            if service is None or not service(addr, size, pio=pio):
                self._refused = True
                return
            self.active = True
            self._writes = 0
            self._schedule()

    def check(self, may_wait: bool) -> None:
        """After a change to what decides it: end the zone unless writes still ``may_wait``."""
        if self.active and not may_wait:
            self._end()

    def _schedule(self) -> None:
        eq = self.ctx.eventq
        schedule_at(eq, self._event, eq.cur_tick + FLUSH_MS * TICKS_PER_MS)

    def _replay(self) -> None:
        replay = self.ctx.services.get("replay_coalesced")
        if replay is not None:
            replay()

    def _flush(self) -> None:
        self._replay()
        if not self.active:
            return  # (a write the replay delivered ended it)
        if not self._writes:
            self._end()  # the guest stopped writing: its writes exit again from now
            return
        self._writes = 0
        self._schedule()

    def _end(self) -> None:
        # what waits in the ring is delivered first; the writes it delivers must neither
        # end the zone again nor open it (the device may call check() and wrote() for them)
        self.active = False
        self._ending = True
        try:
            self._replay()
        finally:
            self._ending = False
        self.close()
        addr, size, pio = self.zone
        service = self.ctx.services.get("coalesced")
        if service is not None:
            service(addr, size, pio=pio, deassign=True)

    def close(self) -> None:
        """No more flushes (the device is closing; the zone goes with the VM)."""
        cancel(self.ctx.eventq, self._event)


class ConsoleInput:
    """Host bytes for a guest UART, delivered on the machine thread via ``deliver(data)``."""

    def __init__(self, ctx: DeviceContext, spec: str,
                 deliver: Callable[[bytes], int | None], name: str = "console") -> None:
        self.ctx = ctx
        self.spec = spec
        self._deliver = deliver
        self._inbox = bytearray()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # the reader waits here for room
        self._closing = False
        self._event = Event(self._flush_inbox, name=f"{name}.input")
        self._fd: int | None = None
        self._owned_fd = False
        self._sock: socket.socket | None = None
        self._tty_saved: list[Any] | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._escape = False
        self._open(spec)

    def _open(self, spec: str) -> None:
        src: Any = None
        if spec == "none":
            return
        if spec == "console" and self.ctx.console_input == "stdin":
            spec = "stdin"  # the CLI's interactive console
        if spec == "console":
            src = self.ctx.console_input
            if src is None:
                return
            if isinstance(src, bytes | bytearray):
                self._inbox += src
                self._post()
                return
            self._fd = src if isinstance(src, int) else src.fileno()
        elif spec == "stdin":
            self._fd = sys.stdin.fileno()
            if os.isatty(self._fd):
                import tty  # (this and socket: only for these inputs, not at start-up)

                self._tty_saved = termios.tcgetattr(self._fd)
                tty.setraw(self._fd)
        elif spec.startswith(("unix:", "tcp:")):
            import socket

            try:
                if spec.startswith("unix:"):
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self._sock.connect(spec[5:])
                else:
                    host, _, port = spec[4:].rpartition(":")
                    self._sock = socket.create_connection((host or "localhost", int(port)))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot connect console input {spec}: {exc}") from exc
            self._fd = self._sock.fileno()
        else:
            path = spec.removeprefix("file:")
            try:
                self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            except OSError as exc:
                raise ConfigError(f"cannot open console input {path}: {exc.strerror}") from exc
            os.set_blocking(self._fd, True)
            self._owned_fd = True
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._reader, name=f"kvmfw-{spec}-reader",
                                        daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        assert self._fd is not None
        while True:
            with self._room:
                while len(self._inbox) >= INBOX_LIMIT and not self._closing:
                    self._room.wait()
                if self._closing:
                    return
            try:
                ready, _, _ = select.select([self._fd, self._wake_r], [], [])
                if self._wake_r in ready:
                    return
                data = os.read(self._fd, READ_CHUNK)
            except OSError:
                return
            if not data:
                return
            if self._tty_saved is not None:
                data = self._filter_escape(data)
            with self._lock:
                self._inbox += data
            self._post()

    def _filter_escape(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            if self._escape:
                self._escape = False
                if b in (ord("x"), ord("X")):
                    self._post_exit()
                    continue
                if b != CTRL_A:
                    out.append(CTRL_A)
                out.append(b)
            elif b == CTRL_A:
                self._escape = True
            else:
                out.append(b)
        return bytes(out)

    def _post_exit(self) -> None:
        ev = Event(lambda: self.ctx.request_exit(0, "console escape (Ctrl-A x)"),
                   name="console.escape")
        self.ctx.eventq.post(ev)

    def _post(self) -> None:
        self.ctx.eventq.post(self._event)  # no-op if already pending

    def _flush_inbox(self) -> None:
        with self._lock:
            data = bytes(self._inbox[:DELIVER_CHUNK])
        if not data:
            return
        taken = self._deliver(data)
        n = len(data) if taken is None else max(0, min(taken, len(data)))
        with self._room:
            del self._inbox[:n]
            self._room.notify_all()
            more = n == len(data) and bool(self._inbox)
        if more:  # the device took it all: offer the next chunk
            self._post()

    def resume(self) -> None:
        """The device has room again: hand it what waits (on the machine thread)."""
        if self._inbox:
            self._post()

    @property
    def pending(self) -> int:
        """Host bytes read but not yet taken by the device."""
        return len(self._inbox)

    def after_fork(self) -> None:
        """In a forked child: console input stays with the parent. The reader thread does
        not exist here; the inherited descriptors are closed (the parent's stay open: a
        socket is closed, not shut down) and the terminal mode is left to the parent.
        Bytes read before the fork and not yet delivered are delivered in both."""
        self._lock = threading.Lock()  # the reader may have held them at the fork
        self._room = threading.Condition(self._lock)
        self._thread = None
        self._closing = True
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self._tty_saved = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        elif self._owned_fd and self._fd is not None:
            os.close(self._fd)
        self._fd = None

    def close(self) -> None:
        """Stop the reader, restore the terminal, close what was opened."""
        with self._room:
            self._closing = True
            self._room.notify_all()
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
            if self._thread is not None:
                self._thread.join(timeout=1.0)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        if self._tty_saved is not None and self._fd is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._tty_saved)
            self._tty_saved = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        elif self._owned_fd and self._fd is not None:
            os.close(self._fd)
        self._fd = None
