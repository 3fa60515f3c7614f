"""Debian's 32-bit ARM kernel (armhf ``linux-image-armmp`` zImage) boots as an
``el1_32bit`` guest under kvmfw-armv8 to a busybox (armhf ``busybox-static``) /init.

Runs on a real arm64 KVM whose CPU has AArch32 EL1. The two armhf files are not in the
arm64 environment's root: ``KVMFW_ARM32_KERNEL`` / ``KVMFW_ARM32_BUSYBOX``, else
``/cache/armhf/zImage`` and ``/cache/armhf/busybox`` (the environment's cache directory,
``$KVMFW_ARM64_CACHE/armhf`` on the host); fetch them with
``apt-get download linux-image-6.1.0-*-armmp:armhf busybox-static:armhf`` (an apt with the
armhf index) and ``dpkg-deb -x``. Without them the test skips and says so.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from kvmfw_armv8.testing import BOOT_MARKER, busybox_initramfs, host_gic
from test_linux_boot import Console

pytestmark = [pytest.mark.arm64_kvm, pytest.mark.slow]

BOOT_TIMEOUT = 300.0
"""Host seconds: the emulated arm64 host decompresses the XZ zImage and boots it in about a
minute; a real arm64 host in about a second."""


def _file(env: str, default: str) -> Path:
    path = Path(os.environ.get(env) or default)
    if not path.is_file():
        pytest.skip(f"no 32-bit ARM {path.name} at {path} (set {env}; see the module doc)")
    return path


def test_debian_armmp_zimage_boots_as_aarch32_guest(tmp_path: Path) -> None:
    from kvmfw_armv8 import aarch32, board

    from kvmfw.errors import RunTimeoutError
    from kvmfw.kvm import Kvm
    from kvmfw.machine import Machine, MachineConfig

    with Kvm() as kvm:
        if not aarch32.host_support(kvm)[0]:
            pytest.skip(aarch32.host_support(kvm)[1])
    kernel = _file("KVMFW_ARM32_KERNEL", "/cache/armhf/zImage")
    busybox = _file("KVMFW_ARM32_BUSYBOX", "/cache/armhf/busybox").read_bytes()
    assert aarch32.is_zimage(kernel.read_bytes()[:64])
    initrd = tmp_path / "initramfs.cpio.gz"
    initrd.write_bytes(busybox_initramfs(busybox))
    console = Console(reply=b"kvmfw-arm32\r")
    cmdline = (f"console=ttyAMA0 earlycon=pl011,{board.UART_BASE:#x} quiet panic=-1 "
               "rdinit=/init")
    cfg = MachineConfig(arch="armv8", memory=256 << 20, cpus=1, use_perf=False,
                        options={"console_output": console, "console_input": console.input_r,
                                 "gic": host_gic(), "arm_features": "el1_32bit"})
    try:
        with Machine(cfg) as m:
            m.load_guest(str(kernel), initrd=str(initrd), cmdline=cmdline)
            console.t0 = t0 = time.monotonic()
            try:
                res = m.run(timeout=BOOT_TIMEOUT)
            except RunTimeoutError:
                pytest.fail(f"no power-off within {BOOT_TIMEOUT:g} s; console:\n"
                            f"{console.tail()}\n{m.cpus[0].dump_state()}")
            took = time.monotonic() - t0
    finally:
        console.close()
    text = console.data.decode(errors="replace")
    assert BOOT_MARKER in text, f"{res.reason}; console:\n{console.tail()}"
    line = next(ln for ln in text.splitlines() if BOOT_MARKER in ln)
    assert line.strip().endswith("got=kvmfw-arm32"), f"console:\n{console.tail()}"
    assert (res.status, "powered off" in res.reason) == (0, True), res.reason
    print(f"\narmmp zImage (AArch32 EL1): power-off after {took:.1f} s host time; "
          f"{line.strip()}\n{text[-2000:]}")
