"""`kvmfw run` as a user types it, with the x86 plugin and the default board installed."""

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


def kvmfw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmfw.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd="/", stdin=subprocess.DEVNULL)


def test_the_embedded_guest_prints_and_exits_0() -> None:
    r = kvmfw("run")
    assert r.returncode == 0, r.stderr
    assert "Hello from kvmfw" in r.stdout
    summary = r.stderr.strip().splitlines()[-1]
    assert summary.startswith("kvmfw: guest pseudo-op exit(0); status 0;")
    assert "exits" in summary and "s simulated in" in summary


def test_stats_file_holds_the_guests_dump_and_the_final_one(tmp_path: Path) -> None:
    out = tmp_path / "stats.json"
    r = kvmfw("run", "--stats", str(out), "--no-summary", "--console", "none")
    assert r.returncode == 0 and r.stderr == ""
    dumps = json.loads(out.read_text())
    assert len(dumps) == 2  # the guest asked for one through the pseudo-op device
    final = dumps[-1]
    assert final["system.cpu0"]["vm_exits"] >= dumps[0]["system.cpu0"]["vm_exits"] > 0
    assert final["system"]["sim_seconds"] > 0
    text = tmp_path / "stats.txt"
    kvmfw("run", "--stats", str(text), "--no-summary", "--console", "none")
    assert text.read_text().count("Begin Simulation Statistics") == 2


def test_console_to_a_file(tmp_path: Path) -> None:
    log = tmp_path / "console.txt"
    r = kvmfw("run", "--console", f"file:{log}", "--no-summary")
    assert r.returncode == 0 and "Hello" not in r.stdout
    assert "Hello from kvmfw" in log.read_text()


def test_toml_config_with_the_same_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('memory = "64M"\nconsole = "none"\nno_summary = true\n'
                   'device = ["debug-exit"]\nno_default_devices = false\n')
    r = kvmfw("run", "--config", str(cfg))
    assert r.returncode == 0, r.stderr


def test_random_file_and_missing_initrd_are_one_line_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(4096))
    r = kvmfw("run", "--kernel", str(junk))
    assert r.returncode == 7 and r.stderr.count("\n") == 1
    assert "unknown image format" in r.stderr and "Traceback" not in r.stderr
    r = kvmfw("run", "--initrd", str(tmp_path / "missing.cpio"))
    assert r.returncode == 7 and "initrd" in r.stderr


def test_bad_option_syntax() -> None:
    r = kvmfw("run", "--option", "irqchip")
    assert r.returncode == 2 and "expected KEY=VALUE" in r.stderr
