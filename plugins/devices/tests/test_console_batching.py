"""Console output is written to the host in batches (a line, a bound, a short delay, the end
of a run), not one host write per guest byte; nothing is lost or reordered."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import Harness

from kvmfw_devices.console import ConsoleOutput
from kvmfw_devices.pl011 import Pl011
from kvmfw_devices.uart16550 import Uart16550

GUESTS = Path(__file__).parent / "guests"
MiB = 1 << 20


class CountingSink:
    """A console sink that counts the host writes it is asked for."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0

    def write(self, data: bytes) -> int:
        self.writes += 1
        self.data += data
        return len(data)

    def flush(self) -> None:
        pass


TEXT = b"Booting Linux on physical CPU 0x0\nMachine model: linux,dummy-virt\n" * 20


@pytest.mark.parametrize("kind", ["pl011", "uart16550"])
def test_uart_output_identical_in_one_write_per_line(h: Harness, kind: str) -> None:
    sink = CountingSink()
    h.ctx.console_output = sink
    if kind == "pl011":
        dev: Any = Pl011(h.ctx, input="none")
    else:
        dev = Uart16550(h.ctx, input="none")
    for b in TEXT:
        dev.write(0, bytes((b,)))  # the data register of both, one guest access per byte
    assert bytes(sink.data) == TEXT
    assert sink.writes == TEXT.count(b"\n")  # was len(TEXT): one per byte
    assert dev.stats["tx_bytes"] == len(TEXT)
    dev.close()


def test_prompt_without_newline_shows_after_a_short_delay(h: Harness) -> None:
    sink = CountingSink()
    h.ctx.console_output = sink
    dev = Pl011(h.ctx, input="none")
    for b in b"login: ":
        dev.write(0, bytes((b,)))
    assert sink.data == b""  # held back for a moment...
    eq = h.ctx.eventq
    nxt = eq.next_tick()
    assert nxt is not None and nxt - eq.cur_tick <= ConsoleOutput.FLUSH_DELAY
    eq.cur_tick = nxt
    eq.service_due()  # ...and written without any more guest output
    assert sink.data == b"login: " and sink.writes == 1
    dev.close()


def test_bounded_buffer_and_save_close_flush(h: Harness, tmp_path: Path) -> None:
    sink = CountingSink()
    h.ctx.console_output = sink
    out = ConsoleOutput(h.ctx, "console")
    out.write(b"y" * (ConsoleOutput.FLUSH_BYTES - 1))
    assert out.pending == ConsoleOutput.FLUSH_BYTES - 1
    out.write(b"y")  # the bound: never more than FLUSH_BYTES held
    assert out.pending == 0 and len(sink.data) == ConsoleOutput.FLUSH_BYTES
    out.close()
    dev = Uart16550(h.ctx, input="none")
    dev.write(0, b"s")
    dev.save()  # a checkpoint or fork: written out first (else the child writes it again)
    assert sink.data.endswith(b"s")
    dev.write(0, b"c")
    dev.close()
    assert sink.data.endswith(b"sc")
    assert h.ctx.eventq.next_tick() is None  # (and its delayed flush descheduled)


# --- real guests on /dev/kvm ------------------------------------------------------------------

def real_guest(fn: Any) -> Any:
    """A test that runs a guest assembled from ``guests/`` on /dev/kvm."""
    for mark in (pytest.mark.kvm,
                 pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                                    reason="needs a working /dev/kvm"),
                 pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None,
                                    reason="needs GNU as and ld to build the guests")):
        fn = mark(fn)
    return fn


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from kvmfw.testing import assemble

    out = tmp_path_factory.mktemp("guests")

    def make(name: str) -> Path:
        return assemble((GUESTS / f"{name}.S").read_text(), out_dir=out, name=name,
                        bits=32, include=[GUESTS])
    return make


class PipeSink:
    """The machine's console tee: a real pipe, each write one ``os.write``, drained by a
    reader thread."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.writes = 0
        self.got = bytearray()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while chunk := os.read(self.r, 65536):
            self.got += chunk

    def write(self, data: bytes) -> int:
        self.writes += 1
        return os.write(self.w, data)

    def flush(self) -> None:
        pass

    def close(self) -> bytes:
        os.close(self.w)
        self._reader.join(10)
        os.close(self.r)
        return bytes(self.got)


def _run(image: Path, **run: Any) -> tuple[Any, bytes, int, Any]:
    x86 = pytest.importorskip("kvmfw_x86.plugin")
    loaders = pytest.importorskip("kvmfw_x86.loaders")
    from kvmfw.machine import Machine, MachineConfig

    pipe = PipeSink()
    cfg = MachineConfig(arch="x86", memory=64 * MiB, devices=["uart16550", "debug-exit"],
                        default_devices=False,
                        options={"irqchip": "kernel", "console_output": pipe})
    m = Machine(cfg, arch_plugin=x86.X86Plugin(), arch_name="x86")
    try:
        loaders.load(m, str(image), {})
        result = m.run(**run)
        text = m.console.data
        out = pipe.close()
        return result, out, pipe.writes, text
    finally:
        m.close()


@real_guest
def test_guest_output_at_run_end_in_few_writes(build, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The last bytes (no newline) before the guest ends the run are on the host when run()
    returns, in the machine's console and in the sink, and the whole output took one host
    write per line, not one per byte."""
    # simulated time follows host time: a busy host that preempts the guest for longer than
    # the delayed flush mid-line would add a write; the delay is tested on its own below
    monkeypatch.setattr(ConsoleOutput, "FLUSH_DELAY", 10**15)
    result, out, writes, text = _run(build("console_tail"), timeout=30)
    expected = b"first\nsecond\nno newline at the end"
    assert result.status == (0x21 << 1) | 1
    assert out == expected and text == expected
    assert writes <= 3  # two lines and the tail (was len(expected) = 34)


@real_guest
def test_guest_prompt_shows_without_more_output(build) -> None:  # type: ignore[no-untyped-def]
    """A prompt without a newline, then a guest that prints nothing more: run(until=prompt)
    returns, so the prompt reached the console (by the delayed flush)."""
    result, out, _, _ = _run(build("console_prompt"), until="prompt> ", timeout=60)
    assert result.end.name == "UNTIL", result
    assert out == b"line one\nline two\nprompt> "


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-I", "-m", "kvmfw.cli", "run", "--no-default-devices",
            "--device", "uart16550", *args]


def _tx_bytes(stats: Path) -> int:
    dumps = json.loads(stats.read_text())
    found: list[int] = []

    def walk(node: Any, key: str = "") -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}")
        elif isinstance(node, int) and "uart16550" in key and key.endswith("tx_bytes"):
            found.append(node)
    walk(dumps[-1])
    assert found, dumps[-1]
    return found[-1]


@real_guest
@pytest.mark.parametrize("end", ["timeout", "sigterm"])
def test_cli_loses_nothing_when_the_host_ends_the_run(build, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                      end: str) -> None:
    """A guest printing without newlines, stopped by the host timeout or SIGTERM: every byte
    the UART took (its tx_bytes) is on standard output."""
    stats = tmp_path / "stats.json"
    cmd = _cli("--kernel", str(build("console_stream")), "--no-summary", "--stats", str(stats),
               "--console", "stdio")
    if end == "timeout":
        proc = subprocess.run([*cmd, "--timeout", "3"], capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=120)
        assert proc.returncode == 124, proc.stderr
        out = proc.stdout
    else:
        p = subprocess.Popen([*cmd, "--timeout", "60"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert p.stdout is not None
        # the guest runs (its output reached the pipe); read unbuffered: communicate()
        # below reads the descriptor, not a Python buffer
        first = os.read(p.stdout.fileno(), 1)
        p.send_signal(signal.SIGTERM)
        rest, err = p.communicate(timeout=120)
        assert p.returncode == 128 + signal.SIGTERM, err
        out = first + rest
    assert out and set(out) == {ord("x")}
    assert len(out) == _tx_bytes(stats)
