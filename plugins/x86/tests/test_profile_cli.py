"""``kvmfw run --profile`` with the default x86 board (the core's own profile tests run
without plugins: tests/test_profile.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                                reason="needs a readable and writable /dev/kvm")


def test_cli_profile_prints_the_table_at_the_end() -> None:
    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvmfw.cli", "run", "--console", "none",
                               *extra], capture_output=True, text=True, timeout=120, cwd="/")

    r = run("--profile")
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert "exit profile:" in err and "exits by reason" in err and "exits by device" in err
    assert "pio uart16550" in err  # the embedded guest prints through the 16550
    assert "top ports (Python-serviced): 0x03f" in err
    assert "sync with KVM" in err and "run timer:" in err
    plain = run()
    assert plain.returncode == 0 and "exit profile" not in plain.stderr
