"""The ISA-neutral stub on real guests, through the core's test arch plus ``gdb_*`` hooks
(so nothing here knows x86 beyond what the test arch's registers are): attach before the
first instruction, single-step, memory, breakpoint refusal, Ctrl-C in serial and
parallel mode, kill, and a debug exit with no debugger."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from realmode_arch import REGS, RealModeArch

from kvmfw import hookimpl
from kvmfw.abi import IOCTLS, address_of, ffi
from kvmfw.device import Range
from kvmfw.errors import UnhandledExitError
from kvmfw.gdb import BreakKind, Feature, GdbStub, GdbTarget, GdbUnsupported, Reg, Stop
from kvmfw.gdb.client import GdbClient
from kvmfw.gdb.stub import _Resume
from kvmfw.machine import Machine, MachineConfig

TIMEOUT = 60.0
PROGRAM_SYNC, PROGRAM_SPIN = 3, 4
RIP = REGS.index("rip")


class GdbRealModeArch(RealModeArch):
    """The test arch with the stub's hooks: its 18 registers, single step only (so the
    stub serves breakpoints by stepping, as on a KVM that reports no breakpoints)."""

    def __init__(self, program: int) -> None:
        super().__init__(program)
        self.debug_calls: list[tuple[int, bool, int]] = []

    @hookimpl
    def gdb_target(self, cpu: Any) -> GdbTarget:
        return GdbTarget("i8086", (Feature("org.kvmfw.test", tuple(Reg(r, 64) for r in REGS)),),
                         stepped_breakpoints=True)

    @hookimpl
    def gdb_read_registers(self, cpu: Any) -> list[bytes]:
        ctx = cpu.get_context()
        return [ctx.regs[r].to_bytes(8, "little") for r in REGS]

    @hookimpl
    def gdb_write_register(self, cpu: Any, regnum: int, value: bytes) -> bool:
        cpu.get_context().regs[REGS[regnum]] = int.from_bytes(value, "little")
        cpu.mark_context_dirty()
        return True

    @hookimpl
    def gdb_set_guest_debug(self, cpu: Any, step: bool, breakpoints: list[Any]) -> bool:
        if any(b.kind not in (BreakKind.SOFTWARE, BreakKind.HARDWARE) for b in breakpoints):
            raise GdbUnsupported("the test arch has no watchpoints")
        self.debug_calls.append((cpu.id, step, len(breakpoints)))
        buf = ffi.new("uint8_t[]", struct.pack("<II8Q", 3 if step else 0, 0, *[0] * 8))
        cpu.sync_kvm_state()
        cpu.vcpu.ioctl(IOCTLS.KVM_SET_GUEST_DEBUG, address_of(buf))
        return True

    @hookimpl
    def gdb_translate(self, cpu: Any, vaddr: int) -> int | None:
        return vaddr if vaddr < cpu.machine.config.memory else None

    @hookimpl
    def gdb_debug_exit(self, cpu: Any) -> Stop:
        return Stop("step")


class Exit:
    """Port 0x13 (the guest's exit) ends the run."""

    def __init__(self, m: Machine) -> None:
        self.m = m

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if offset == 3:
            self.m.request_exit(7, "guest exit")


def machine(program: int, cpus: int = 1) -> Machine:
    m = Machine(MachineConfig(memory=0x10000, cpus=cpus), arch_plugin=GdbRealModeArch(program))
    m.map_device(Range("pio", 0x10, 4, "exit"), Exit(m))
    return m


class Client(GdbClient):
    def __init__(self, port: int) -> None:
        super().__init__(port, timeout=TIMEOUT)


def session(m: Machine, script: Any) -> tuple[Any, list[Any]]:
    """Run ``m`` on this thread while ``script(client)`` drives it from another."""
    server = m.start_gdb(0)
    result: list[Any] = []

    def drive() -> None:
        c = Client(server.port)
        try:
            result.append(script(c))
        except BaseException as exc:  # re-raised on the test's thread
            result.append(exc)
            m.request_exit(99, "client failed")
            m.kick_all()
        finally:
            c.sock.close()

    t = threading.Thread(target=drive, daemon=True)
    t.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.stub.connected and time.monotonic() < deadline:
        time.sleep(0.01)  # attached before the run: the stop comes before the first insn
    r = m.run(timeout=TIMEOUT)
    server.close(r.status)
    t.join(TIMEOUT)
    if result and isinstance(result[0], BaseException):
        raise result[0]
    return r, result


def test_attach_before_the_first_instruction_step_and_read_memory() -> None:
    m = machine(PROGRAM_SYNC)

    def script(c: Client) -> list[int]:
        assert b"PacketSize" in c.cmd(b"qSupported:swbreak+")
        assert c.cmd(b"?").startswith(b"T05thread:1;")  # stopped: the run had not begun
        assert c.cmd(b"qfThreadInfo") == b"m1" and c.cmd(b"qsThreadInfo") == b"l"
        assert c.cmd(b"qAttached") == b"1" and c.cmd(b"qC") == b"QC1"
        xml = c.cmd(b"qXfer:features:read:target.xml:0,10")
        assert xml.startswith(b"m<?xml")  # a partial read says there is more
        rips = []
        for _ in range(3):
            regs = c.cmd(b"g")
            rips.append(int.from_bytes(bytes.fromhex(regs[RIP * 16:RIP * 16 + 16].decode()),
                                       "little"))
            assert c.cmd(b"vCont;s:1").startswith(b"T05thread:1;")
        assert c.cmd(b"P%x=%s" % (REGS.index("rbx"), (0x1234).to_bytes(8, "little").hex()
                                  .encode())) == b"OK"
        assert c.cmd(b"p%x" % REGS.index("rbx")) == (0x1234).to_bytes(8, "little").hex().encode()
        assert c.cmd(b"M100,4:deadbeef") == b"OK"
        assert c.cmd(b"m100,4") == b"deadbeef"
        assert c.cmd(b"X104,2:}]}\x03") == b"OK"  # binary with escapes: '}' and '#'
        assert c.cmd(b"m104,2") == b"7d23"
        assert c.cmd(b"mfff0,100") == b"00" * 16  # cut at the end of RAM
        assert c.cmd(b"m20000,4") == b"E14"
        assert c.cmd(b"Z2,0,1") == b""  # the test arch has no watchpoints: "unsupported"
        assert b"1 vCPU".hex().encode() in c.cmd(b"qRcmd," + b"info".hex().encode())
        assert c.cmd(b"c") == b"W07"
        return rips

    r, result = session(m, script)
    assert r.status == 7
    rips = result[0]
    assert rips[0] < rips[1] < rips[2] or len(set(rips)) == 3  # each step moved on


@pytest.mark.parametrize("cpus", [1, 2], ids=["serial", "parallel"])
def test_ctrl_c_stops_a_spinning_guest(cpus: int) -> None:
    m = machine(PROGRAM_SPIN, cpus)

    def script(c: Client) -> bytes:
        assert c.cmd(b"?").startswith(b"T05")
        c.send(b"c")
        time.sleep(0.3)
        c.sock.sendall(b"\x03")
        stop = c.packet()
        assert stop.startswith(b"T02thread:"), stop
        if cpus == 2:
            assert c.cmd(b"qfThreadInfo") == b"m1,2"
            assert c.cmd(b"Hg2") == b"OK"
            assert len(c.cmd(b"g")) == 18 * 16  # the other vCPU's registers, parked
            assert c.cmd(b"Hg1") == b"OK"
        c.send(b"c")  # resume, stop again, then kill
        time.sleep(0.2)
        c.sock.sendall(b"\x03")
        assert c.packet().startswith(b"T02")
        c.send(b"k")
        return stop

    r, _ = session(m, script)
    assert (r.status, r.reason) == (0, "killed by GDB")
    m.close()


def test_a_debug_exit_without_a_debugger_ends_the_run_with_a_dump() -> None:
    m = machine(PROGRAM_SPIN)
    try:
        m.hooks.call("gdb_set_guest_debug", cpu=m.cpus[0], step=True, breakpoints=[])
        with pytest.raises(UnhandledExitError, match="KVM_EXIT_DEBUG") as info:
            m.run(timeout=TIMEOUT)
        assert "rip=" in info.value.dump
    finally:
        m.close()


def test_a_client_that_vanishes_mid_stop_lets_the_run_finish() -> None:
    m = machine(PROGRAM_SYNC)

    def script(c: Client) -> None:
        assert c.cmd(b"?").startswith(b"T05")
        c.send(b"vCont;s:1")
        c.packet()
        c.sock.sendall(b"$m0,4#")  # half a packet, then gone
        c.sock.close()

    r, _ = session(m, script)
    assert r.status == 7  # the guest ran to its exit, no step left behind


_PACKETS = st.one_of(
    st.binary(max_size=64),
    st.tuples(st.sampled_from(list(b"?gGpPmMXzZHTcsCSDkvqQ")), st.binary(max_size=40))
    .map(lambda t: bytes((t[0],)) + t[1]),
    st.sampled_from([b"vCont;s:zz", b"vCont;x", b"Hgp1.", b"Hc-1", b"Z9,0,1", b"m-1,4",
                     b"mffffffffffffffffff,4", b"M0,2:abc", b"X0,4:ab", b"P0=", b"Pq=00",
                     b"qXfer:features:read:target.xml:zz", b"qRcmd,zz", b"T0", b"Z0,1,0",
                     b"z2,0,100000", b"qThreadExtraInfo,99", b"G00", b"p-1"]))


@pytest.fixture(scope="module")
def stopped_machine() -> Iterator[Machine]:
    m = machine(PROGRAM_SPIN)  # never run: stopped, as the stub's packets expect
    yield m
    m.close()


@settings(max_examples=300, deadline=None)
@given(packets=st.lists(_PACKETS, max_size=8))
def test_any_packet_gets_an_answer_never_an_exception(stopped_machine: Machine,
                                                      packets: list[bytes]) -> None:
    stub = GdbStub(stopped_machine)
    stub.connected = True
    for p in packets:
        try:
            reply = stub.handle(p)
        except _Resume:
            continue  # c, s, D, k, vCont: a resume, which the serving loop acts on
        assert reply is None or isinstance(reply, bytes)



def test_breakpoints_served_by_stepping_when_the_kvm_reports_none() -> None:
    def pcs_of_first_steps(c: Client) -> list[int]:
        c.cmd(b"?")
        pcs = []
        for _ in range(6):
            c.cmd(b"vCont;s:1")
            regs = c.cmd(b"g")
            pcs.append(0xFFFF0000 + (int.from_bytes(bytes.fromhex(
                regs[RIP * 16:RIP * 16 + 16].decode()), "little") & 0xFFFF))
        c.send(b"k")
        return pcs

    m = machine(PROGRAM_SYNC)
    _, result = session(m, pcs_of_first_steps)
    m.close()
    target = result[0][4]

    def break_there(c: Client) -> bytes:
        c.cmd(b"?")
        assert c.cmd(b"Z0,%x,1" % target) == b"OK"
        stop = c.cmd(b"c")
        regs = c.cmd(b"g")
        rip = int.from_bytes(bytes.fromhex(regs[RIP * 16:RIP * 16 + 16].decode()), "little")
        assert 0xFFFF0000 + (rip & 0xFFFF) == target  # stopped before executing it
        assert c.cmd(b"z0,%x,1" % target) == b"OK"
        assert c.cmd(b"c") == b"W07"
        return stop

    m = machine(PROGRAM_SYNC)
    _, result = session(m, break_there)
    assert result[0].startswith(b"T05thread:1;"), result  # then on to the end (W07)
    m.close()


def test_a_client_flooding_packets_while_the_guest_runs_is_bounded(
        stopped_machine: Machine) -> None:
    from kvmfw.gdb.protocol import Received
    from kvmfw.gdb.stub import MAX_QUEUED

    stub = GdbStub(stopped_machine)
    for _ in range(MAX_QUEUED * 3):
        stub.feed(Received("packet", b"g"))
    assert stub.inbox.qsize() == MAX_QUEUED
