"""Start-up of an arm64 guest: what the plugin imports (behaviour, never a time).

A ``kvmfw run`` of an AArch64 Linux ``Image`` needs neither the AArch32 support
(``aarch32``: zImage/ELF32 loading, AArch32 register views), the checkpoint state code
(``state``), gzip (only compressed kernels), the GDB stub, the emulator glue nor the PMU
helpers: on the emulated arm64 host every module costs tens of milliseconds of start-up.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

NOT_FOR_AN_AARCH64_BOOT = ("gzip", "kvmfw_armv8.aarch32", "kvmfw_armv8.state",
                           "kvmfw_armv8.gdb", "kvmfw_armv8.emu", "kvmfw_armv8.perf",
                           "kvmfw_armv8.testing", "kvmfw.gdb", "kvmfw.emu", "kvmfw.checkpoint")


def _loaded(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter (the environment's path, so also inside the
    arm64 environment's staged checkout); the listed modules it left imported."""
    probe = code + textwrap.dedent(f"""
        import json, sys
        names = {NOT_FOR_AN_AARCH64_BOOT!r}
        print("KVMFW-MODULES " + json.dumps(sorted(
            m for m in sys.modules for n in names if m == n or m.startswith(n + "."))))
    """)
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=300, cwd="/", env=dict(os.environ), stdin=subprocess.DEVNULL)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("KVMFW-MODULES ")]
    assert line, r.stdout + r.stderr
    return list(json.loads(line[-1].split(" ", 1)[1]))


def test_loading_the_plugin_and_board_imports_no_aarch32_state_or_gzip() -> None:
    assert _loaded("import kvmfw.cli, kvmfw_armv8.plugin, kvmfw_armv8.board\n") == []


def test_the_lazy_names_are_the_modules_own() -> None:
    from kvmfw_armv8 import aarch32, plugin

    assert plugin.A32_FEATURE == aarch32.FEATURE


@pytest.mark.arm64_kvm
def test_a_kvmfw_run_of_an_aarch64_image_imports_none_of_them(tmp_path: Path) -> None:
    # a synthetic Image whose first instruction branches to itself; the run ends at its
    # first tick limit, after the machine was built and the Image, initrd and device tree
    # were loaded (the whole start-up of a Linux boot)
    image = tmp_path / "Image"
    image.write_bytes(struct.pack("<IIQQQQQQII", 0x14000000, 0, 0, 1 << 20, 0b1010, 0, 0, 0,
                                  0x644D5241, 0) + bytes((1 << 20) - 64))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"initrd" * 1000)
    gic = {"2": "v2"}.get(os.environ.get("KVMFW_ARM64_GIC", ""), "auto")
    argv = ["run", "--arch", "armv8", "--kernel", str(image), "--initrd", str(initrd),
            "--cmdline", "console=ttyAMA0", "--memory", "64M", "--console", "none",
            "--no-summary", "--max-ticks", "1000000", "--timeout", "120",
            "--option", f"gic={gic}"]
    code = textwrap.dedent(f"""
        import kvmfw.cli
        try:
            kvmfw.cli.main({argv!r})
        except SystemExit as e:
            assert e.code in (0, None), e.code
    """)
    assert _loaded(code) == []
