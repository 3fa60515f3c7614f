"""A run that cannot stop at its host timeout ends the process (the CLI's hard timeout)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from kvmtest import needs_kvm

pytestmark = needs_kvm


def test_hard_timeout_ends_a_run_blocked_in_a_device() -> None:
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from realmode_arch import RealModeArch
        from kvmtest import PIO
        from kvmfw.device import Range
        from kvmfw.machine import Machine, MachineConfig

        class Stuck:
            def read(self, offset, size):
                return b"\\0" * size
            def write(self, offset, data):
                time.sleep(60)  # a console write to a pipe nobody reads

        m = Machine(MachineConfig(memory=0x10000), arch_plugin=RealModeArch(PIO))
        m.map_device(Range("pio", 0x10, 4, "stuck-console"), Stuck())
        m.run(timeout=0.5, hard_timeout=True)
        print("not reached")
    """)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60, cwd="/")
    assert r.returncode == 124
    assert time.monotonic() - t0 < 20
    assert "did not stop within 5 s of its host timeout of 0.5 s" in r.stderr
    assert "in write" in r.stderr  # where the main thread was stuck
    assert "not reached" not in r.stdout
