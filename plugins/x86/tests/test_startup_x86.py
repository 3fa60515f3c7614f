"""A real ``kvmfw run`` (the embedded guest, default board) imports what it runs and nothing
else once the entry-point index is written: no distribution scan (importlib.metadata,
stevedore), no plugin CLI, no device the board does not hold. Behaviour, not timing."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                                reason="needs a readable and writable /dev/kvm")
pytest.importorskip("kvmfw_devices", reason="the default board needs kvmfw-devices")

PROBE = textwrap.dedent("""
    import sys
    before = set(sys.modules)  # (an editable install's import hook brings pathlib and more)
    import kvmfw.cli
    try:
        kvmfw.cli.main(sys.argv[1:])
    except SystemExit as e:
        status = e.code
    new = sorted(set(sys.modules) - before)
    sys.stderr.write("KVMFW-PROBE " + repr([status, new]) + "\\n")
""")

NOT_FOR_A_RUN = ("importlib.metadata", "stevedore", "email", "kvmfw_x86.cli",
                 "kvmfw_devices.virtio_blk", "kvmfw_devices.virtio_console",
                 "kvmfw_devices.pl011", "kvmfw_devices.latency_mmio", "kvmfw.checkpoint",
                 "kvmfw.sweep", "kvmfw.emu", "kvmfw.gdb", "dask", "pandas",
                 # standard modules only cold paths use: a socket console, a raw terminal,
                 # the stuck-thread report, the RTC set by the guest, --config
                 "socket", "selectors", "tty", "sysconfig", "calendar", "tomllib",
                 # JSON (stats to a .json file; the entry-point index is text) and the
                 # temporary files only a forked virtio-blk disk needs
                 "json", "tempfile",
                 # the CLI library (a plain `kvmfw run` is parsed by kvmfw.cli.run.parse), and what
                 # only a given machine UUID, a set RTC or platform.machine() would import
                 "click", "uuid", "datetime", "platform",
                 # paths are strings on a run's path: pathlib (and the urllib.parse, ipaddress
                 # and fnmatch it imports) cost a run 3-5 ms of start-up
                 "pathlib", "urllib", "ipaddress",
                 # loggers are kvmfw.debug.get_logger's, which import logging (and the
                 # traceback, textwrap and string it brings: ~5 ms) only when it is used
                 "logging", "traceback", "textwrap", "string")


def run_probe(cache: Path, *args: str) -> tuple[int, set[str]]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    r = subprocess.run([sys.executable, "-I", "-c", PROBE, "run", "--console", "none",
                        "--no-summary", *args], capture_output=True, text=True, timeout=120,
                       cwd="/", env=env, stdin=subprocess.DEVNULL)
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("KVMFW-PROBE ")]
    assert line, r.stderr
    status, modules = ast.literal_eval(line[-1].split(" ", 1)[1])
    return status, set(modules)


def test_a_run_with_a_valid_index_imports_only_what_it_runs(tmp_path: Path) -> None:
    status, first = run_probe(tmp_path)  # builds the index (one scan)
    assert status == 0
    assert list((tmp_path / "kvmfw").glob("entry-points-*.txt"))
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


def _peak(fn) -> int:  # type: ignore[no-untyped-def]
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_bzimage_and_initrd_are_copied_once_into_guest_ram(machine_factory: Any,
                                                          tmp_path: Path) -> None:
    """A 4 MiB kernel and a 4 MiB initrd from files: no host buffer of either's size (each
    page copied is a page faulted in on a slow host), and the guest sees both exactly."""
    import struct

    from conftest import bzimage

    from kvmfw_x86 import loaders

    m, _ = machine_factory(memory=64 << 20)
    kernel_body = bytes(range(256)) * (4 << 12)
    k = tmp_path / "bzImage"
    k.write_bytes(bzimage(kernel=kernel_body))
    rd_data = b"INITRD-" * (600 << 10)
    rd = tmp_path / "initrd"
    rd.write_bytes(rd_data)
    peak = _peak(lambda: loaders.load(m, str(k), {"initrd": str(rd)}))
    assert peak < 1 << 20, peak
    bp = m.memory.read(loaders.BOOT_PARAMS_ADDR, 4096)
    rd_addr, rd_size = struct.unpack_from("<II", bp, 0x218)
    assert rd_size == len(rd_data) and m.memory.read(rd_addr, rd_size) == rd_data
    assert m.memory.read(0x1000000, len(kernel_body)) == kernel_body


def test_an_initrd_from_a_pipe_is_still_read(machine_factory: Any, tmp_path: Path) -> None:
    import struct
    import threading

    from conftest import bzimage

    from kvmfw_x86 import loaders

    m, _ = machine_factory(memory=64 << 20)
    k = tmp_path / "bzImage"
    k.write_bytes(bzimage())
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    data = b"PIPED" * 1000
    t = threading.Thread(target=lambda: fifo.write_bytes(data))
    t.start()
    loaders.load(m, str(k), {"initrd": str(fifo)})
    t.join(10)
    bp = m.memory.read(loaders.BOOT_PARAMS_ADDR, 4096)
    rd_addr, rd_size = struct.unpack_from("<II", bp, 0x218)
    assert rd_size == len(data) and m.memory.read(rd_addr, rd_size) == data


ENTRY_PROBE = textwrap.dedent("""
    import gc, sys
    import kvmfw.cli.run as run
    seen = {}
    make, go = run._make_machine, run._run_machine

    def make_probe(*a, **k):
        seen["build"] = gc.isenabled()
        return make(*a, **k)

    def run_probe(machine, cfg):
        seen["run"] = [gc.isenabled(), gc.get_freeze_count() > 0]
        return go(machine, cfg)

    run._make_machine, run._run_machine = make_probe, run_probe
    sys.argv = ["kvmfw", "run", "--max-ticks", "1", "--console", "none", "--no-summary"]
    BEFORE
    import kvmfw.entry
    try:
        kvmfw.entry.main()
    except SystemExit as exc:
        seen["status"] = exc.code
    seen["after"] = gc.isenabled()
    sys.stderr.write("KVMFW-PROBE " + repr(seen) + "\\n")
""")


def entry_probe(before: str = "") -> dict[str, object]:
    r = subprocess.run([sys.executable, "-c", ENTRY_PROBE.replace("BEFORE", before)],
                       capture_output=True, text=True, timeout=120, cwd="/",
                       stdin=subprocess.DEVNULL)
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("KVMFW-PROBE ")]
    assert line, r.stderr
    return ast.literal_eval(line[-1].split(" ", 1)[1])


def test_the_console_script_builds_without_the_collector_and_runs_with_it() -> None:
    """kvmfw.entry: the machine is built with the garbage collector paused; the guest runs
    with it on again and start-up's objects frozen."""
    seen = entry_probe()
    assert seen["status"] == 0, seen
    assert seen["build"] is False
    assert seen["run"] == [True, True]
    assert seen["after"] is True


def test_a_collector_the_user_turned_off_stays_off_through_a_run() -> None:
    seen = entry_probe(before="gc.disable()")
    assert seen["status"] == 0, seen
    assert seen["build"] is False and seen["run"] == [False, False]
    assert seen["after"] is False


@pytest.mark.parametrize("batch", [64, 2, 3])
def test_the_batched_msr_probe_finds_what_a_one_by_one_probe_finds(machine_factory: Any,
                                                                   batch: int) -> None:
    """``KVM_GET_MSRS`` stops at the first MSR it refuses: the batched probe skips exactly
    that one and goes on, whatever the batch size (a refused MSR at a batch's edge, or
    none in a batch, loses no neighbour). Refused indices are mixed in on purpose."""
    from kvmfw_x86.plugin import _read_msr, _read_msrs, msr_index_list

    m, _ = machine_factory()
    vcpu = m.cpus[0].vcpu
    refused = [0xDEAD0000 + i for i in range(4)]  # no such MSRs
    listed = msr_index_list(m.kvm.fd)
    asked = [refused[0], *listed[:5], refused[1], refused[2], *listed[5:], refused[3]]
    one_by_one = {i: v for i in asked if (v := _read_msr(vcpu, i)) is not None}
    assert not set(refused) & set(one_by_one) and len(one_by_one) >= len(listed) // 2
    got = _read_msrs(vcpu, asked, batch)
    assert set(got) == set(one_by_one)
    stable = {0xC0000080, 0x1B, 0x174, 0x175, 0x176}  # EFER, APIC base, SYSENTER_*
    assert {i: got[i] for i in got if i in stable} == \
        {i: one_by_one[i] for i in one_by_one if i in stable}
