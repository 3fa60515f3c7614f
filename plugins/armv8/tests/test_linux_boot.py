"""Debian's arm64 kernel boots under kvmfw-armv8 to a busybox /init on the PL011 console.

Runs on a real arm64 KVM (plugins/armv8/env/run-arm64-kvm.sh); the kernel is the one the
environment boots (``KVMFW_ARM64_KERNEL``, else ``/boot/vmlinuz-*``) and the initramfs is
built from the static busybox (``KVMFW_ARM64_BUSYBOX``, else ``/bin/busybox``).
"""

from __future__ import annotations

import glob
import os
import threading
import time
from pathlib import Path

import pytest
from kvmfw_armv8.testing import BOOT_MARKER, busybox_initramfs

pytestmark = [pytest.mark.arm64_kvm, pytest.mark.slow]

BOOT_TIMEOUT = 240.0
"""Host seconds: the emulated arm64 host of the CI environment boots the inner kernel in
well under a minute; a real arm64 host in under a second."""


def _kernel() -> Path:
    path = os.environ.get("KVMFW_ARM64_KERNEL") or next(
        iter(sorted(glob.glob("/boot/vmlinuz-*"))), "")
    assert path and Path(path).is_file(), (
        "no arm64 kernel: set KVMFW_ARM64_KERNEL or install linux-image-arm64 (/boot/vmlinuz-*)")
    return Path(path)


def _busybox() -> bytes:
    path = Path(os.environ.get("KVMFW_ARM64_BUSYBOX") or "/bin/busybox")
    assert path.is_file(), "no busybox: set KVMFW_ARM64_BUSYBOX or install busybox-static"
    data = path.read_bytes()
    assert b"/lib/ld-linux-aarch64" not in data[:4096], f"{path} is not statically linked"
    return data


class Console:
    """The PL011's output sink: keeps every byte, notes when the marker line appears."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.t0 = time.monotonic()
        self.marker_at: float | None = None
        self.lock = threading.Lock()

    def write(self, data: bytes) -> int:
        with self.lock:
            self.data += data
            if self.marker_at is None and BOOT_MARKER.encode() in self.data:
                self.marker_at = time.monotonic() - self.t0
        return len(data)

    def flush(self) -> None:
        pass

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.data.decode(errors="replace").splitlines()[-lines:])


def test_debian_kernel_boots_busybox_init_on_pl011(tmp_path: Path) -> None:
    from kvmfw_armv8 import board, plugin

    from kvmfw.errors import RunTimeoutError
    from kvmfw.machine import Machine, MachineConfig

    initrd = tmp_path / "initramfs.cpio.gz"
    initrd.write_bytes(busybox_initramfs(_busybox()))
    console = Console()
    cmdline = (f"console=ttyAMA0 earlycon=pl011,{board.UART_BASE:#x} quiet panic=-1 "
               "rdinit=/init")
    cfg = MachineConfig(arch="armv8", memory=256 << 20, cpus=1, use_perf=False,
                        options={"console_output": console})
    with Machine(cfg) as m:
        assert [d.name for d in m.devices][:1] == ["pl011"]  # the default board's console
        m.load_guest(str(_kernel()), initrd=str(initrd), cmdline=cmdline)
        t0 = time.monotonic()
        console.t0 = t0
        try:
            res = m.run(timeout=BOOT_TIMEOUT)
        except RunTimeoutError:
            pytest.fail(f"no power-off within {BOOT_TIMEOUT:g} s; console:\n{console.tail()}\n"
                        f"{m.cpus[0].dump_state()}")
        took = time.monotonic() - t0
        uart = m.devices[0]
        gic = plugin.board_of(m).gic
    text = console.data.decode(errors="replace")
    assert BOOT_MARKER in text, f"{res.reason}; console:\n{console.tail()}"
    assert (res.status, "powered off" in res.reason) == (0, True), (
        f"{res.reason}; console:\n{console.tail()}")
    assert uart.stats["tx_bytes"] == len(console.data)
    line = next(ln for ln in text.splitlines() if BOOT_MARKER in ln)
    print(f"\nlinux boot (gic{gic[1:]}): marker after {console.marker_at:.1f} s, power-off "
          f"after {took:.1f} s host time, {len(console.data)} console bytes; {line.strip()}")

