"""A real ``kvmfw run`` (the embedded guest, default board) imports what it runs and nothing
else once the entry-point index is written: no distribution scan (importlib.metadata,
stevedore), no plugin CLI, no device the board does not hold. Behaviour, not timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                                reason="needs a readable and writable /dev/kvm")
pytest.importorskip("kvmfw_devices", reason="the default board needs kvmfw-devices")

PROBE = textwrap.dedent("""
    import json, sys
    import kvmfw.cli
    try:
        kvmfw.cli.main(sys.argv[1:])
    except SystemExit as e:
        status = e.code
    sys.stderr.write("KVMFW-PROBE " + json.dumps([status, sorted(sys.modules)]) + "\\n")
""")

NOT_FOR_A_RUN = ("importlib.metadata", "stevedore", "email", "kvmfw_x86.cli",
                 "kvmfw_devices.virtio_blk", "kvmfw_devices.virtio_console",
                 "kvmfw_devices.pl011", "kvmfw_devices.latency_mmio", "kvmfw.checkpoint",
                 "kvmfw.sweep", "kvmfw.emu", "kvmfw.gdb", "dask", "pandas")


def run_probe(cache: Path, *args: str) -> tuple[int, set[str]]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    r = subprocess.run([sys.executable, "-I", "-c", PROBE, "run", "--console", "none",
                        "--no-summary", *args], capture_output=True, text=True, timeout=120,
                       cwd="/", env=env, stdin=subprocess.DEVNULL)
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("KVMFW-PROBE ")]
    assert line, r.stderr
    status, modules = json.loads(line[-1].split(" ", 1)[1])
    return status, set(modules)


def test_a_run_with_a_valid_index_imports_only_what_it_runs(tmp_path: Path) -> None:
    status, first = run_probe(tmp_path)  # builds the index (one scan)
    assert status == 0
    assert list((tmp_path / "kvmfw").glob("entry-points-*.json"))
    status, second = run_probe(tmp_path)
    assert status == 0
    assert "kvmfw_devices.uart16550" in second and "kvmfw_x86.plugin" in second
    loaded = {m for m in second for n in NOT_FOR_A_RUN if m == n or m.startswith(n + ".")}
    assert loaded == set()


def test_a_device_given_on_the_command_line_is_loaded(tmp_path: Path) -> None:
    status, mods = run_probe(tmp_path, "--device", "debug-exit,port=0xf4")
    assert status == 0 and "kvmfw_devices.debug_exit" in mods


def test_plugin_commands_still_load_by_name() -> None:
    r = subprocess.run([sys.executable, "-I", "-m", "kvmfw.cli", "cpuid", "--help"],
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0 and "Usage: kvmfw cpuid" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-I", "-m", "kvmfw.cli", "--help"],
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert "cpuid" in r.stdout and "run" in r.stdout


@pytest.mark.parametrize("user", [True, False])
def test_identity_page_tables_map_4g_with_2m_pages(monkeypatch: pytest.MonkeyPatch,
                                                   user: bool) -> None:
    import struct

    from kvmfw_x86 import loaders

    written: dict[int, bytes] = {}
    monkeypatch.setattr(loaders, "write", lambda m, addr, data, what: written.update({addr: data}))
    base = loaders.identity_page_tables(None, user=user, base=0x9000)
    u = 0x4 if user else 0
    assert base == 0x9000 and sorted(written) == [0x9000, 0xA000, 0xB000]
    assert struct.unpack_from("<Q", written[0x9000])[0] == 0xA000 | 0x3 | u
    assert struct.unpack_from("<4Q", written[0xA000]) == tuple(
        0xB000 + i * 0x1000 | 0x3 | u for i in range(4))
    pd = struct.unpack("<2048Q", written[0xB000])
    assert pd == tuple((i << 21) | 0x83 | u for i in range(2048))
