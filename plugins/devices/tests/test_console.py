"""Console plumbing: the host terminal in raw mode (restored on close), the Ctrl-A escape."""

from __future__ import annotations

import io
import os
import sys
import termios
import time

import pytest
from conftest import Harness

from kvmfw_devices.console import ConsoleInput, ConsoleOutput


@pytest.fixture
def pty_stdin(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    master, slave = os.openpty()

    class Stdin:
        def fileno(self) -> int:
            return slave

    monkeypatch.setattr(sys, "stdin", Stdin())
    yield master, slave
    os.close(master)
    os.close(slave)


def wait_for(cond, h: Harness) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 5
    while not cond() and time.monotonic() < deadline:
        h.ctx.eventq.service_due()
        time.sleep(0.01)


def test_terminal_raw_while_open_and_restored_on_close(h: Harness, pty_stdin) -> None:  # type: ignore[no-untyped-def]
    master, slave = pty_stdin
    before = termios.tcgetattr(slave)
    assert before[3] & termios.ICANON
    got: list[bytes] = []
    con = ConsoleInput(h.ctx, "stdin", got.append)
    assert not termios.tcgetattr(slave)[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
    os.write(master, b"ab\x03")  # Ctrl-C reaches the guest in raw mode
    wait_for(lambda: b"".join(got) == b"ab\x03", h)
    assert b"".join(got) == b"ab\x03"
    con.close()
    assert termios.tcgetattr(slave) == before


def test_ctrl_a_x_ends_the_run_and_ctrl_a_ctrl_a_sends_one(h: Harness, pty_stdin) -> None:  # type: ignore[no-untyped-def]
    master, _ = pty_stdin
    got: list[bytes] = []
    con = ConsoleInput(h.ctx, "stdin", got.append)
    os.write(master, b"\x01\x01z\x01x")
    wait_for(lambda: bool(h.exits), h)
    con.close()
    assert b"".join(got) == b"\x01z"
    assert h.exits == [(0, "console escape (Ctrl-A x)")]


def test_output_sinks(h: Harness, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ConsoleOutput(h.ctx, "console").write(b"to ctx\n")
    assert h.output.getvalue() == b"to ctx\n"
    ConsoleOutput(h.ctx, "none").write(b"dropped")
    path = tmp_path / "out"
    out = ConsoleOutput(h.ctx, str(path))
    out.write(b"file")
    out.close()
    assert path.read_bytes() == b"file"


def test_broken_sink_does_not_stop_the_guest(h: Harness) -> None:
    sink = io.BytesIO()
    h.ctx.console_output = sink
    out = ConsoleOutput(h.ctx, "console")
    sink.close()
    out.write(b"x")  # ValueError swallowed
