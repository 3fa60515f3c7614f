"""The GDB stub on real x86 guests: Debian's gdb in batch mode and a raw protocol client
against ``kvmfw run --gdb`` (a subprocess, as a user runs it).

The guest (guests/gdb64.S) calls add(3, 4), increments ``counter`` five times, spins
while ``spin`` is set and exits through debug-exit with status 25. Every wait is bounded
generously and no assertion depends on host speed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kvmfw.errors import UnhandledExitError
from kvmfw.gdb.client import GdbClient
from kvmfw.machine import Machine, MachineConfig

from kvmfw_x86.plugin import X86Plugin

pytestmark = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                                reason="needs a readable and writable /dev/kvm")
pytest.importorskip("kvmfw_devices", reason="the guest exits through debug-exit")

GUEST = Path(__file__).parent / "guests" / "gdb64.elf"
STATUS = 25  # (12 << 1) | 1
TIMEOUT = float(os.environ.get("KVMFW_GDB_TEST_TIMEOUT", "120"))
needs_gdb = pytest.mark.skipif(shutil.which("gdb") is None,
                               reason="needs gdb (apt-get install gdb)")


def symbols() -> dict[str, int]:
    out = subprocess.run(["nm", str(GUEST)], capture_output=True, text=True, check=True)
    return {name: int(addr, 16) for addr, _, name in
            (line.split() for line in out.stdout.splitlines())}


class Kvmfw:
    """``kvmfw run --gdb tcp::0 -S`` on the test guest; :attr:`port` from its message."""

    def __init__(self, *extra: str, guest: list[str] | None = None) -> None:
        image = ["--kernel", str(GUEST), "--device", "debug-exit"] if guest is None else guest
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvmfw.cli", "run", *image, "--console", "none",
             "--gdb", "tcp::0", "-S", "--timeout", "300",
             *extra], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd="/")
        self.stderr_head = []
        assert self.proc.stderr is not None
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.stderr_head.append(line)
            m = re.search(r"waiting for a client on [\d.]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                return
        self.proc.kill()
        raise AssertionError(f"kvmfw did not start its stub: {''.join(self.stderr_head)}")

    def finish(self) -> tuple[int, str]:
        out, err = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode, "".join(self.stderr_head) + err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


class Client(GdbClient):
    """The core's protocol client with this module's timeout."""

    def __init__(self, port: int) -> None:
        super().__init__(port, timeout=TIMEOUT)


def run_gdb(port: int, *commands: str, elf: Path = GUEST) -> str:
    args = ["gdb", "-batch", "-nx", str(elf), "-ex", "set pagination off",
            "-ex", f"target remote 127.0.0.1:{port}"]
    for c in commands:
        args += ["-ex", c]
    r = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT,
                       stdin=subprocess.DEVNULL)
    return r.stdout + r.stderr


@needs_gdb
def test_gdb_break_step_watch_registers_memory_and_exit_status() -> None:
    k = Kvmfw()
    try:
        out = run_gdb(k.port, "break add", "continue", "p $rdi", "p $rsi", "set $rsi = 5",
                      "p/x $pc", "stepi 5", "p/x $pc", "delete", "watch *(long *)&counter",
                      "continue", "delete", "info registers",
                      "x/4gx 0xffff800000000000 + (long)&counter", "hbreak spin_loop",
                      "continue", "continue")
        rc, err = k.finish()
    finally:
        k.kill()
    sym = symbols()
    assert re.search(rf"Breakpoint 1, 0x0*{sym['add']:x} in add \(\)", out), out
    assert "$1 = 3" in out and "$2 = 4" in out, out  # add(3, 4): the SysV argument registers
    pcs = [int(v, 16) for v in re.findall(r"\$\d+ = (0x[0-9a-f]+)", out)]
    assert pcs[0] == sym["add"]
    assert sym["_start"] < pcs[1] < sym["add"], out  # 5 instructions on: back in _start
    assert "Hardware watchpoint 2: *(long *)&counter" in out
    assert "Old value = 1" in out and "New value = 2" in out, out  # stopped at the write
    for reg in ("rax", "rsp", "r15", "rip", "eflags", "cs", "gs", "fs_base", "cr0", "cr3",
                "efer"):
        assert re.search(rf"^{reg}\s+0x", out, re.M), f"{reg} missing:\n{out}"
    # memory by virtual address: the guest's alias of its first 2 MiB at 0xffff800000000000
    assert re.search(r"0xffff800000100078:\s+0x0000000000000002\s+0x0000000000000000", out), out
    assert "0x0000000000000008\t0x1122334455667788" in out  # result = add(3, 5)
    assert re.search(rf"Breakpoint 3, 0x0*{sym['spin_loop']:x} in ", out), out  # hbreak
    # add(3, 5) + 5 = 13: the register write reached the guest; (13 << 1) | 1 = 27
    assert "exited with code 033" in out, out  # (GDB prints it in octal)
    assert rc == 27, err
    assert "Traceback" not in err and "Traceback" not in out
    assert "software breakpoints are served by the 4 debug registers" in err or \
        "INT3: reported" in err or "probe" not in err


@needs_gdb
def test_a_32_bit_guest_gets_the_i386_description() -> None:
    k = Kvmfw(guest=[])  # the embedded multiboot guest: 32-bit protected mode, no paging
    try:
        import kvmfw_x86.plugin

        out = run_gdb(k.port, "show architecture", "p/x $eip", "stepi 3", "p/x $eip",
                      "info registers", "x/2wx $eip", "continue",
                      elf=Path(kvmfw_x86.plugin.GUESTS) / "default.elf")
        rc, err = k.finish()
    finally:
        k.kill()
    assert '(currently "i386")' in out, out
    eips = [int(v, 16) for v in re.findall(r"\$\d+ = (0x[0-9a-f]+)", out)]
    assert len(eips) == 2 and eips[1] > eips[0], out
    for reg in ("eax", "esp", "eip", "eflags", "cs", "cr0"):
        assert re.search(rf"^{reg}\s+0x", out, re.M), f"{reg} missing:\n{out}"
    assert "rax" not in out
    assert "exited normally" in out, out
    assert rc == 0, err


@needs_gdb
def test_two_vcpus_are_two_threads() -> None:
    k = Kvmfw("--cpus", "2")
    try:
        out = run_gdb(k.port, "info threads", "thread 2", "p $pc", "thread 1", "continue")
        rc, err = k.finish()
    finally:
        k.kill()
    assert re.search(r"^\*?\s*1\s+Thread 1 \(vCPU 0\)", out, re.M), out
    assert re.search(r"^\s*2\s+Thread 2 \(vCPU 1\)", out, re.M), out
    assert "[Switching to thread 2" in out
    assert "exited with code 031" in out, out
    assert rc == STATUS, err


@needs_gdb
def test_ctrl_c_in_gdb_stops_a_looping_guest_on_two_vcpus(tmp_path: Path) -> None:
    k = Kvmfw("--cpus", "2")
    out_path = tmp_path / "gdb.out"
    try:
        with out_path.open("w") as out_file:
            gdb = subprocess.Popen(
                ["gdb", "-batch", "-nx", str(GUEST), "-ex", f"target remote :{k.port}",
                 "-ex", "set var *(long *)&spin = 1", "-ex", "echo CONTINUING\\n",
                 "-ex", "continue", "-ex", "info threads", "-ex", "p/x $pc",
                 "-ex", "set var *(long *)&spin = 0", "-ex", "continue"],
                stdout=out_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + TIMEOUT
            while "CONTINUING" not in out_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # gdb sends the continue right after the echo
            gdb.send_signal(signal.SIGINT)  # Ctrl-C: gdb sends 0x03
            gdb.wait(TIMEOUT)
        out = out_path.read_text()
        rc, err = k.finish()
    finally:
        k.kill()
    assert "Thread 1 received signal SIGINT, Interrupt." in out, out
    assert re.search(r"^\s*2\s+Thread 2 \(vCPU 1\)", out, re.M), out
    assert "exited with code 031" in out, out
    assert rc == STATUS, err


def _start(client: Client) -> None:
    assert b"PacketSize" in client.cmd(b"qSupported:swbreak+;hwbreak+")
    assert client.cmd(b"?").startswith(b"T05thread:1;")


def test_ctrl_c_stops_a_looping_guest_and_it_continues_to_the_end() -> None:
    sym = symbols()
    k = Kvmfw()
    try:
        c = Client(k.port)
        _start(c)
        assert c.cmd(b"M%x,8:0100000000000000" % sym["spin"]) == b"OK"
        c.send(b"vCont;c")
        time.sleep(0.5)  # whatever the host's speed, the guest is now spinning or close to
        c.raw(b"\x03")
        stop = c.packet()
        assert stop.startswith(b"T02thread:1;"), stop
        regs = c.cmd(b"g")
        rip = int.from_bytes(bytes.fromhex(regs[16 * 16:17 * 16].decode()), "little")
        assert sym["_start"] <= rip < sym["add"], hex(rip)
        assert c.cmd(b"m%x,8" % sym["counter"]) == b"0500000000000000"
        assert c.cmd(b"M%x,8:0000000000000000" % sym["spin"]) == b"OK"
        assert c.cmd(b"c") == b"W19"  # the guest's exit, status 25
        rc, err = k.finish()
    finally:
        k.kill()
    assert rc == STATUS, err


def test_bad_input_is_answered_per_protocol_and_a_disconnect_resumes() -> None:
    k = Kvmfw()
    try:
        c = Client(k.port)
        c.raw(b"$qSupported#00")  # wrong checksum
        assert c.ack() == b"-"
        _start(c)
        assert c.cmd(b"vCont;s:1").startswith(b"T05")  # now a stop of the running guest
        assert c.cmd(b"qNoSuchThing") == b""  # unknown packets: the empty reply
        assert c.cmd(b"Xyzzy") == b"E16"  # malformed arguments
        assert c.cmd(b"m700000000000,8") == b"E14"  # not mapped by the guest's page tables
        assert c.cmd(b"mfffffffffff000,10") == b"E14"
        assert c.cmd(b"m%x,8" % (256 << 20)) == b"E14"  # mapped, but not RAM
        assert c.cmd(b"p9999") == b"E00"
        assert c.cmd(b"Hg99") == b"E01"
        assert c.cmd(b"Z3,100078,8") == b""  # read watchpoints: not on x86
        assert c.cmd(b"Z2,100079,8") == b"E28"  # unaligned
        for i in range(4):
            assert c.cmd(b"Z1,%x,1" % (0x100100 + i)) == b"OK"
        info = bytes.fromhex(c.cmd(b"qRcmd," + b"info".hex().encode()).decode()).decode()
        if "reports neither INT3 nor execution breakpoints" in info:
            # breakpoints are served by stepping and comparing the PC (TCG's emulated SVM
            # one level down): no debug register is used, so no limit of 4
            assert c.cmd(b"Z1,100200,1") == b"OK"
            assert c.cmd(b"z1,100200,1") == b"OK"
        else:
            assert c.cmd(b"Z1,100200,1") == b"E28"  # 4 debug registers
        assert c.cmd(b"z1,100100,1") == b"OK"
        assert c.cmd(b"qXfer:features:read:nosuch.xml:0,100") == b"E00"
        xml = c.cmd(b"qXfer:features:read:target.xml:0,fff0")
        assert xml.startswith(b"l<?xml") and b"i386:x86-64" in xml
        huge = b"$" + b"m0," + b"f" * 70000 + b"#00"  # longer than PacketSize
        c.raw(huge)
        assert c.ack() == b"-"
        assert c.cmd(b"qAttached") == b"1"
        c.close()  # mid-session, breakpoints still inserted: the guest must run to its end
        rc, err = k.finish()
    finally:
        k.kill()
    assert rc == STATUS, err
    assert "Traceback" not in err


def test_kill_ends_the_run_cleanly_and_gdb_wait_outlasts_a_client_that_leaves() -> None:
    k = Kvmfw()
    try:
        Client(k.port).close()  # connects and goes: --gdb-wait still holds the guest
        c = Client(k.port)
        _start(c)
        c.send(b"vKill;1")
        assert c.packet() == b"OK"
        rc, err = k.finish()
    finally:
        k.kill()
    assert rc == 0, err
    assert "killed by GDB" in err


def test_detach_resumes_and_a_new_client_stops_the_running_guest() -> None:
    sym = symbols()
    k = Kvmfw()
    try:
        c = Client(k.port)
        _start(c)
        assert c.cmd(b"Z0,%x,1" % sym["add"]) == b"OK"
        assert c.cmd(b"M%x,8:0100000000000000" % sym["spin"]) == b"OK"
        assert c.cmd(b"D") == b"OK"  # breakpoints go, the guest runs (and spins)
        c.close()
        c = Client(k.port)  # attaching stops the running guest
        stop = c.cmd(b"?")
        assert stop.startswith(b"T"), stop
        assert c.cmd(b"M%x,8:0000000000000000" % sym["spin"]) == b"OK"
        assert c.cmd(b"c") == b"W19"  # to the end: the detach removed the breakpoint
        rc, err = k.finish()
    finally:
        k.kill()
    assert rc == STATUS, err


def test_without_a_debugger_a_debug_exit_is_an_error_with_a_dump() -> None:
    from kvmfw_x86 import gdb

    cfg = MachineConfig(arch="x86", memory=64 << 20, default_devices=False,
                        devices=["debug-exit"], options={"irqchip": "userspace"})
    with Machine(cfg, arch_plugin=X86Plugin(), arch_name="x86") as m:
        m.load_guest(str(GUEST))
        gdb.set_guest_debug(m.cpus[0], True, [])  # a single step, nobody attached
        with pytest.raises(UnhandledExitError) as info:
            m.run(timeout=TIMEOUT)
    assert "KVM_EXIT_DEBUG" in str(info.value)
    assert "rip" in info.value.dump.lower()


def test_software_breakpoints_as_int3_are_written_and_restored() -> None:
    """The INT3 path a KVM that reports INT3 takes (not this kvm_pvm, whose probe says
    no): forced on, the byte is written at the translated address and put back."""
    from kvmfw.gdb import BreakKind, Breakpoint

    from kvmfw_x86 import gdb

    cfg = MachineConfig(arch="x86", memory=64 << 20, default_devices=False,
                        options={"irqchip": "userspace"}, kvm_path="/dev/kvm")
    sym = symbols()
    with Machine(cfg, arch_plugin=X86Plugin(), arch_name="x86") as m:
        m.load_guest(str(GUEST))
        real = gdb.probe(m)
        try:
            gdb._caps[cfg.kvm_path] = gdb.Caps(True, real.hw_breakpoints, real.watchpoints,
                                               real.block_irq, "forced")
            before = m.memory.read(sym["add"], 1)
            bp = Breakpoint(BreakKind.SOFTWARE, sym["add"], 1)
            gdb.set_guest_debug(m.cpus[0], False, [bp])
            assert m.memory.read(sym["add"], 1) == b"\xcc"
            gdb.set_guest_debug(m.cpus[0], False, [])
            assert m.memory.read(sym["add"], 1) == before
        finally:
            gdb._caps[cfg.kvm_path] = real


def test_the_probe_says_what_this_kvm_reports() -> None:
    from kvmfw_x86 import gdb

    cfg = MachineConfig(arch="x86", memory=16 << 20, default_devices=False,
                        options={"irqchip": "userspace"})
    with Machine(cfg, arch_plugin=X86Plugin(), arch_name="x86") as m:
        caps = gdb.probe(m)
        t = gdb.target(m.cpus[0])
    assert "INT3: " in caps.why and "watched write: " in caps.why
    assert "execution breakpoint: " in caps.why
    if not caps.sw_breakpoints and caps.hw_breakpoints:  # kvm_pvm: DRs, and said so
        assert any("debug registers" in n for n in t.notes)
    assert t.stepped_breakpoints == (not caps.sw_breakpoints and not caps.hw_breakpoints)
    if not caps.watchpoints:
        assert t.stepped_watchpoints
    assert t.architecture == "i8086"  # no guest loaded: the vCPU is at its real-mode reset


def test_bad_gdb_options_are_one_line_configuration_errors() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvmfw.cli", "run", "--console", "none",
                               *args], capture_output=True, text=True, timeout=TIMEOUT,
                              stdin=subprocess.DEVNULL, cwd="/")

    r = run("--gdb", "udp:1")
    assert r.returncode == 2 and "only TCP is supported" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        r = run("--gdb", f"tcp::{busy.getsockname()[1]}")
    assert r.returncode == 2 and "cannot listen" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_the_guests_own_int3_is_handed_back_to_it() -> None:
    """On a KVM that reports INT3 (not this one), an INT3 the stub did not insert is the
    guest's (Linux patches code with them): the arch re-injects #BP and nothing stops.
    Here the exit's details are written as KVM would; the injection is real: the test
    guest has no IDT, so the #BP it receives triple-faults it."""
    import struct

    from kvmfw.errors import TripleFaultError
    from kvmfw.vcpu import RUN_PAYLOAD

    from kvmfw_x86 import gdb

    cfg = MachineConfig(arch="x86", memory=64 << 20, default_devices=False,
                        devices=["debug-exit"],
                        options={"irqchip": "userspace", "reboot": False})
    with Machine(cfg, arch_plugin=X86Plugin(), arch_name="x86") as m:
        m.load_guest(str(GUEST))
        cpu = m.cpus[0]
        gdb.set_guest_debug(cpu, False, [])
        cpu.vcpu.run_map[RUN_PAYLOAD:RUN_PAYLOAD + 32] = struct.pack(
            "<IIQQQ", 3, 0, symbols()["add"], 0, 0)
        assert gdb.debug_exit(cpu).reason == "guest"
        try:
            m.run(timeout=TIMEOUT)
        except TripleFaultError:
            return  # the #BP reached the guest
        # TCG's emulated SVM one level down reports no INT3 and does not deliver the
        # re-injected #BP either: only there may the guest run on to its end
        caps = gdb.probe(m)
        assert not caps.sw_breakpoints and not caps.hw_breakpoints, \
            f"the re-injected #BP never reached the guest ({caps.why})"
