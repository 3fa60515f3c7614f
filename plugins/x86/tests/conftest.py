"""Shared fixtures for the x86 plugin tests: a report device and machine builders."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest
from kvmfw.device import Range
from kvmfw.machine import Machine, MachineConfig

from kvmfw_x86.plugin import X86Plugin

GUESTS = Path(__file__).parent / "guests"
MiB = 1 << 20


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


requires_kvm = pytest.mark.skipif(not kvm_usable(), reason="needs a working /dev/kvm")


MARK = 2
"""Reporter port offset (0xe2) where a guest marks a point the host may stop at."""


class Reporter:
    """Test device: port 0xe0 (and MMIO 0xd0000000) collect values, 0xe4/+8 end the run;
    port 0xe2 is a mark: counted, and it ends the run while ``stop_at_mark`` is set (the
    host checkpoints or forks there: a point the guest chose, not a point in time)."""

    def __init__(self) -> None:
        self.values: list[int] = []
        self.machine: Machine | None = None
        self.marks = 0
        self.stop_at_mark = False

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if offset in (0, 0x1000):
            self.values.append(int.from_bytes(data, "little"))
        elif offset == MARK:
            self.marks += 1
            if self.stop_at_mark:
                assert self.machine is not None
                self.machine.request_exit(0, "reporter: guest mark")
        else:
            assert self.machine is not None
            self.machine.request_exit(0, "reporter: guest done")


def make_machine(*, memory: int = 64 * MiB, cpus: int = 1, irqchip: str = "userspace",
                 **options: Any) -> tuple[Machine, Reporter]:
    cfg = MachineConfig(arch="x86", memory=memory, cpus=cpus, default_devices=False,
                        options={"irqchip": irqchip, **options})
    m = Machine(cfg, arch_plugin=X86Plugin(), arch_name="x86")
    rep = Reporter()
    rep.machine = m
    m.map_device(Range("pio", 0xE0, 8, "reporter"), rep)
    m.map_device(Range("mmio", 0xD0000000, 0x10, "reporter-mmio"), _MmioReporter(rep))
    return m, rep


class _MmioReporter:
    def __init__(self, rep: Reporter) -> None:
        self.rep = rep

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.rep.write(0x1000 if offset == 0 else 4, data)


def dwords(values: list[int]) -> list[int]:
    return [v & 0xFFFFFFFF for v in values]


def u64(lo: int, hi: int) -> int:
    return struct.unpack("<Q", struct.pack("<II", lo, hi))[0]


@pytest.fixture
def machine_factory():  # type: ignore[no-untyped-def]
    made: list[Machine] = []

    def make(**kw: Any) -> tuple[Machine, Reporter]:
        m, r = make_machine(**kw)
        made.append(m)
        return m, r

    yield make
    for m in made:
        m.close()


def bzimage(version: int = 0x20F, xload: int = 1, kernel: bytes = b"\x90" * 4096,
            syssize: int | None = None) -> bytes:
    """A minimal bzImage (boot protocol ``version``, 64-bit entry) around ``kernel``."""
    setup_sects = 4
    img = bytearray((setup_sects + 1) * 512)
    img[0x1F1] = setup_sects
    struct.pack_into("<I", img, 0x1F4, (syssize if syssize is not None else len(kernel) // 16))
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    img[0x200] = 0xEB
    img[0x201] = 0x6A  # header ends at 0x26c
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, version)
    img[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", img, 0x22C, 0x37FFFFFF)  # initrd_addr_max
    struct.pack_into("<I", img, 0x230, 0x200000)  # kernel_alignment
    img[0x234] = 1  # relocatable
    struct.pack_into("<H", img, 0x236, xload)
    struct.pack_into("<I", img, 0x238, 2048)  # cmdline_size
    struct.pack_into("<Q", img, 0x258, 0x1000000)  # pref_address
    struct.pack_into("<I", img, 0x260, 0x10000)  # init_size
    return bytes(img) + kernel
