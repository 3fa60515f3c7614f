"""Checkpoints of real guests on /dev/kvm (no plugin installed: the test arch of
ckpt_arch.py): round trips through a directory, restores in a new process, the format's
atomicity under kill -9, and every refusal of a corrupt or foreign checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ckpt_arch import MEM, CkptArch, Rig, build, regs_of, restore  # noqa: E402

from kvmfw.checkpoint import format as fmt  # noqa: E402
from kvmfw.checkpoint.reader import load_manifest, verify  # noqa: E402
from kvmfw.checkpoint.state import capture  # noqa: E402
from kvmfw.errors import CheckpointError  # noqa: E402
from kvmfw.eventq import TICKS_PER_MS  # noqa: E402

CHILD = Path(__file__).parent / "ckpt_child.py"


@pytest.fixture(scope="module")
def expected() -> tuple[bytes, int]:
    """The uninterrupted run's result and progress count."""
    rig = build()
    with rig.machine as m:
        assert m.run(timeout=60).status == 0
        r = rig.result()
        assert r is not None
        return r, rig.ticker.count


def run_until(rig: Rig, count: int) -> None:
    while rig.ticker.count < count:
        rig.machine.run(max_ticks=TICKS_PER_MS // 4, timeout=60)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A checkpoint of the guest mid-computation."""
    rig = build()
    with rig.machine as m:
        run_until(rig, 40)
        return m.checkpoint(tmp_path / "cpt")


def test_round_trip_through_a_directory_finishes_as_the_uninterrupted_run(
        tmp_path: Path, expected: tuple[bytes, int]) -> None:
    rig = build()
    with rig.machine as m:
        run_until(rig, 40)
        path = m.checkpoint(tmp_path / "cpt")
        assert m.checkpoints_taken == [path]
        before = capture(m)
        regs = regs_of(m.cpus[0])
        ram = [bytes(r.view) for r in m.memory]
        assert m.run(timeout=60).status == 0  # the original continues after it
        assert rig.result() == expected[0]
    for _ in range(2):  # restoring twice gives the same run
        r2 = restore(path)
        with r2.machine as m2:
            assert capture(m2) == before
            assert regs_of(m2.cpus[0]) == regs
            assert [bytes(r.view) for r in m2.memory] == ram
            assert all(r.private and r.path is not None for r in m2.memory)
            assert m2.run(timeout=60).status == 0
            assert (r2.result(), r2.ticker.count) == expected


def test_ram_files_are_sparse_and_hold_only_nonzero_pages(ckpt: Path) -> None:
    man = load_manifest(ckpt)
    ram = man.memory[0]
    assert ram["size"] == MEM and os.path.getsize(ckpt / ram["file"]) == MEM
    # the guest wrote 40 * 256 dwords: 10 pages, plus nothing else in RAM
    assert ram["pages"] == 10
    assert os.stat(ckpt / ram["file"]).st_blocks * 512 <= 64 * 1024
    assert sorted(p.name for p in ckpt.iterdir()) == ["manifest.json", "ram", "state.json",
                                                        "stats.json"]
    assert man.data["version"] == "1.2" and man.data["arch"] == "realmode-test"
    assert man.data["host_files"] == []  # (this machine's devices read no host file)
    assert man.data["cpu_model"]["vendor"] == "kvmfw-test"
    assert man.data["board"] == [{"key": "0:ticker", "name": "ticker",
                                  "params": {"ckpt_at": -1}}]
    assert man.data["time"]["tick"] > 0
    assert not [p for p in ckpt.parent.iterdir() if ".tmp-" in p.name]


def test_restore_in_a_new_process(ckpt: Path, expected: tuple[bytes, int]) -> None:
    for _ in range(2):
        out = subprocess.run([sys.executable, str(CHILD), "restore", str(ckpt)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["0", expected[0].hex()]


def test_a_checkpoint_requested_by_a_device_is_taken_between_slices_and_the_run_goes_on(
        tmp_path: Path, expected: tuple[bytes, int]) -> None:
    rig = build(ckpt_at=30)
    with rig.machine as m:
        m.checkpoint_dir = str(tmp_path)
        assert m.run(timeout=60).status == 0
        assert rig.result() == expected[0]
        [path] = m.checkpoints_taken
        assert path.parent == tmp_path and path.name.startswith("cpt.")
        assert int(path.name[4:]) == load_manifest(path).tick
    r2 = restore(path, ckpt_at=30)
    with r2.machine as m2:
        assert r2.ticker.count == 30
        assert m2.run(timeout=60).status == 0
        assert (r2.result(), r2.ticker.count) == expected


def test_exit_after_checkpoint_ends_the_run(tmp_path: Path) -> None:
    rig = build(ckpt_at=30)
    with rig.machine as m:
        m.checkpoint_dir = str(tmp_path)
        m.exit_after_checkpoint = True
        r = m.run(timeout=60)
        assert r.status == 0 and r.reason.startswith("checkpoint written to")
        assert rig.result() is None and rig.ticker.count == 30
        assert len(m.checkpoints_taken) == 1


def test_requested_checkpoints_past_the_limit_or_the_disk_floor_are_refused(
        tmp_path: Path, expected: tuple[bytes, int]) -> None:
    """A guest (or anyone) asking for checkpoints in a loop cannot fill the disk: past
    ``checkpoint_limit``, or below ``checkpoint_min_free``, each is refused with its
    reason and the run goes on to the same result."""
    rig = build()
    with rig.machine as m:
        m.checkpoint_dir = str(tmp_path)
        m.checkpoint_limit = 2
        for _ in range(4):
            m.request_checkpoint()
            m.run(max_ticks=TICKS_PER_MS // 4, timeout=60)
        assert len(m.checkpoints_taken) == 2 and len(list(tmp_path.iterdir())) == 2
        assert len(m.checkpoints_refused) == 2
        assert "2 checkpoints written already" in m.checkpoints_refused[0]
        m.checkpoint_limit = 10
        m.checkpoint_min_free = 1 << 62
        m.request_checkpoint()
        m.run(max_ticks=TICKS_PER_MS // 4, timeout=60)
        assert len(m.checkpoints_taken) == 2 and "below the floor" in m.checkpoints_refused[-1]
        m.run(timeout=60)
        assert (rig.result(), rig.ticker.count) == expected


def test_a_checkpoint_requested_from_another_thread(
        tmp_path: Path, expected: tuple[bytes, int]) -> None:
    rig = build()
    with rig.machine as m:
        m.checkpoint_dir = str(tmp_path)
        # requested by another thread before the run (a timer could fire after a fast
        # host's run already ended): the run takes it at its first slice boundary
        thread = threading.Thread(target=m.request_checkpoint)
        thread.start()
        thread.join()
        assert m.run(timeout=60).status == 0
        assert rig.result() == expected[0]
        assert len(m.checkpoints_taken) == 1
    r2 = restore(m.checkpoints_taken[0])
    with r2.machine as m2:
        assert m2.run(timeout=60).status == 0
        assert r2.result() == expected[0]


# --- atomicity ---------------------------------------------------------------------------

def test_kill_9_while_writing_never_leaves_a_checkpoint_that_restores(tmp_path: Path) -> None:
    """A writer killed at random points: the final directory either does not exist or
    is complete (verifies and restores); temporary directories are refused."""
    rnd = random.Random(1234)
    complete = refused = 0
    for i in range(16):
        d = tmp_path / f"k{i}"
        d.mkdir()
        target = d / "cpt"
        p = subprocess.Popen([sys.executable, str(CHILD), "write", str(target), "24"],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "writing"
        time.sleep(rnd.uniform(0, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        p.stdout.close()
        for entry in d.iterdir():
            try:
                verify(load_manifest(entry))
            except CheckpointError:
                assert entry != target, "the final name exists but does not verify"
                refused += 1
            else:
                complete += 1
        if target.exists():
            restore(target).machine.close()
    print(f"kill -9: {complete} complete, {refused} refused")
    assert complete + refused > 0


def test_the_next_checkpoint_removes_temporaries_of_dead_writers(tmp_path: Path) -> None:
    """A killed writer's temporary directory goes when the next checkpoint is written
    beside it; a live writer's, and anything not named like one, stay."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f".cpt.tmp-{int(dead.stdout)}-0123abcd"
    live = tmp_path / f".cpt.tmp-{os.getpid()}-89abcdef"
    other = tmp_path / f".cpt.tmp-{int(dead.stdout)}-notours"
    for d in (stale, live, other):
        (d / "ram").mkdir(parents=True)
    rig = build()
    with rig.machine as m:
        run_until(rig, 5)
        m.checkpoint(tmp_path / "cpt2")
    assert not stale.exists() and live.exists() and other.exists()


# --- refusals ------------------------------------------------------------------------------

def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _edit_manifest(path: Path, **changes: object) -> None:
    mp = path / fmt.MANIFEST
    data = json.loads(mp.read_text())
    data.update(changes)
    mp.write_text(json.dumps(data))


def _refused(path: Path, match: str, arch: CkptArch | None = None) -> None:
    # warm caches (plugin scans, libc) so the fd count compares like with like
    fds = _fds()
    with pytest.raises(CheckpointError, match=match) as info:
        restore(path, arch=arch)
    assert "\n" not in str(info.value)
    assert _fds() == fds  # nothing half-restored: the machine built for it is closed


def test_a_flipped_byte_in_ram_is_refused(ckpt: Path) -> None:
    f = ckpt / "ram" / "0.bin"
    with open(f, "r+b") as fh:
        fh.seek(0x10000 + 5)
        b = fh.read(1)
        fh.seek(0x10000 + 5)
        fh.write(bytes([b[0] ^ 0x40]))
    _refused(ckpt, r"ram/0.bin: checksum mismatch")


def test_a_byte_written_into_a_hole_is_refused(ckpt: Path) -> None:
    with open(ckpt / "ram" / "0.bin", "r+b") as fh:
        fh.seek(0x80000)
        fh.write(b"\x01")
    _refused(ckpt, r"ram/0.bin: holds 11 pages")


def test_a_flipped_byte_in_the_state_is_refused(ckpt: Path) -> None:
    f = ckpt / "state.json"
    raw = bytearray(f.read_bytes())
    i = raw.index(b'"rcx":') + 6
    raw[i] = ord("9") if raw[i] != ord("9") else ord("8")
    f.write_bytes(raw)
    _refused(ckpt, r"state.json: checksum mismatch")


def test_a_missing_file_is_refused(ckpt: Path) -> None:
    (ckpt / "state.json").unlink()
    _refused(ckpt, r"state.json: missing")
    (ckpt / "manifest.json").unlink()
    _refused(ckpt, r"manifest.json: missing")


def test_a_truncated_file_is_refused(ckpt: Path) -> None:
    os.truncate(ckpt / "ram" / "0.bin", MEM - 4096)
    _refused(ckpt, r"ram/0.bin: size .* is not")


def test_another_format_major_is_refused(ckpt: Path) -> None:
    _edit_manifest(ckpt, version="2.0")
    _refused(ckpt, r"manifest.json: field 'version' is 2.0")


def test_another_format_minor_is_accepted(ckpt: Path, expected: tuple[bytes, int]) -> None:
    _edit_manifest(ckpt, version="1.7", future_field={"x": 1})
    with restore(ckpt).machine as m:
        assert m.run(timeout=60).status == 0


def test_another_arch_is_refused(ckpt: Path) -> None:
    _edit_manifest(ckpt, arch="armv8")
    _refused(ckpt, r"field 'arch': a checkpoint of a armv8 guest")


def test_a_missing_plugin_or_one_of_another_major_is_refused(ckpt: Path) -> None:
    _edit_manifest(ckpt, plugins=[{"name": "kvmfw-no-such-plugin", "version": "1.0"}])
    _refused(ckpt, r"plugins'\[0\]: plugin kvmfw-no-such-plugin 1.0 is not installed")
    _edit_manifest(ckpt, plugins=[{"name": "pytest", "version": "9999.0"}])
    _refused(ckpt, r"plugins'\[0\]: plugin pytest is .* needs major 9999")


def test_a_cpu_model_the_host_cannot_give_is_refused(ckpt: Path) -> None:
    arch = CkptArch()
    arch.refuse_model = "cpuid 0x7 ebx: AVX2 missing"
    _refused(ckpt, r"field 'cpu_model': .*AVX2 missing", arch)


def test_an_invalid_manifest_is_refused(ckpt: Path) -> None:
    mp = ckpt / fmt.MANIFEST
    good = mp.read_text()
    mp.write_text(good[:-10])
    _refused(ckpt, r"manifest.json: not valid JSON")
    data = json.loads(good)
    data["memory"][0]["size"] = 1 << 40
    mp.write_text(json.dumps(data))
    _refused(ckpt, r"manifest.json: field 'memory'\[0\]: its file's size")
    data = json.loads(good)
    data["files"]["../etc/passwd"] = {"size": 1, "sha256": "0" * 64}
    mp.write_text(json.dumps(data))
    _refused(ckpt, r"names a file that is not part of a checkpoint")
    data = json.loads(good)
    del data["time"]
    mp.write_text(json.dumps(data))
    _refused(ckpt, r"field 'time' is missing")


def test_a_state_that_does_not_fit_the_machine_is_refused(ckpt: Path) -> None:
    """A state.json rewritten with a matching checksum but a hostile value: the core's
    checks refuse it before the vCPU or devices are touched."""
    import hashlib

    sp = ckpt / "state.json"
    data = json.loads(sp.read_text())
    data["time"]["tick"] = -5
    raw = json.dumps(data).encode()
    sp.write_bytes(raw)
    _edit_manifest(ckpt, files={**load_manifest(ckpt).data["files"], "state.json": {
        "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}})
    _refused(ckpt, r"field 'time'.tick: must be an integer")


def test_writing_over_an_existing_directory_is_refused(ckpt: Path) -> None:
    rig = build()
    with rig.machine as m, pytest.raises(CheckpointError, match="exists already"):
        m.checkpoint(ckpt)


# --- incremental checkpoints ---------------------------------------------------------------

def test_incremental_checkpoints_store_only_changed_pages_and_restore_through_the_chain(
        tmp_path: Path, expected: tuple[bytes, int]) -> None:
    rig = build()
    with rig.machine as m:
        run_until(rig, 20)
        full = m.checkpoint(tmp_path / "c0", incremental=True)
        run_until(rig, 40)
        m.memory.write(0x50000, b"kvmfw's own write")  # not seen by KVM's log
        inc1 = m.checkpoint(tmp_path / "c1", incremental=True)
        run_until(rig, 60)
        inc2 = m.checkpoint(tmp_path / "c2", incremental=True)
        final_state = capture(m)
        ram = [bytes(r.view) for r in m.memory]
    base, c1, c2 = (load_manifest(p) for p in (full, inc1, inc2))
    assert base.data["parent"] is None and base.memory[0]["map"] is None
    assert c1.data["parent"] == {"path": "../c0", "manifest_sha256": base.sha256}
    assert c2.data["parent"]["path"] == "../c1"
    # 20 progress writes = 5 pages of the guest's array (+ the page its 5th began on),
    # plus kvmfw's own write; nothing of the untouched RAM
    assert 6 <= c1.memory[0]["pages"] <= 8
    assert c1.memory[0]["pages"] < base.memory[0]["pages"] + 10
    for _ in range(2):
        r2 = restore(inc2)
        with r2.machine as m2:
            assert capture(m2) == final_state
            assert [bytes(r.view) for r in m2.memory] == ram
            assert m2.run(timeout=60).status == 0
            assert (r2.result(), r2.ticker.count) == expected


def test_an_incremental_checkpoint_without_its_parent_is_refused(tmp_path: Path) -> None:
    rig = build()
    with rig.machine as m:
        run_until(rig, 10)
        full = m.checkpoint(tmp_path / "c0", incremental=True)
        run_until(rig, 20)
        inc = m.checkpoint(tmp_path / "c1", incremental=True)
    with open(full / "ram" / "0.bin", "r+b") as f:
        f.seek(0x10004)
        f.write(b"\xff")
    _refused(inc, r"c0/ram/0.bin: checksum mismatch")
    _edit_manifest(full, created="another time")  # now another checkpoint than the link
    _refused(inc, r"field 'parent': parent .* is not the checkpoint it was taken after")
    import shutil

    shutil.rmtree(full)
    _refused(inc, r"field 'parent': parent checkpoint .* is missing")


# --- the CLI's checkpoint keys (checked without any plugin) ----------------------------------

def test_run_config_checks_the_checkpoint_keys(tmp_path: Path, ckpt: Path) -> None:
    from kvmfw.config import Source, check_restore_keys, check_run_config
    from kvmfw.errors import ConfigError

    src = Source()
    out = check_run_config({"checkpoint_at": "1000,500", "checkpoint_on": "usr2",
                            "checkpoint_dir": str(tmp_path / "new"), "restore": str(ckpt),
                            "exit_after_checkpoint": True}, set(), src)
    assert out["checkpoint_at"] == (1000, 500) and out["checkpoint_on"] == "SIGUSR2"
    assert check_run_config({"checkpoint_at": 7, "checkpoint_on": "none"}, set(), src) == {
        "checkpoint_at": (7, None), "checkpoint_on": "none"}
    for bad, match in (({"checkpoint_at": "-1"}, "between 0"),
                       ({"checkpoint_at": "1,0"}, "between 0"),
                       ({"checkpoint_at": "x"}, "a tick"),
                       ({"checkpoint_on": "SIGTERM"}, "SIGUSR1, SIGUSR2 or none"),
                       ({"restore": str(tmp_path)}, "no manifest.json"),
                       ({"checkpoint_dir": str(tmp_path / "a" / "b")}, "parent directory"),
                       ({"checkpoint_dir": str(ckpt / "state.json")}, "not a directory")):
        with pytest.raises(ConfigError, match=match):
            check_run_config(bad, set(), src)
    check_restore_keys({"restore": "x", "console": "none", "timeout": 5.0,
                        "checkpoint_dir": "d", "device": [], "no_reboot": False})
    with pytest.raises(ConfigError, match="drop --cpus, --memory"):
        check_restore_keys({"restore": "x", "memory": 1 << 20, "cpus": 2})


def test_hostile_machine_config_values_are_refused(ckpt: Path) -> None:
    good = json.loads((ckpt / fmt.MANIFEST).read_text())
    for key, value, match in (("host_frequency_hz", "fast", "host_frequency_hz"),
                              ("use_perf", 1, "use_perf"), ("cpus", 10**9, "cpus"),
                              ("unclaimed", "explode", "unclaimed"),
                              ("memory", -1, "memory"), ("nonsense", 1, "unknown key")):
        data = json.loads(json.dumps(good))
        data["machine"][key] = value
        (ckpt / fmt.MANIFEST).write_text(json.dumps(data))
        _refused(ckpt, f"field 'machine'.*{match}")
    data = json.loads(json.dumps(good))
    data["page_size"] = 65536
    (ckpt / fmt.MANIFEST).write_text(json.dumps(data))
    _refused(ckpt, "page")


def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(ckpt: Path) -> None:
    (ckpt / "state.json").unlink()
    os.mkfifo(ckpt / "state.json")
    _refused(ckpt, r"state.json: not a regular file")
    (ckpt / "manifest.json").unlink()
    os.mkfifo(ckpt / "manifest.json")
    _refused(ckpt, r"manifest.json: not a regular file")


def test_a_checkpoint_of_a_machine_running_vcpu_threads(
        tmp_path: Path, expected: tuple[bytes, int]) -> None:
    """Two vCPUs run on their own threads: the request stops both between slices, the
    checkpoint is taken, both threads start again (the second vCPU stays idle here)."""
    rig = build(ckpt_at=30, cpus=2)
    with rig.machine as m:
        m.checkpoint_dir = str(tmp_path)
        assert m.run(timeout=60).status == 0
        assert rig.result() == expected[0]
        [path] = m.checkpoints_taken
    state = json.loads((path / "state.json").read_text())
    assert [c["status"] for c in state["time"]["cpus"]][1] == "Idle"
    r2 = restore(path, ckpt_at=30)
    with r2.machine as m2:
        assert len(m2.cpus) == 2 and r2.ticker.count == 30
        assert m2.run(timeout=60).status == 0
        assert (r2.result(), r2.ticker.count) == expected


def test_a_board_configured_otherwise_is_refused(ckpt: Path) -> None:
    data = json.loads((ckpt / fmt.MANIFEST).read_text())
    data["board"][0]["params"]["ckpt_at"] = 5
    (ckpt / fmt.MANIFEST).write_text(json.dumps(data))
    _refused(ckpt, r"field 'board'\[0\].params: the rebuilt ticker is configured")


def test_a_requested_checkpoint_that_cannot_be_written_ends_the_run_with_the_error(
        tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    rig = build(ckpt_at=30)
    with rig.machine as m:
        m.checkpoint_dir = str(tmp_path / "file")
        with pytest.raises(CheckpointError, match="is not a directory"):
            m.run(timeout=60)
        assert not [p for p in tmp_path.iterdir() if p.name != "file"]
