"""Debian's arm64 Linux checkpointed from inside (``kvmfwop checkpoint``) under
``kvmfw run``, restored in a new process twice; a command typed on the console after each
restore runs and its output appears (real arm64 KVM: plugins/armv8/env/run-arm64-kvm.sh).
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_linux_boot import BOOT_TIMEOUT, _busybox, _kernel

pytestmark = [pytest.mark.arm64_kvm, pytest.mark.slow]

KVMFWOP_C = (Path(__file__).resolve().parents[2] / "devices" / "kvmfw_devices" / "guest"
             / "kvmfwop.c")
READY = "KVMFW_CKPT_READY"
AFTER = "KVMFW_CKPT_AFTER"


def _kvmfwop(tmp: Path) -> bytes:
    """The static kvmfwop: ``KVMFW_ARM64_KVMFWOP`` (the environment builds and caches it),
    else compiled here (about a minute in the emulated host)."""
    built = os.environ.get("KVMFW_ARM64_KVMFWOP")
    if built and Path(built).is_file():
        return Path(built).read_bytes()
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "no C compiler in the arm64 environment to build kvmfwop"
    out = tmp / "kvmfwop"
    subprocess.run([cc, "-O2", "-static", "-o", str(out), str(KVMFWOP_C)], check=True,
                   timeout=300)
    return out.read_bytes()


def _initramfs(tmp: Path) -> Path:
    from kvmfw_armv8 import board
    from kvmfw_armv8.testing import S_IFCHR, S_IFREG, busybox_initramfs

    bb = "/bin/busybox"
    init = ("#!/bin/busybox sh\n"
            f"{bb} mount -t proc proc /proc\n"
            "echo KVMFW_CKPT_BOOTED\n"
            f"/bin/kvmfwop -b {board.PSEUDO_OP_BASE:#x} checkpoint\n"
            f"echo \"{AFTER} rc=$?\"\n"
            f"echo {READY}\n"
            "read -r -t 120 line\n"
            "echo \"KVMFW_CMD_OUT $(eval \"$line\")\"\n"
            f"{bb} poweroff -f\n")
    extra = [("bin/kvmfwop", S_IFREG | 0o755, _kvmfwop(tmp), (0, 0)),
             ("dev/mem", S_IFCHR | 0o600, b"", (1, 1))]
    path = tmp / "initramfs.cpio.gz"
    path.write_bytes(busybox_initramfs(_busybox(), init=init, extra=extra))
    return path


def _kvmfw(args: list[str], typed: bytes = b"") -> tuple[int, str, str]:
    """Run ``kvmfw run ARGS``; type ``typed`` once the guest's READY line appears."""
    cmd = [sys.executable, "-c", "from kvmfw.cli import main; main()", "run", *args]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    out = bytearray()
    deadline = time.monotonic() + BOOT_TIMEOUT + 60
    sent = not typed
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                out += chunk
            if not sent and READY.encode() in out:
                proc.stdin.write(typed)
                proc.stdin.flush()
                sent = True
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    return rc, out.decode(errors="replace"), err


def test_linux_checkpointed_from_inside_restores_twice_and_runs_a_typed_command(
        tmp_path: Path) -> None:
    from kvmfw_armv8 import board
    from kvmfw_armv8.testing import host_gic

    initrd = _initramfs(tmp_path)
    ckdir = tmp_path / "ckpts"
    rc, out, err = _kvmfw([
        "--arch", "armv8", "--kernel", str(_kernel()), "--initrd", str(initrd),
        "--memory", "256M", "--option", f"gic={host_gic()}",
        "--cmdline", f"console=ttyAMA0 earlycon=pl011,{board.UART_BASE:#x} quiet panic=-1",
        "--checkpoint-dir", str(ckdir), "--exit-after-checkpoint",
        "--timeout", str(BOOT_TIMEOUT)])
    assert rc == 0 and "KVMFW_CKPT_BOOTED" in out, f"exit {rc}\n{out}\n{err}"
    assert AFTER not in out  # the run ended at the checkpoint
    (cpt,) = sorted(ckdir.glob("cpt.*"))
    for n in range(2):
        rc, out, err = _kvmfw(["--restore", str(cpt), "--timeout", str(BOOT_TIMEOUT)],
                              typed=f"echo $((6 * 7))-{n}\r".encode())
        assert f"{AFTER} rc=0" in out, f"restore {n}: exit {rc}\n{out}\n{err}"
        assert f"KVMFW_CMD_OUT 42-{n}" in out, f"restore {n}: exit {rc}\n{out}\n{err}"
        assert "KVMFW_CKPT_BOOTED" not in out  # continued, not rebooted
        assert rc == 0 and "powered off" in err, f"restore {n}: exit {rc}\n{out}\n{err}"
