"""Test helpers: whether this host has a real arm64 ``/dev/kvm`` (KVM tests skip otherwise),
the MMIO device of the test guest, and a busybox initramfs for the Linux boot test."""

from __future__ import annotations

import gzip
import os
import platform
from collections.abc import Callable
from typing import Any

from kvmfw import initramfs

ENV_HINT = "run plugins/armv8/env/run-arm64-kvm.sh to run them in an emulated arm64 host"


def arm64_kvm_unavailable_reason() -> str | None:
    """None if this host has a usable arm64 ``/dev/kvm``, else a one-line reason."""
    machine = platform.machine()
    if machine not in ("aarch64", "arm64"):
        return f"needs an arm64 /dev/kvm, this host is {machine} ({ENV_HINT})"
    if not os.path.exists("/dev/kvm"):
        return f"no /dev/kvm on this arm64 host ({ENV_HINT})"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


def host_gic() -> str:
    """The ``gic`` option the KVM tests build machines with: ``v2``/``v3`` as the arm64
    environment's ``KVMFW_ARM64_GIC`` says (2 or 3), else ``auto`` (v3, else v2)."""
    return {"2": "v2", "3": "v3"}.get(os.environ.get("KVMFW_ARM64_GIC", ""), "auto")


class TestDevice:
    """The MMIO device the test guest reports to (offsets documented in testguest.S)."""

    def __init__(self, machine: Any, on_ready: Callable[[], None] | None = None,
                 host_value: int = 0x1234, pause: bool = True) -> None:
        self.machine = machine
        self.pause = pause
        """Stop the run at the guest's pause write (0x28); False lets a guest that uses 0x28
        for its own stop point (the AArch32 guest) decide."""
        self.on_ready = on_ready
        self.on_irq: Callable[[int], None] | None = None
        """Called with the INTID the guest's handler reports (before its EOI)."""
        self.host_value = host_value
        self.writes: list[tuple[int, int]] = []
        self.results: list[int] = []
        self.irqs: list[int] = []

    def value(self, offset: int) -> int | None:
        """The last value written at ``offset``."""
        for off, val in reversed(self.writes):
            if off == offset:
                return val
        return None

    def read(self, offset: int, size: int) -> bytes:
        val = self.host_value if offset == 0x10 else 0
        return val.to_bytes(8, "little")[:size]

    def write(self, offset: int, data: bytes) -> None:
        val = int.from_bytes(data, "little")
        self.writes.append((offset, val))
        if offset == 0x00:
            self.results.append(val)
        elif offset in (0x08, 0x110):
            self.machine.request_exit(0, "test guest done")
        elif offset == 0x28 and self.pause:
            self.machine.request_exit(0, "test guest paused")
        elif offset == 0x18 and self.on_ready is not None:
            self.on_ready()
        elif offset == 0x20:
            self.irqs.append(val)
            if self.on_irq is not None:
                self.on_irq(val)
        elif offset == 0x50:
            self.machine.request_exit(99, f"unexpected guest exception, ESR {val:#x}")


# --- a busybox initramfs for the Linux boot test ---------------------------------------------

BOOT_MARKER = "KVMFW_ARM64_INIT_OK"
"""What the test initramfs's /init prints on the console once it has read a line."""
READY_PROMPT = "KVMFW_ARM64_READY"
"""What the test initramfs's /init prints before it reads a line from the console."""

_S_IFDIR, _S_IFREG, _S_IFCHR = 0o040000, 0o100000, 0o020000


def newc_archive(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A cpio archive in the ``newc`` format the kernel unpacks into its initramfs
    (:func:`kvmfw.initramfs.archive`).

    ``entries``: ``(path, mode, data, (rdev_major, rdev_minor))`` in order (directories
    before what they contain). Device nodes need no privileges to describe here.
    """
    return initramfs.archive(entries)


def busybox_initramfs(busybox: bytes, marker: str = BOOT_MARKER,
                      prompt: str = READY_PROMPT, read_timeout: int = 60,
                      init: str | None = None,
                      extra: list[tuple[str, int, bytes, tuple[int, int]]] | None = None
                      ) -> bytes:
    """A gzip-compressed initramfs: a static ``busybox`` and an ``/init`` that prints
    ``prompt``, reads one line from the console (up to ``read_timeout`` s), prints
    ``marker uptime=SECONDS got=LINE`` and powers off at once (``poweroff -f``: PSCI
    SYSTEM_OFF). ``init``: another /init script; ``extra``: more ``newc_archive`` entries
    (after /bin, /dev, /proc)."""
    bb = "/bin/busybox"
    script = init or ("#!/bin/busybox sh\n"
                      f"{bb} mount -t proc proc /proc\n"
                      f"echo {prompt}\n"
                      f"read -r -t {read_timeout} line\n"
                      f"echo \"{marker} uptime=$({bb} cut -d' ' -f1 /proc/uptime) got=$line\"\n"
                      f"{bb} poweroff -f\n")
    entries = [
        ("bin", _S_IFDIR | 0o755, b"", (0, 0)),
        ("bin/busybox", _S_IFREG | 0o755, busybox, (0, 0)),
        ("dev", _S_IFDIR | 0o755, b"", (0, 0)),
        ("dev/console", _S_IFCHR | 0o600, b"", (5, 1)),
        ("proc", _S_IFDIR | 0o755, b"", (0, 0)),
        *(extra or []),
        ("init", _S_IFREG | 0o755, script.encode(), (0, 0)),
    ]
    return gzip.compress(newc_archive(entries), compresslevel=1, mtime=0)


S_IFREG, S_IFCHR = _S_IFREG, _S_IFCHR
