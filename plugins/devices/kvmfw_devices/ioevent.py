"""Guest writes that complete in the kernel (``KVM_IOEVENTFD``), served on the event queue.

A device registers a doorbell (an address, a width, and optionally the value written): the
guest's write then completes inside KVM, which only signals an eventfd, instead of exiting
to userspace and waiting there while the device works. A helper thread waits on the
eventfds and posts one event; the event runs on the machine's run loop like every other
device event (devices stay single-threaded and need no locks of their own) and calls the
device's handler once per doorbell that rang (several rings in between coalesce into one
call, which a doorbell such as virtio's QueueNotify allows: the handler looks at the
queue, not at how often it was rung). Where KVM has no ioeventfd (or ``enabled`` is False),
:meth:`Doorbells.add` returns False and the device keeps taking the exit, with the same
guest-visible behaviour.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable
from typing import Any

from kvmfw.eventq import Event

POLL_SECONDS = 0.5
"""How long the helper thread sleeps in one ``poll`` (it also wakes on :meth:`close`)."""


class Doorbells:
    """The doorbells of one device; ``handler(key)`` is called on the run loop."""

    def __init__(self, ctx: Any, name: str, handler: Callable[[int], None]) -> None:
        self.ctx = ctx
        self.name = name
        self.handler = handler
        self._bells: dict[int, tuple[int, int, int, bool, int | None]] = {}
        """eventfd -> (key, addr, length, pio, datamatch)."""
        self._event = Event(self._serve, name=f"{name}.ioeventfd")
        self._served = threading.Event()
        self._stop = threading.Event()
        self._wakeup = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread: threading.Thread | None = None
        self.rings = 0
        """Handler calls made for doorbells that rang (the exits saved, at least)."""

    def add(self, key: int, addr: int, length: int, *, pio: bool = False,
            datamatch: int | None = None) -> bool:
        """Ring ``handler(key)`` on a guest write at ``addr``; False if KVM cannot."""
        service = self.ctx.services.get("ioeventfd")
        if service is None:
            return False
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            ok = service(fd, addr, length, pio=pio, datamatch=datamatch)
        except BaseException:
            os.close(fd)
            raise
        if not ok:
            os.close(fd)
            return False
        self._bells[fd] = (key, addr, length, pio, datamatch)
        if self._thread is None:
            self._thread = threading.Thread(target=self._wait, name=f"kvmfw-{self.name}-ioevent",
                                            daemon=True)
            self._thread.start()
        return True

    def _wait(self) -> None:
        """Helper thread: one posted event per wave of rings; the next wait starts only
        after that event consumed the eventfds (so a ring is never lost or spun on)."""
        poller = select.poll()
        for fd in (*self._bells, self._wakeup):
            poller.register(fd, select.POLLIN)
        while not self._stop.is_set():
            ready = poller.poll(POLL_SECONDS * 1000)
            if self._stop.is_set():
                return
            if not any(fd != self._wakeup for fd, _ in ready):
                continue
            self._served.clear()
            self.ctx.eventq.post(self._event)  # no-op if already pending
            while not self._served.wait(POLL_SECONDS):
                if self._stop.is_set():
                    return

    def _serve(self) -> None:
        """Run-loop side: call the handler for each doorbell that rang."""
        try:
            self.serve_pending()
        finally:
            self._served.set()

    def serve_pending(self) -> int:
        """Consume every rung doorbell now and call the handler (also before a checkpoint:
        a ring still in an eventfd is an access in flight). Returns the calls made."""
        n = 0
        for fd, (key, *_rest) in list(self._bells.items()):
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                continue
            n += 1
            self.rings += 1
            self.handler(key)
        return n

    def after_fork(self) -> bool:
        """In a forked child (:mod:`kvmfw.fork`), after its VM was rebuilt: the helper
        thread did not survive fork(2), and the inherited eventfds are still the parent
        VM's doorbells (one kernel object in both processes, so the child would see the
        parent's rings). Drop them and ring the same addresses on the child's VM with new
        eventfds. False if KVM refused one (the caller falls back to exits)."""
        bells = list(self._bells.values())
        for fd in self._bells:
            os.close(fd)
        self._bells.clear()
        os.close(self._wakeup)
        self._wakeup = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = None
        self._served, self._stop = threading.Event(), threading.Event()
        return all(self.add(key, addr, length, pio=pio, datamatch=dm)
                   for key, addr, length, pio, dm in bells)

    def close(self) -> None:
        """Stop the helper thread, take the doorbells out of KVM, close the eventfds."""
        self._stop.set()
        os.eventfd_write(self._wakeup, 1)
        self._served.set()
        if self._thread is not None:
            self._thread.join(2 * POLL_SECONDS)
            self._thread = None
        service = self.ctx.services.get("ioeventfd")
        for fd, (_key, addr, length, pio, datamatch) in list(self._bells.items()):
            try:
                if service is not None:
                    service(fd, addr, length, pio=pio, datamatch=datamatch, deassign=True)
            except Exception:  # the VM may be gone already; the fd goes anyway
                pass
            os.close(fd)
        self._bells.clear()
        if self._wakeup >= 0:
            os.close(self._wakeup)
            self._wakeup = -1
