"""A booted Linux guest on the real x86 KVM checkpoints itself (``kvmfwop checkpoint``
through the pseudo-op device), and is restored in a new process twice: each restored guest
continues where it stopped (the command that took the checkpoint returns), runs a command
typed on its console, and reads back through virtio-blk a file written before the
checkpoint (the page cache dropped first, so the read goes to the disk).

``kvmfwop`` (plugins/devices/kvmfw_devices/guest/kvmfwop.c) is compiled here, statically,
and appended to the test guest's initramfs as a second cpio archive (the kernel unpacks
concatenated archives), so the environment's cached images stay as they are."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from linuxguest import (
    BASE_CMDLINE,
    Boot,
    Interactive,
    initrd,
    kvmfw_argv,
    make_ext4,
    why_unavailable,
)

WHY = why_unavailable()
pytestmark = [pytest.mark.linux, pytest.mark.skipif(WHY is not None, reason=WHY or "")]

TIMEOUT = float(os.environ.get("KVMFW_LINUX_TIMEOUT", "60"))
STEP = TIMEOUT / 2
MEMORY_MIB = 128
"""Small guest RAM: the checkpoint is written and hashed by an emulated (TCG) CPU here."""
KVMFWOP_C = Path(__file__).resolve().parents[2] / "plugins/devices/kvmfw_devices/guest/kvmfwop.c"
CMDLINE = f"{BASE_CMDLINE} kvmfw.test=shell kvmfw.exit=reboot"


def newc(entries: dict[str, tuple[int, bytes]]) -> bytes:
    """A newc cpio archive of ``{path: (mode, data)}`` and its trailer."""
    out = bytearray()

    def member(ino: int, name: str, mode: int, data: bytes) -> None:
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        out.extend(b"070701" + b"".join(b"%08x" % f for f in fields) + raw)
        out.extend(bytes(-len(out) % 4))
        out.extend(data)
        out.extend(bytes(-len(out) % 4))

    for i, (name, (mode, data)) in enumerate(entries.items(), 1):
        member(i, name, mode, data)
    member(0, "TRAILER!!!", 0, b"")
    return bytes(out)


def initrd_with_kvmfwop(tmp: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler for kvmfwop (the environment's root has gcc)")
    exe = tmp / "kvmfwop"
    p = subprocess.run([cc, "-O2", "-static", "-o", str(exe), str(KVMFWOP_C)],
                       capture_output=True, text=True)
    assert p.returncode == 0, f"building kvmfwop failed:\n{p.stderr}"
    out = tmp / "initramfs-kvmfwop.cpio.gz"
    base = initrd("cloud-amd64").read_bytes()
    out.write_bytes(base + gzip.compress(newc({"bin/kvmfwop": (0o100755, exe.read_bytes())})))
    return out


def restore_argv(ckpt: Path) -> list[str]:
    return [*kvmfw_argv(), "run", "--restore", str(ckpt), "--console", "stdio",
            "--no-summary", "--timeout", str(4 * TIMEOUT)]


def quit_vmm(s: Interactive) -> int | None:
    s.send(b"\x01x")  # Ctrl-A x
    return s.wait(timeout=STEP)


def test_linux_checkpoint_from_inside_restored_twice(tmp_path: Path) -> None:
    payload = f"written before the checkpoint {os.getpid()}"
    img = make_ext4(tmp_path / "disk.img", {"hello.txt": b"hello\n"}, size_mib=16)
    ckdir = tmp_path / "ckpts"
    boot = Boot("kvmfw", "cloud-amd64", CMDLINE, memory_mib=MEMORY_MIB, disk=img,
                timeout=8 * TIMEOUT, extra=["--checkpoint-dir", str(ckdir)])
    # the Boot's own initramfs, with kvmfwop added
    rd = initrd_with_kvmfwop(tmp_path)
    argv = boot.argv()
    argv[argv.index("--initrd") + 1] = str(rd)
    s = Interactive.__new__(Interactive)
    _start(s, argv, boot.timeout)
    try:
        s.expect(rb"kvmfw# ", timeout=TIMEOUT)
        s.send(b"while read -r ko; do insmod $ko 2>/dev/null; done < /lib/modules/load.list; "
               b"i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; "
               b"i=$((i+1)); done; mount -t ext4 /dev/vda /mnt && "
               + f"echo '{payload}' > /mnt/new.txt && sync && ".encode()
               + b"mount -o remount,ro /mnt && echo MOUNT''-OK\r")
        s.expect(rb"MOUNT-OK", timeout=TIMEOUT)
        s.expect(rb"kvmfw# ", timeout=STEP)
        s.send(b"kvmfwop checkpoint && echo CKPT''-OK\r")
        s.expect(rb"CKPT-OK", timeout=4 * TIMEOUT)
        s.expect(rb"kvmfw# ", timeout=STEP)
        assert quit_vmm(s) == 0
    finally:
        s.close()
    taken = sorted(ckdir.glob("cpt.*"))
    assert len(taken) == 1, f"expected one checkpoint in {ckdir}: {taken}"
    for run in range(2):
        r = Interactive.__new__(Interactive)
        _start(r, restore_argv(taken[0]), 4 * TIMEOUT)
        try:
            # the guest continues inside `kvmfwop checkpoint`, which now returns
            r.expect(rb"CKPT-OK", timeout=4 * TIMEOUT)
            r.expect(rb"kvmfw# ", timeout=STEP)
            r.send(b"echo 3 > /proc/sys/vm/drop_caches; cat /mnt/new.txt; "
                   + f"echo RESTORED''-{run}\r".encode())
            r.expect(payload.encode(), timeout=STEP)
            r.expect(f"RESTORED-{run}".encode(), timeout=STEP)
            r.expect(rb"kvmfw# ", timeout=STEP)
            assert quit_vmm(r) == 0
        finally:
            r.close()


def _start(s: Interactive, argv: list[str], timeout: float) -> None:
    """Interactive.__init__ for a ready argv (a restore has no Boot)."""
    import pty

    s.argv = argv
    s.timeout = timeout
    s.pid, s.fd = pty.fork()
    if s.pid == 0:  # child
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    s.output = b""
    s.pos = 0
