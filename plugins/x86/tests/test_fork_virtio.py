"""Machine.fork with a virtio-blk device whose QueueNotify is a KVM_IOEVENTFD doorbell (the
default): the guest sets the device up, pauses, is forked; parent and child then each
write and read sectors with their own data. Both complete with the right data, through
doorbells on their own VM (the child's are new eventfds on the child's VM, served by a
new helper thread: ``VirtioMmio.after_fork``), and the child's writes go to its private
overlay, never to the image."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import requires_kvm
from kvmfw.machine import Machine, MachineConfig
from kvmfw.testing import assemble

from kvmfw_x86 import loaders
from kvmfw_x86.plugin import X86Plugin

pytestmark = [requires_kvm, pytest.mark.kvm,
              pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None,
                                 reason="needs GNU as and ld to build the guest")]

MAILBOX = 0x207000  # the byte the host writes after the fork: this process's data seed
PAUSE = 0x10  # debug-exit value of the guest's pause point (status (0x10 << 1) | 1)

# A virtio-mmio v2 driver in miniature (after plugins/devices/tests/guests/virtio_blk.S):
# negotiate and set up queue 0, pause (debug-exit 0x10; the host forks), then fill a
# buffer with seed+i, write sector 1, read sector 1 back and sector 2 (never written),
# print the status bytes, whether sector 1 matched, and sector 2's first byte.
GUEST = r"""
    .code32
    .set VIO, 0xd0000000
    .set DESC, 0x200000
    .set AVAIL, 0x201000
    .set USED, 0x202000
    .set HDR, 0x203000
    .set WBUF, 0x204000
    .set STAT, 0x205000
    .set RBUF, 0x206000
    .set MAILBOX, 0x207000
    .macro PUTC reg8
    mov $0x3fd, %dx
991:
    push %eax
    in %dx, %al
    test $0x20, %al
    pop %eax
    jz 991b
    mov $0x3f8, %dx
    mov \reg8, %al
    out %al, %dx
    .endm
    /* descriptors \d (header) -> \d+1 (data at \buf, \len bytes) -> \d+2 (status) */
    .macro CHAIN d, buf, len, dataflags
    movl $HDR, DESC+(\d*16)
    movl $0, DESC+(\d*16)+4
    movl $16, DESC+(\d*16)+8
    movw $1, DESC+(\d*16)+12
    movw $(\d+1), DESC+(\d*16)+14
    movl $\buf, DESC+(\d*16)+16
    movl $0, DESC+(\d*16)+20
    movl $\len, DESC+(\d*16)+24
    movw $(1|\dataflags), DESC+(\d*16)+28
    movw $(\d+2), DESC+(\d*16)+30
    movl $STAT, DESC+(\d*16)+32
    movl $0, DESC+(\d*16)+36
    movl $1, DESC+(\d*16)+40
    movw $2, DESC+(\d*16)+44
    movw $0, DESC+(\d*16)+46
    .endm
    /* submit chain \d as avail entry \n (0-based), notify, wait, print the status */
    .macro SUBMIT d, n
    movb $0x77, STAT
    movw $\d, AVAIL+4+(\n*2)
    movw $(\n+1), AVAIL+2
    movl $0, VIO+0x050                  /* QueueNotify: the doorbell */
995:
    cmpw $(\n+1), USED+2
    jne 995b
    mov STAT, %al
    PUTC %al
    movl $3, VIO+0x064                  /* InterruptACK */
    .endm
    .globl _start
_start:
    mov $0x90000, %esp
    cmpl $0x74726976, VIO+0x000
    jne fail
    movl $0, VIO+0x070
    movl $3, VIO+0x070
    movl $1, VIO+0x024
    movl $1, VIO+0x020
    movl $11, VIO+0x070
    testl $8, VIO+0x070
    jz fail
    movl $0, VIO+0x030
    movl $8, VIO+0x038
    movl $DESC, VIO+0x080
    movl $0, VIO+0x084
    movl $AVAIL, VIO+0x090
    movl $0, VIO+0x094
    movl $USED, VIO+0x0a0
    movl $0, VIO+0x0a4
    movl $1, VIO+0x044
    movl $15, VIO+0x070                 /* DRIVER_OK */
    mov $0x10, %eax                     /* pause: the host forks here */
    out %eax, $0xf4
    movzbl MAILBOX, %ebx
    mov $WBUF, %edi
    xor %ecx, %ecx
1:  lea (%ebx,%ecx), %eax
    mov %al, (%edi,%ecx)
    inc %ecx
    cmp $512, %ecx
    jne 1b
    movl $1, HDR                        /* VIRTIO_BLK_T_OUT, sector 1 */
    movl $0, HDR+4
    movl $1, HDR+8
    movl $0, HDR+12
    CHAIN 0, WBUF, 512, 0
    SUBMIT 0, 0
    movl $0, HDR                        /* VIRTIO_BLK_T_IN, sectors 1 and 2 */
    CHAIN 3, RBUF, 1024, 2
    SUBMIT 3, 1
    mov $WBUF, %esi
    mov $RBUF, %edi
    mov $512, %ecx
    cld
    repe cmpsb
    sete %al
    PUTC %al
    mov RBUF+512, %al
    PUTC %al
    mov $0, %eax
    out %eax, $0xf4
fail:
    mov $0x7f, %eax
    out %eax, $0xf4
2:  hlt
    jmp 2b
"""


def _machine(image: Path, tmp_path: Path, extra: str = "") -> tuple[Machine, io.BytesIO]:
    console = io.BytesIO()
    cfg = MachineConfig(arch="x86", memory=64 << 20, default_devices=False,
                        devices=["uart16550", "debug-exit",
                                 f"virtio-blk,file={image},base=0xd0000000,irq=5{extra}"],
                        options={"irqchip": "kernel", "console_output": console})
    m = Machine(cfg, arch_plugin=X86Plugin(), arch_name="x86")
    guest = assemble(GUEST, out_dir=tmp_path, name="fork_virtio", bits=32)
    loaders.load(m, str(guest), {})
    return m, console


def _finish(m: Machine, console: io.BytesIO, seed: int) -> dict[str, Any]:
    """Give this process its seed, run to the guest's end; what the guest and device did."""
    m.memory.write_u(MAILBOX, 1, seed)
    r = m.run(timeout=60)
    blk = m.devices[2]
    return {"status": r.status, "reason": r.reason, "out": console.getvalue().hex(),
            "doorbells": blk.doorbells is not None, "stats": dict(blk.stats)}


ORIGINAL = bytes(512) + bytes([0xC3]) * 512 + bytes([0x5A]) * 512 + bytes(512)
"""The snapshot=on tests' image: sector 1 is what the guest writes and reads back."""


def _pattern(seed: int) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(512))


def test_forked_child_virtio_blk_requests_go_through_its_own_doorbells(
        tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    original = ORIGINAL
    image.write_bytes(original)
    m, console = _machine(image, tmp_path)
    try:
        r = m.run(timeout=60)
        assert r.status == (PAUSE << 1) | 1, r.reason  # set up, at the pause point
        blk = m.devices[2]
        assert blk.doorbells is not None, "ioeventfd doorbells are the default"
        assert blk.stats["ioeventfd_notifications"] == 0
        pid = m.fork()
        if pid == 0:
            status = 99
            try:
                out = _finish(m, console, 0x40)
                (tmp_path / "child.json").write_text(json.dumps(out))
                status = 0
            finally:
                os._exit(status)
        # the child runs first, alone: its writes must not reach the image
        _, st = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(st) == 0
        assert image.read_bytes() == original, "the child's write reached the image"
        parent = _finish(m, console, 0x80)
    finally:
        m.close()
    child = json.loads((tmp_path / "child.json").read_text())
    # status: OK (0), OK (0), sector 1 matched (1), sector 2's first byte from the image
    for who, out in (("child", child), ("parent", parent)):
        assert out["status"] == 1, f"{who}: {out['reason']}"
        assert bytes.fromhex(out["out"]) == b"\x00\x00\x01\x5a", who
        assert out["doorbells"], f"{who}: doorbells dropped"
        assert out["stats"]["chains"] == 2, who
        assert out["stats"]["ioeventfd_notifications"] == 2, \
            f"{who}: QueueNotify did not go through the doorbells"
    assert image.read_bytes() == original[:512] + _pattern(0x80) + original[1024:]


def _paused_snapshot_disk(tmp_path: Path) -> tuple[Machine, io.BytesIO, Path]:
    """The guest on a snapshot=on disk, run to its pause point (queue set up, nothing
    written); the image holds ORIGINAL."""
    image = tmp_path / "disk.img"
    image.write_bytes(ORIGINAL)
    m, console = _machine(image, tmp_path, ",snapshot=on")
    r = m.run(timeout=60)
    if r.status != (PAUSE << 1) | 1:
        m.close()
        pytest.fail(f"the guest did not reach its pause point: {r.reason}")
    return m, console, image


def test_snapshot_on_the_guest_reads_its_writes_and_a_checkpoint_keeps_them(
        tmp_path: Path) -> None:
    """virtio-blk snapshot=on on a real guest: its write and read-back of sector 1 match,
    the image never changes, and a checkpoint taken after the write holds it (the
    overlay's files): restored twice, each machine's disk has it, in its own overlay."""
    m, console, image = _paused_snapshot_disk(tmp_path)
    try:
        out = _finish(m, console, 0x33)
        assert out["status"] == 1, out["reason"]
        assert bytes.fromhex(out["out"]) == b"\x00\x00\x01\x5a"  # OK, OK, matched, image
        assert out["stats"]["write_bytes"] == 512
        ckpt = m.checkpoint(tmp_path / "after")
    finally:
        m.close()
    assert image.read_bytes() == ORIGINAL
    assert (ckpt / "dev/2/overlay.sectors").read_bytes() == _pattern(0x33)
    for _ in range(2):
        with Machine.restore(ckpt, arch_plugin=X86Plugin(),
                             options={"console_output": io.BytesIO()}) as r2:
            blk = r2.devices[2]
            assert blk._cow is not None and blk._cow[0] == 0b10  # sector 1 only
            assert os.pread(blk._cow_fd, 512, 512) == _pattern(0x33)
    assert image.read_bytes() == ORIGINAL


def test_reset_to_puts_a_snapshot_on_disk_back(tmp_path: Path) -> None:
    """Machine.snapshot/reset_to with a snapshot=on disk on a real guest: each run from the
    snapshot writes sector 1 with its own data and reads it back; after each reset the
    disk is as it was at the snapshot (the sector is the image's again)."""
    m, console, image = _paused_snapshot_disk(tmp_path)
    try:
        blk = m.devices[2]
        with m.snapshot() as snap:
            for seed in (0x33, 0x44, 0x55):
                console.seek(0)
                console.truncate()
                out = _finish(m, console, seed)
                assert out["status"] == 1, out["reason"]
                assert bytes.fromhex(out["out"]) == b"\x00\x00\x01\x5a"
                assert os.pread(blk._cow_fd, 512, 512) == _pattern(seed)
                m.reset_to(snap)
                assert blk._cow is not None and not any(blk._cow)  # as at the snapshot
    finally:
        m.close()
    assert image.read_bytes() == ORIGINAL
