"""Debian's arm64 kernel boots under kvmfw-armv8 to a busybox /init on the PL011 console.

Runs on a real arm64 KVM (plugins/armv8/env/run-arm64-kvm.sh); the kernel is the one the
environment boots (``KVMFW_ARM64_KERNEL``, else ``/boot/vmlinuz-*``) and the initramfs is
built from the static busybox (``KVMFW_ARM64_BUSYBOX``, else ``/bin/busybox``).
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path

import pytest
from kvmfw_armv8.testing import BOOT_MARKER, READY_PROMPT, busybox_initramfs, host_gic

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
    """The PL011's two ends: keeps every byte the guest writes; types ``reply`` (through a
    pipe, as a user at the terminal would) once the guest's prompt appears."""

    def __init__(self, reply: bytes) -> None:
        self.data = bytearray()
        self.reply = reply
        self.t0 = time.monotonic()
        self.ready_at: float | None = None
        self.marker_at: float | None = None
        self.input_r, self._input_w = os.pipe()

    def write(self, data: bytes) -> int:
        self.data += data
        now = time.monotonic() - self.t0
        if self.ready_at is None and READY_PROMPT.encode() in self.data:
            self.ready_at = now
            os.write(self._input_w, self.reply)
        if self.marker_at is None and BOOT_MARKER.encode() in self.data:
            self.marker_at = now
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        os.close(self.input_r)
        os.close(self._input_w)

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.data.decode(errors="replace").splitlines()[-lines:])


def test_debian_kernel_boots_busybox_init_on_pl011(tmp_path: Path) -> None:
    """The kernel boots (device tree, PSCI, vGICv3, arch timer), /init prints its prompt on
    ttyAMA0, reads a line typed on the host (PL011 receive interrupt through the vGIC SPI),
    prints the marker with it and powers off: status 0."""
    from kvmfw_armv8 import board, plugin

    from kvmfw.errors import RunTimeoutError
    from kvmfw.machine import Machine, MachineConfig

    initrd = tmp_path / "initramfs.cpio.gz"
    initrd.write_bytes(busybox_initramfs(_busybox()))
    console = Console(reply=b"kvmfw-ping\r")
    cmdline = (f"console=ttyAMA0 earlycon=pl011,{board.UART_BASE:#x} quiet panic=-1 "
               "rdinit=/init")
    cfg = MachineConfig(arch="armv8", memory=256 << 20, cpus=1, use_perf=False,
                        options={"console_output": console, "console_input": console.input_r,
                                 "gic": host_gic()})
    try:
        with Machine(cfg) as m:
            assert [d.name for d in m.devices][:1] == ["pl011"]  # the default board's UART
            m.load_guest(str(_kernel()), initrd=str(initrd), cmdline=cmdline)
            console.t0 = t0 = time.monotonic()
            try:
                res = m.run(timeout=BOOT_TIMEOUT)
            except RunTimeoutError:
                pytest.fail(f"no power-off within {BOOT_TIMEOUT:g} s; console:\n"
                            f"{console.tail()}\n{m.cpus[0].dump_state()}")
            took = time.monotonic() - t0
            uart = m.devices[0]
            gic = plugin.board_of(m).gic
    finally:
        console.close()
    text = console.data.decode(errors="replace")
    assert BOOT_MARKER in text, f"{res.reason}; console:\n{console.tail()}"
    line = next(ln for ln in text.splitlines() if BOOT_MARKER in ln)
    assert line.strip().endswith("got=kvmfw-ping"), f"console:\n{console.tail()}"
    assert (res.status, "powered off" in res.reason) == (0, True), (
        f"{res.reason}; console:\n{console.tail()}")
    assert uart.stats["tx_bytes"] == len(console.data)
    assert uart.stats["rx_bytes"] == len(console.reply)
    assert uart.stats["interrupts"] > 0
    assert gic == {"auto": gic}.get(host_gic(), host_gic())
    print(f"\nlinux boot (gic{gic[1:]}): prompt after {console.ready_at:.1f} s, marker after "
          f"{console.marker_at:.1f} s, power-off after {took:.1f} s host time; "
          f"{len(console.data)} console bytes, {uart.stats['interrupts']} UART interrupts; "
          f"{line.strip()}\n{text}")


def test_kvmfw_run_cli_boots_the_same_kernel(tmp_path: Path) -> None:
    """``kvmfw run --arch armv8 --kernel --initrd --cmdline``: the console is the terminal
    (stdout, and stdin for what is typed); the run ends with status 0 and its summary."""
    import select
    import subprocess
    import sys

    from kvmfw_armv8 import board

    initrd = tmp_path / "initramfs.cpio.gz"
    initrd.write_bytes(busybox_initramfs(_busybox()))
    cmd = [sys.executable, "-c", "from kvmfw.cli import main; main()", "run", "--arch", "armv8",
           "--kernel", str(_kernel()), "--initrd", str(initrd), "--memory", "256M",
           "--cmdline", f"console=ttyAMA0 earlycon=pl011,{board.UART_BASE:#x} quiet panic=-1",
           "--option", f"gic={host_gic()}", "--timeout", str(BOOT_TIMEOUT)]
    cache = tmp_path / "cache"  # a vmlinuz is gunzipped into it, and booted from there
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "KVMFW_CACHE": str(cache)})
    assert proc.stdin is not None and proc.stdout is not None
    out = bytearray()
    deadline = time.monotonic() + BOOT_TIMEOUT + 30
    typed = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                out += chunk
            if not typed and READY_PROMPT.encode() in out:
                proc.stdin.write(b"from-the-cli\r")
                proc.stdin.flush()
                typed = True
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    text = out.decode(errors="replace")
    assert f"{BOOT_MARKER} uptime=" in text and "got=from-the-cli" in text, f"{text}\n{err}"
    assert rc == 0, f"exit {rc}\n{text}\n{err}"
    assert "powered off" in err and "status 0" in err, err
    if _kernel().read_bytes()[:2] == b"\x1f\x8b":
        assert len(list((cache / "arm64-kernel").iterdir())) == 1


def _kernel_text(tmp_path: Path, **options: str) -> int:
    """Where the booted kernel says its text is (``_stext`` in /proc/kallsyms: arm64 lists
    no ``_text``)."""
    import re

    from kvmfw.machine import Machine, MachineConfig

    script = ("#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n"
              "/bin/busybox grep -m1 ' _stext$' /proc/kallsyms | /bin/busybox sed "
              "'s/^/KASLR-TEXT=/'\n/bin/busybox poweroff -f\n")
    initrd = tmp_path / "kaslr.cpio.gz"
    initrd.write_bytes(busybox_initramfs(_busybox(), init=script))
    console = Console(reply=b"")
    cfg = MachineConfig(arch="armv8", memory=256 << 20, cpus=1, use_perf=False,
                        options={"console_output": console, "console_input": console.input_r,
                                 "gic": host_gic()})
    try:
        with Machine(cfg) as m:
            m.load_guest(str(_kernel()), initrd=str(initrd),
                         cmdline="console=ttyAMA0 quiet panic=-1 rdinit=/init", **options)
            m.run(timeout=BOOT_TIMEOUT)
    finally:
        console.close()
    found = re.search(rb"KASLR-TEXT=([0-9a-f]{16}) [tT] _stext", console.data)
    assert found is not None, f"console:\n{console.tail()}"
    return int(found[1], 16)


def test_the_kaslr_seed_in_the_device_tree_places_the_kernel(tmp_path: Path) -> None:
    """kvmfw's device tree carries ``kaslr-seed`` as QEMU's virt board does: the kernel's
    own text address (``_stext``) is the same for the same ``kaslr`` seed, differs for
    another, and without a seed (``kaslr=off``) is where the kernel is linked."""
    a = _kernel_text(tmp_path, kaslr="7")
    assert a == _kernel_text(tmp_path, kaslr="7")
    assert a != _kernel_text(tmp_path, kaslr="8")
    assert a != _kernel_text(tmp_path, kaslr="off")
