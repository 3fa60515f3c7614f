"""The Python API a user writes (``from kvmfw import Machine``), on the test-only real-mode
arch plugin: keyword construction, typed run results, ``until``, ``m.console``,
``cpu.regs``, readable stats names; and the console capture on its own."""

from __future__ import annotations

import io
import re

import pytest
from kvmtest import HALT, PIO, PIOLOOP, SPIN, needs_kvm
from realmode_arch import RealModeArch

import kvmfw
from kvmfw import Console, Machine, MachineConfig, Range, RunEnd
from kvmfw.errors import ConfigError, RunTimeoutError

# --- Console (no KVM) -------------------------------------------------------------------


def test_console_keeps_the_newest_bytes_and_counts_the_rest() -> None:
    c = Console(limit=8)
    c.write(b"0123456789")
    c.write(b"ab")
    assert c.data == b"456789ab" and c.dropped == 4
    assert "9a" in c and b"0" not in c


def test_console_stays_bounded_under_byte_at_a_time_output() -> None:
    c = Console(limit=16)
    data = bytes(range(256)) * 4
    for i in range(len(data)):
        c.write(data[i:i + 1])
        assert len(c._buf) <= 32  # never more than twice the limit held
    assert c.data == data[-16:] and c.dropped == len(data) - 16


def test_console_tees_and_decodes() -> None:
    sink = io.BytesIO()
    c = Console(tee=sink)
    c.write("héllo\n".encode() + b"\xff")
    assert sink.getvalue() == "héllo\n".encode() + b"\xff"
    assert c.text == "héllo\n\ufffd" and str(c) == c.text


def test_console_watch_matches_across_writes_once() -> None:
    c = Console()
    c.write(b"login: before the watch")
    hits: list[int] = []
    c.watch("login:", lambda: hits.append(1))
    c.write(b"...log")
    assert hits == []  # output before the watch does not count
    c.write(b"in: ")
    c.write(b"login: ")
    assert hits == [1]
    c.watch(re.compile(r"ready \d+"), lambda: hits.append(2))
    c.write(b"ready 42")
    assert hits == [1, 2]


def test_public_names() -> None:
    for name in ("Machine", "MachineConfig", "RunResult", "RunEnd", "Console", "Device",
                 "Range", "hookimpl"):
        assert name in kvmfw.__all__ and hasattr(kvmfw, name)


def test_config_and_keywords_are_not_mixed() -> None:
    with pytest.raises(ConfigError, match="not both"):
        Machine(MachineConfig(), memory="64M")
    with pytest.raises(ConfigError, match="size"):
        Machine(memory="lots", arch_plugin=RealModeArch())
    with pytest.raises(ConfigError, match="devices must be a list"):
        Machine(devices="uart16550", arch_plugin=RealModeArch())  # type: ignore[arg-type]


# --- real guests ------------------------------------------------------------------------


class ConsolePort:
    """Port 0x10: each byte written goes to the machine's console (a UART in miniature);
    port 0x13 ends the run with the written value."""

    def __init__(self, m: Machine) -> None:
        self.m = m

    def read(self, offset: int, size: int) -> bytes:
        return bytes([0x41]) * size

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0:
            self.m.console.write(data[:1])
        elif offset == 3:
            self.m.request_exit(data[0], "guest wrote the exit port")


def machine(program: int, **kw: object) -> Machine:
    m = Machine(arch_plugin=RealModeArch(program), memory="64K", **kw)  # type: ignore[arg-type]
    m.map_device(Range("pio", 0x10, 4, "console-port"), ConsolePort(m))
    return m


@needs_kvm
def test_keywords_build_the_machine_and_run_returns_a_typed_result() -> None:
    with machine(PIO, cpus=1) as m:
        assert m.config.memory == 64 << 10 and m.config.cpus == 1
        r = m.run(timeout=20)
        assert (r.end, r.status, r.ok) == (RunEnd.GUEST, 0, True)
        assert r.console == "OKB" == m.console.text
        assert r.seconds == r.host_seconds > 0 and r.ticks > 0
    assert m._closed  # the context manager closed it


@needs_kvm
def test_regs_read_and_write_reach_the_guest() -> None:
    with machine(PIOLOOP) as m:
        cpu = m.cpus[0]
        cpu.regs.regs["rcx"] = 3  # the loop's count (AL, the byte out, is the program's number)
        cpu.mark_context_dirty()  # (this test arch's context does not mark itself; x86's does)
        r = m.run(timeout=20)
        assert r.console == chr(PIOLOOP) * 3
        assert cpu.regs.rcx == 0  # pulled back after the run


@needs_kvm
def test_until_console_text_ends_the_run() -> None:
    with machine(PIO) as m:
        r = m.run(timeout=20, until="OK")
        assert r.end is RunEnd.UNTIL and r.status == 0 and "OK" in r.reason
        assert r.console.startswith("OK")


@needs_kvm
def test_until_callable_tick_limit_and_halt() -> None:
    with machine(SPIN) as m:
        start = m.eventq.cur_tick
        r = m.run(timeout=60, until=lambda mm: mm.eventq.cur_tick - start > 3_000_000_000)
        assert r.end is RunEnd.UNTIL and r.status == 0
        r = m.run(timeout=60, max_ticks=1_000_000_000)
        assert r.end is RunEnd.TICK_LIMIT
    with machine(HALT) as m:
        assert m.run(timeout=20).end is RunEnd.HALTED


@needs_kvm
def test_a_timeout_raises_with_the_result_so_far() -> None:
    with machine(SPIN) as m:
        with pytest.raises(RunTimeoutError) as info:
            m.run(timeout=0.3)
        result = info.value.result  # type: ignore[attr-defined]
        assert result.status == 124 and result.ticks > 0 and result.end is RunEnd.TIMEOUT


@needs_kvm
def test_console_tee_receives_what_the_guest_printed() -> None:
    sink = io.BytesIO()
    with machine(PIO, console=sink) as m:
        m.run(timeout=20)
    assert sink.getvalue() == b"OKB"


@needs_kvm
def test_device_stats_names_read_well(make_machine) -> None:  # type: ignore[no-untyped-def]
    from kvmfw.device import Device

    class Thing(Device):
        name = "uart16550"

        def ranges(self) -> list[Range]:
            return [Range("pio", 0x3F8, 8)]

    m, _, _ = make_machine(PIO)
    m.add_device(Thing(m.device_context()))
    dump = m.dump_stats()
    # the device's name and its index on the board, separated ("uart165500" before)
    assert "system.uart16550_0.reads" in dump and "uart165500" not in dump
