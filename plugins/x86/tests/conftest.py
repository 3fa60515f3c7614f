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


# Known failures on a hardware KVM (the nested environment's kvm_amd, where the runner sets
# KVMFW_L1_SPEED). These tests place their checkpoint, fork or NMI by simulated time or
# count timer ticks in the result, assuming kvm_pvm's speed: on a hardware KVM the guest
# outruns them. Seen: the guest finishes before the checkpoint tick ("not
# mid-computation"), one checkpoint instead of three, a tick count of 0 against 18 in the
# result. They pass on this host's kvm_pvm. To do (issue 11's note): place the stop
# by a guest event instead of a tick, then drop this list. strict=False, so a test that
# passes shows as XPASS, not as a failure.
HW_KVM_RESTORE_XFAIL = {
    "test_checkpoint_cli.py::test_checkpoint_at_a_tick_then_restore_twice_continues_the_output",
    "test_checkpoint_cli.py::test_exit_after_checkpoint_then_restore_gives_the_rest",
    "test_checkpoint_cli.py::test_periodic_incremental_checkpoints_restore_through_the_chain",
    "test_checkpoint_cli.py::test_the_avx_guest_continues_from_a_checkpoint_directory",
    "test_checkpoint_x86.py::test_checkpoint_mid_computation_restores_in_new_process",
    "test_fork_x86.py::test_fork_mid_computation_all_three_finish_right",
    "test_state_checkpoint.py::test_pending_nmi_and_exception_survive_restore",
}


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    if not os.environ.get("KVMFW_L1_SPEED"):
        return
    for item in items:
        if f"{Path(str(item.fspath)).name}::{item.name}" in HW_KVM_RESTORE_XFAIL:
            item.add_marker(pytest.mark.xfail(
                strict=False,
                reason="times its checkpoint by simulated time, which a hardware KVM outruns"))
