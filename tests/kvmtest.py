"""Helpers for the core tests: program numbers, the KVM check, a recording device."""

from __future__ import annotations

import os

import pytest

from kvmfw.machine import Machine

# Programs of tests/guests/realmode.S (selected through AX)
PIO, MMIO, SYNC, SPIN, TRIPLE, HALT, EMUFAIL, PIOLOOP, MMIOLOOP, COUNT = range(1, 11)


def kvm_usable() -> tuple[bool, str]:
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist on this host (no KVM)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable by this user"
    return True, ""


_ok, _why = kvm_usable()
needs_kvm = pytest.mark.skipif(not _ok, reason=_why)


class Recorder:
    """A test device on ports 0x10-0x13 and MMIO 0x20000: records writes, answers reads;
    a write to port 0x13 ends the run with the written value as the exit status."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.writes: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return bytes([0x41 if offset == 1 else 0x33]) * size

    def write(self, offset: int, data: bytes) -> None:
        if offset == 3:
            self.machine.request_exit(data[0], "guest wrote the exit port")
        else:
            self.writes.append((offset, data))
