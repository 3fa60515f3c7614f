"""Guest instruction stops through the host PMU (gem5's ``PerfKvmCounter::setupInstStop``).

A hardware instructions counter is opened on the vCPU's thread, guest-only
(``exclude_host``), with ``sample_period = N`` and one overflow armed
(``PERF_EVENT_IOC_REFRESH 1``); its overflow raises the core's kick signal on that thread
(``F_SETOWN_EX`` + ``F_SETSIG`` + ``O_ASYNC``), so ``KVM_RUN`` returns ``EINTR`` and the
plugin's ``post_run`` ends the run with reason ``instruction stop``. The PMU's interrupt is
taken some instructions after the counter passes N (the skid): :attr:`InstStop.overshoot`
is what the counter says was retired beyond N, measured, not assumed.

The cycle source and the instruction statistics themselves are the core's
(:mod:`kvmfw.timer`: perf cycles + instructions when they open, else the fallback it reports).

Where the PMU has no instructions event (no PMU; QEMU's emulated PMU without ``-icount``)
:func:`open_inst_stop` raises :class:`PerfUnavailable` with the reason.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct
import threading
from typing import TYPE_CHECKING

from kvmfw.errors import KvmfwError
from kvmfw.vcpu import KICK_SIGNAL

if TYPE_CHECKING:
    from kvmfw.cpu import KvmCPU

_SYS_PERF_EVENT_OPEN = {"aarch64": 241, "arm64": 241, "x86_64": 298}
PERF_TYPE_HARDWARE = 0
PERF_COUNT_HW_INSTRUCTIONS = 1
_ATTR_SIZE = 128
_DISABLED, _PINNED, _EXCLUDE_HV, _EXCLUDE_HOST = 1 << 0, 1 << 2, 1 << 6, 1 << 19
PERF_EVENT_IOC_ENABLE, PERF_EVENT_IOC_DISABLE = 0x2400, 0x2401
PERF_EVENT_IOC_REFRESH, PERF_EVENT_IOC_RESET = 0x2402, 0x2403
F_SETSIG, F_SETOWN_EX, F_OWNER_TID = 10, 15, 0
MAX_PERIOD = 1 << 62


class PerfUnavailable(KvmfwError):
    """The host cannot count guest instructions (no PMU event, or not permitted)."""

    exit_status = 8


def _perf_event_open(attr: bytes, tid: int) -> int:
    nr = _SYS_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise PerfUnavailable(f"perf_event_open: unknown syscall number on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = libc.syscall(nr, buf, tid, -1, -1, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def instruction_attr(period: int) -> bytes:
    """A ``perf_event_attr``: guest-only hardware instructions, disabled until armed, with an
    overflow every ``period`` instructions."""
    if not 1 <= period <= MAX_PERIOD:
        raise ValueError(f"instruction stop period {period} outside 1..{MAX_PERIOD}")
    attr = bytearray(_ATTR_SIZE)
    struct.pack_into("<IIQQ", attr, 0, PERF_TYPE_HARDWARE, _ATTR_SIZE,
                     PERF_COUNT_HW_INSTRUCTIONS, period)
    struct.pack_into("<Q", attr, 40, _DISABLED | _PINNED | _EXCLUDE_HV | _EXCLUDE_HOST)
    struct.pack_into("<I", attr, 48, 1)  # wakeup_events: signal on every overflow
    return bytes(attr)


class InstStop:
    """One armed instruction stop on a vCPU (see the module doc)."""

    def __init__(self, fd: int, target: int) -> None:
        self.fd = fd
        self.target = target
        self.stopped_at: int | None = None
        """The counter's value when the stop was taken (None: not yet)."""

    def count(self) -> int:
        return int(struct.unpack("<Q", os.read(self.fd, 8))[0])

    def check(self) -> bool:
        """After a signal exit: True (once) if the counter has reached the target."""
        if self.stopped_at is not None or self.fd < 0:
            return False
        n = self.count()
        if n < self.target:
            return False
        self.stopped_at = n
        fcntl.ioctl(self.fd, PERF_EVENT_IOC_DISABLE, 0)
        return True

    @property
    def overshoot(self) -> int | None:
        """Instructions retired past the target before the stop (None: not stopped)."""
        return None if self.stopped_at is None else self.stopped_at - self.target

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:  # the board holding it goes with its machine
        self.close()


def open_inst_stop(cpu: KvmCPU, instructions: int, tid: int | None = None) -> InstStop:
    """Arm a stop after ``instructions`` guest instructions on ``cpu``. The counter follows
    the thread that runs the vCPU and signals it: ``tid``, else the vCPU's bound thread, else
    the calling thread (a serial :meth:`Machine.run` runs its vCPUs in its caller)."""
    tid = tid or cpu.vcpu.thread_tid or threading.get_native_id()
    try:
        fd = _perf_event_open(instruction_attr(instructions), tid)
    except OSError as exc:
        why = {errno.ENOENT: "the PMU has no instructions event here (no PMU, or QEMU's "
                             "emulated PMU without -icount)",
               errno.EOPNOTSUPP: "the PMU cannot count guest-only or sample",
               errno.EACCES: "not permitted (kernel.perf_event_paranoid)",
               errno.EPERM: "not permitted (kernel.perf_event_paranoid)"}.get(
                   exc.errno or 0, f"perf_event_open failed: {exc}")
        raise PerfUnavailable(f"cannot stop after {instructions} instructions: {why}") from None
    try:
        fcntl.fcntl(fd, F_SETOWN_EX, struct.pack("<ii", F_OWNER_TID, tid))
        fcntl.fcntl(fd, F_SETSIG, int(KICK_SIGNAL))
        fcntl.fcntl(fd, fcntl.F_SETFL, os.O_ASYNC | os.O_NONBLOCK)
        fcntl.ioctl(fd, PERF_EVENT_IOC_RESET, 0)
        fcntl.ioctl(fd, PERF_EVENT_IOC_REFRESH, 1)
    except OSError:
        os.close(fd)
        raise
    return InstStop(fd, instructions)
