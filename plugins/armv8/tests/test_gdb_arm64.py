"""The GDB stub's AArch64 target (kvmfw_armv8.gdb): description, debug-register encodings
(any host) and, on a real arm64 KVM, a session against ``kvmfw run --gdb tcp::0 -S`` with
the core's protocol client (``gdb-multiarch`` too when the environment has it): read
registers, a hardware breakpoint, single steps, a register write, a software breakpoint
(BRK #0), memory by virtual address, kill.

The guest is guests/perfguest.S: ``mov x10, TESTDEV; cbz x0, ...; 1: subs x0, x0, #1;
b.ne 1b; str xzr, [x10, #8]`` (x0 = the device-tree address at boot: a very long loop).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any

import pytest
from kvmfw_armv8 import gdb, guests

from kvmfw.gdb import BreakKind, Breakpoint, GdbError

TIMEOUT = 180.0
LOOP = guests.LOAD_ADDR + 0x08
AFTER_LOOP = guests.LOAD_ADDR + 0x10


def test_description_has_gdb_core_fpu_and_system_registers() -> None:
    xml = gdb.GdbTarget("aarch64", gdb._features()).xml()
    assert "<architecture>aarch64</architecture>" in xml
    assert 'feature name="org.gnu.gdb.aarch64.core"' in xml
    assert 'feature name="org.gnu.gdb.aarch64.fpu"' in xml
    names = [r.name for r in gdb.GdbTarget("aarch64", gdb._features()).registers]
    assert names[:34] == [f"x{i}" for i in range(31)] + ["sp", "pc", "cpsr"]
    assert names[34:66] == [f"v{i}" for i in range(32)] and "ttbr1_el1" in names


def test_watchpoint_encoding() -> None:
    wcr, wvr = gdb.watch_registers(Breakpoint(BreakKind.WRITE, 0x4000_1004, 4))
    assert wvr == 0x4000_1000 and wcr == 1 | (3 << 1) | (2 << 3) | (0xF0 << 5)
    wcr, _ = gdb.watch_registers(Breakpoint(BreakKind.ACCESS, 0x4000_1000, 8))
    assert (wcr >> 3) & 3 == 3 and (wcr >> 5) & 0xFF == 0xFF
    with pytest.raises(GdbError):
        gdb.watch_registers(Breakpoint(BreakKind.WRITE, 0x4000_1006, 4))  # crosses 8 bytes


class Run:
    def __init__(self, image: list[str] | None = None) -> None:
        image = image or ["--kernel", str(guests.PERFGUEST_BIN)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvmfw.cli", "run", *image, "--console", "none",
             "--gdb", "tcp::0", "-S", "--timeout", "300"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd="/")
        self.head: list[str] = []
        assert self.proc.stderr is not None
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.head.append(line)
            m = re.search(r"waiting for a client on [\d.]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                return
        self.proc.kill()
        raise AssertionError(f"kvmfw did not start its stub: {''.join(self.head)}")

    def finish(self) -> tuple[int, str]:
        _out, err = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode, "".join(self.head) + err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def _reg(c: Any, n: int) -> int:
    """Register ``n`` through a ``p`` packet (little-endian, any width)."""
    return int.from_bytes(bytes.fromhex(c.cmd(b"p%x" % n).decode()), "little")


@pytest.mark.arm64_kvm
def test_break_step_write_register_sw_break_and_memory_on_arm64_kvm() -> None:
    from kvmfw.gdb.client import GdbClient

    r = Run()
    try:
        with GdbClient(r.port, timeout=TIMEOUT) as c:
            assert b"qXfer:features:read+" in c.cmd(b"qSupported:swbreak+;hwbreak+")
            xml = c.cmd(b"qXfer:features:read:target.xml:0,ffff")
            assert b"org.gnu.gdb.aarch64.core" in xml
            assert _reg(c, 32) == guests.LOAD_ADDR  # pc at the entry (-S)
            assert c.cmd(b"Z1,%x,4" % LOOP) == b"OK"
            stop = c.cmd(b"c")
            assert stop.startswith(b"T05") and b"hwbreak" in stop, stop
            assert _reg(c, 32) == LOOP
            x0 = _reg(c, 0)
            assert c.cmd(b"z1,%x,4" % LOOP) == b"OK"
            assert c.cmd(b"s").startswith(b"T05")
            assert _reg(c, 32) == LOOP + 4 and _reg(c, 0) == x0 - 1  # subs ran
            assert c.cmd(b"s").startswith(b"T05")
            assert _reg(c, 32) == LOOP  # b.ne taken
            assert c.cmd(b"P0=" + (3).to_bytes(8, "little").hex().encode()) == b"OK"
            assert c.cmd(b"Z0,%x,4" % AFTER_LOOP) == b"OK"
            stop = c.cmd(b"c")
            assert stop.startswith(b"T05") and b"swbreak" in stop, stop
            assert (_reg(c, 32), _reg(c, 0)) == (AFTER_LOOP, 0)  # 3 iterations, then here
            first = guests.PERFGUEST_BIN.read_bytes()[:4].hex().encode()
            assert c.cmd(b"m%x,4" % guests.LOAD_ADDR) == first
            assert c.cmd(b"m8,4").startswith(b"E")  # not RAM: an error, the run goes on
            regs = bytes.fromhex(c.cmd(b"g").decode())
            assert len(regs) == 31 * 8 + 8 + 8 + 4 + 32 * 16 + 4 + 4 + 12 * 8
            c.send(b"k")
        rc, err = r.finish()
    finally:
        r.kill()
    assert "Traceback" not in err, err


@pytest.mark.arm64_kvm
@pytest.mark.skipif(shutil.which("gdb-multiarch") is None and shutil.which("gdb") is None,
                    reason="no gdb-multiarch (or gdb) in this arm64 environment")
def test_gdb_multiarch_batch_session() -> None:
    exe = shutil.which("gdb-multiarch") or shutil.which("gdb") or "gdb"
    r = Run()
    try:
        out = subprocess.run(
            [exe, "-batch", "-nx", "-ex", "set architecture aarch64",
             "-ex", f"target remote 127.0.0.1:{r.port}", "-ex", f"hbreak *{LOOP:#x}",
             "-ex", "continue", "-ex", "p/x $pc", "-ex", "stepi", "-ex", "p/x $pc",
             "-ex", "info registers", "-ex", "kill"],
            capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "HOME": "/tmp"})
        text = out.stdout + out.stderr
    finally:
        r.kill()  # gdb's kill ends the run; a gdb that failed early leaves it looping
    assert f"= {LOOP:#x}" in text and f"= {LOOP + 4:#x}" in text, text
    assert re.search(r"^x30\s+0x", text, re.M) and re.search(r"^cpsr\s+0x", text, re.M), text


def test_aarch32_description_is_gdbs_arm() -> None:
    names = [r.name for r in gdb.GdbTarget("arm", gdb._arm_features()).registers]
    assert names[:17] == [f"r{i}" for i in range(13)] + ["sp", "lr", "pc", "cpsr"]
    assert names[17:49] == [f"d{i}" for i in range(32)] and names[49] == "fpscr"


@pytest.mark.arm64_kvm
def test_aarch32_guest_under_the_stub() -> None:
    """An el1_32bit vCPU gets GDB's ``arm`` description: 32-bit registers from the AArch32
    view, a hardware breakpoint (DBGBCR with the A32 byte select) and a single step."""
    from kvmfw.gdb.client import GdbClient

    r = Run(["--kernel", str(guests.A32GUEST_ELF), "--option", "arm_features=el1_32bit"])
    try:
        with GdbClient(r.port, timeout=TIMEOUT) as c:
            c.cmd(b"qSupported:swbreak+;hwbreak+")
            assert b"<architecture>arm</architecture>" in c.cmd(
                b"qXfer:features:read:target.xml:0,ffff")
            assert _reg(c, 15) == guests.LOAD_ADDR and _reg(c, 16) & 0x1F == 0x13  # svc
            assert c.cmd(b"Z1,%x,4" % (guests.LOAD_ADDR + 8)) == b"OK"
            stop = c.cmd(b"c")
            assert stop.startswith(b"T05") and b"hwbreak" in stop, stop
            assert _reg(c, 15) == guests.LOAD_ADDR + 8
            assert _reg(c, 16) & 0x1F == 0x12  # cps #0x12 ran: IRQ mode
            assert c.cmd(b"z1,%x,4" % (guests.LOAD_ADDR + 8)) == b"OK"
            assert c.cmd(b"s").startswith(b"T05")
            assert _reg(c, 15) == guests.LOAD_ADDR + 12
            c.send(b"k")
        _rc, err = r.finish()
    finally:
        r.kill()
    assert "Traceback" not in err, err
