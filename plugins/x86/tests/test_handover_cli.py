"""`kvmfw run --switch-at/--emulate-insts/--trace` and `--max-insts` on the default guest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                                reason="needs a readable and writable /dev/kvm")
pytest.importorskip("kvmfw_devices", reason="the default board needs kvmfw-devices")
pytest.importorskip("unicorn", reason="the emulated CPU needs the 'emu' extra (unicorn)")
pytest.importorskip("capstone", reason="the trace needs the 'emu' extra (capstone)")


def kvmfw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmfw.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd="/", stdin=subprocess.DEVNULL)


def test_switch_at_emulates_then_the_guest_finishes_on_kvm(tmp_path: Path) -> None:
    trace = tmp_path / "trace.txt"
    stats = tmp_path / "stats.json"
    r = kvmfw("run", "--switch-at", "1000000", "--emulate-insts", "1500", "--trace",
              str(trace), "--stats", str(stats))
    assert r.returncode == 0, r.stderr
    assert "Hello from kvmfw" in r.stdout and "exiting with status 0" in r.stdout
    lines = trace.read_text().splitlines()
    assert len(lines) == 1500
    assert lines[0].split()[0] == "0" and ":" in lines[0].split()[1]
    dumps = json.loads(stats.read_text())  # one dump per stats request, the final last
    assert dumps[-1]["system.cpu0.insts"]["emulated"] == 1500


def test_max_insts_stops_exactly(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    r = kvmfw("run", "--max-insts", "700", "--stats", str(stats))
    assert r.returncode == 0, r.stderr
    assert "instruction limit of 700 reached" in r.stderr
    text = stats.read_text()
    assert '"emulated": 700' in text and '"method": "emulated"' in text


@pytest.mark.parametrize("args, msg", [
    (["--trace", "t.txt"], "--trace records emulated instructions"),
    (["--switch-at", "5"], "--switch-at and --emulate-insts go together"),
    (["--max-insts", "5", "--switch-at", "1", "--emulate-insts", "2"], "leave out"),
    (["--max-insts", "-1"], "must be between"),
    (["--emulate-insts", "0", "--switch-at", "1"], "must be between"),
])
def test_bad_combinations_are_one_line_errors(args: list[str], msg: str) -> None:
    r = kvmfw("run", *args)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr
