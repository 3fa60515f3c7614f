"""kvmfw sweep on real guests: the shipped square guest (examples/sweep) booted once,
checkpointed, and swept over 16 parameters on a real LocalCluster of 2 worker processes;
resume; a worker SIGKILLed mid-sweep; the example spec as the README runs it."""

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

pytest.importorskip("distributed", reason="sweeps need the sweep extra: pip install "
                    "'kvmfw[sweep]' (Dask distributed)")
pytest.importorskip("pyarrow", reason="sweeps need the sweep extra (pyarrow)")
pd = pytest.importorskip("pandas", reason="sweeps need the sweep extra (pandas)")

import kvmfw.sweep  # noqa: E402
from kvmfw.sweep.results import JOURNAL  # noqa: E402
from kvmfw.sweep.runner import local_client  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "sweep"

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                       reason="needs a working /dev/kvm"),
    pytest.mark.skipif(not EXAMPLE.is_dir(), reason="not run from a kvmfw source tree"),
]

N = 16


@pytest.fixture(scope="module")
def client() -> Any:
    with local_client(2) as c:
        yield c


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The square guest booted once to its checkpoint request (as kvmfw run does it)."""
    d = tmp_path_factory.mktemp("base")
    r = subprocess.run([sys.executable, "-I", "-m", "kvmfw.cli", "run", "--kernel",
                        str(EXAMPLE / "square.elf"), "--memory", "16M", "--console", "none",
                        "--checkpoint-dir", str(d), "--exit-after-checkpoint"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (ck,) = d.glob("cpt.*")
    return ck


def spec(base: Path, n: int = N) -> dict[str, Any]:
    return {"base": {"checkpoint": str(base)},
            "grid": {"param.n": list(range(1, n + 1))},
            "collect": {"console": {"square": r"square=(\d+)"}, "files": ["result.txt"],
                        "stats": ["system.cpu0.vm_exits"]},
            "limits": {"timeout": 120}}


def check_rows(df: Any, n: int = N) -> None:
    assert len(df) == n and sorted(df["param.n"]) == list(range(1, n + 1))
    for _, row in df.iterrows():
        k = int(row["param.n"])
        assert row["status"] == "ok", row.to_dict()
        assert row["exit_status"] == 0 and row["end"] == "guest"
        assert str(row["console.square"]) == str(k * k)
        assert row["file.result.txt"] == f"square={k * k}\n"
        assert row["stats.system.cpu0.vm_exits"] > 0
        assert row["error"] in ("", None) or pd.isna(row["error"])


def test_sweep_16_variants_then_resume_runs_nothing(client: Any, base: Path,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "out"
    rows: list[dict[str, Any]] = []
    df = kvmfw.sweep.run(spec(base), out=out, client=client, progress=False,
                         on_row=rows.append)
    check_rows(df)
    assert len(rows) == N
    assert len({r["pid"] for r in rows}) == 2  # both worker processes took variants
    for table in (pd.read_parquet(out / "results.parquet"), pd.read_csv(out / "results.csv")):
        check_rows(table)
    journal = (out / JOURNAL).read_text()
    again: list[dict[str, Any]] = []
    df2 = kvmfw.sweep.run(spec(base), out=out, resume=True, client=client, progress=False,
                          on_row=again.append)
    assert again == []  # nothing new ran
    assert (out / JOURNAL).read_text() == journal
    check_rows(df2)
    # a grown grid with --resume runs only the new variants
    df3 = kvmfw.sweep.run(spec(base, N + 2), out=out, resume=True, client=client,
                          progress=False, on_row=again.append)
    assert sorted(r["param.n"] for r in again) == [N + 1, N + 2]
    check_rows(df3, N + 2)


def test_worker_sigkilled_mid_sweep(base: Path, tmp_path: Path) -> None:
    """One worker process is SIGKILLed while it holds a variant: its variants are retried
    (on the other worker or the nanny's new one); every row is present once, right."""
    out = tmp_path / "out"
    killed: dict[str, Any] = {}
    lock = threading.Lock()
    with local_client(2) as c:
        pids = c.run(os.getpid)

        def on_row(row: dict[str, Any]) -> None:
            with lock:
                if killed or len(c.processing().get(_other(row["pid"]), ())) == 0:
                    return
                addr = _other(row["pid"])
                killed["keys"] = set(c.processing()[addr])
                killed["pid"] = pids[addr]
                os.kill(pids[addr], signal.SIGKILL)

        def _other(pid: int) -> str:
            return next(a for a, p in pids.items() if p != pid)

        df = kvmfw.sweep.run(spec(base), out=out, client=c, progress=False, on_row=on_row)
    assert killed, "no worker held a variant to kill"
    check_rows(df)
    rows = [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()]
    assert len(rows) == N and len({r["key"] for r in rows}) == N  # none lost, none twice
    retried = [r for r in rows if f"kvmfw-sweep-{r['key']}" in killed["keys"]]
    # (one may have finished in the instant between asking and killing: not all need be)
    assert any(r["pid"] != killed["pid"] for r in retried)


def test_example_spec_runs_as_written(tmp_path: Path) -> None:
    """`kvmfw sweep examples/sweep/sweep.toml --out DIR`, as the README gives it."""
    out = tmp_path / "sq"
    r = subprocess.run([sys.executable, "-I", "-m", "kvmfw.cli", "sweep",
                        str(EXAMPLE / "sweep.toml"), "--out", str(out), "--workers", "2",
                        "--no-progress"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "16 ok, 0 failed, 0 timeout, 0 error" in r.stderr
    check_rows(pd.read_parquet(out / "results.parquet"))
    r2 = subprocess.run([sys.executable, "-I", "-m", "kvmfw.cli", "sweep",
                         str(EXAMPLE / "sweep.toml"), "--out", str(out)],
                        capture_output=True, text=True, timeout=600)
    assert r2.returncode == 2 and "--resume" in r2.stderr and r2.stderr.count("\n") == 1


def test_corrupt_checkpoint_is_one_line_before_any_task(base: Path, tmp_path: Path) -> None:
    """The checkpoint is verified once, where the sweep starts (tasks then trust its RAM):
    a changed byte of guest RAM is one error line, and no table is written."""
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    ram = bad / "ram" / "0.bin"
    with open(ram, "r+b") as f:
        f.seek(0x100000)  # the guest's code: a page the checkpoint stores
        b = f.read(1)
        f.seek(0x100000)
        f.write(bytes([b[0] ^ 0xFF]))
    p = tmp_path / "s.toml"
    p.write_text(f'[base]\ncheckpoint = "{bad}"\n[grid]\n"param.n" = [1, 2]\n')
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-I", "-m", "kvmfw.cli", "sweep", str(p), "--out",
                        str(out), "--workers", "1"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 9, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("kvmfw:")]
    assert len(err) == 1 and err[0].startswith("kvmfw: error: "), r.stderr
    assert "checksum mismatch" in err[0]
    assert not out.exists()  # nothing started: no cluster, no table


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("objcopy") is None,
                    reason="needs GNU as, ld and objcopy (binutils)")
def test_committed_square_is_what_its_source_builds(tmp_path: Path) -> None:
    work = tmp_path / "examples"
    shutil.copytree(EXAMPLE, work / "sweep")
    shutil.copytree(ROOT / "examples" / "guests", work / "guests")
    (work / "sweep" / "square.elf").unlink()
    subprocess.run(["sh", str(work / "sweep" / "build.sh")], check=True, capture_output=True)

    def loaded(p: Path) -> bytes:  # ELF layout differs between binutils: compare the image
        out = tmp_path / (p.parent.name + ".bin")
        subprocess.run(["objcopy", "-O", "binary", str(p), str(out)], check=True)
        return out.read_bytes()

    assert loaded(work / "sweep" / "square.elf") == loaded(EXAMPLE / "square.elf"), \
        "examples/sweep/square.elf is stale: run examples/sweep/build.sh"


def test_fresh_boots_vary_machine_keys(client: Any, tmp_path: Path) -> None:
    """boot = "fresh": no checkpoint; every variant boots the kernel, so machine keys
    (memory here) may vary next to the guest's parameter."""
    s = {"base": {"kernel": str(EXAMPLE / "square.elf"), "boot": "fresh"},
         "grid": {"memory": ["16M", "32M"], "param.n": [5, 7]},
         "collect": {"console": {"square": r"square=(\d+)"}, "files": ["result.txt"]},
         "limits": {"timeout": 120}}
    df = kvmfw.sweep.run(s, out=tmp_path / "out", client=client, progress=False)
    assert len(df) == 4 and set(df["memory"]) == {"16M", "32M"}
    for _, row in df.iterrows():
        n = int(row["param.n"])
        assert row["status"] == "ok" and row["console.square"] == str(n * n), row.to_dict()


def test_failing_variants_are_rows_and_the_sweep_goes_on(client: Any, base: Path,
                                                         tmp_path: Path) -> None:
    """A guest failure (no parameter file: the guest's fail(1)), a simulated-tick limit and
    a host timeout are rows with their status; the other variants run."""
    s = spec(base, 2)
    s["variant"] = [{"param.m": 1}, {"param.n": 9, "max_ticks": 1}]
    s["limits"]["ok_status"] = [0]
    df = kvmfw.sweep.run(s, out=tmp_path / "out", client=client, progress=False)
    assert len(df) == 4
    by = {i: r for i, r in df.iterrows()}
    assert by[0]["status"] == by[1]["status"] == "ok"
    assert by[2]["status"] == "failed" and by[2]["exit_status"] == 1
    assert by[3]["end"] == "tick-limit" and pd.isna(by[3]["console.square"])
    # --resume keeps the failed rows; with retry_failed only they run again
    rows: list[dict[str, Any]] = []
    kvmfw.sweep.run(s, out=tmp_path / "out", resume=True, client=client, progress=False,
                    on_row=rows.append)
    assert rows == []
    df = kvmfw.sweep.run(s, out=tmp_path / "out", resume=True, retry_failed=True,
                         client=client, progress=False, on_row=rows.append)
    assert [r["variant"] for r in rows] == [2] and len(df) == 4  # the tick limit is ok
    # hello16 ends in cli; hlt, which the in-kernel irqchip sleeps in: only the host
    # timeout ends it
    hang = {"base": {"kernel": str(ROOT / "examples" / "guests" / "hello16.bin"),
                     "options": {"load_addr": "0x7c00"}, "boot": "fresh"},
            "grid": {"param.x": [1]}, "limits": {"timeout": 1}}
    df = kvmfw.sweep.run(hang, out=tmp_path / "hang", client=client, progress=False)
    assert list(df["status"]) == ["timeout"] and "timeout" in df["reason"][0]


def test_cli_on_an_existing_scheduler(client: Any, base: Path, tmp_path: Path) -> None:
    """`kvmfw sweep --scheduler ADDRESS` sends the tasks to a running cluster."""
    p = tmp_path / "s.toml"
    p.write_text(f'[base]\ncheckpoint = "{base}"\n[grid]\n"param.n" = [2, 3, 4]\n'
                 '[collect]\nconsole = { square = \'square=(\\d+)\' }\n')
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-I", "-m", "kvmfw.cli", "sweep", str(p), "--out",
                        str(out), "--scheduler", client.scheduler.address, "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert list(df["console.square"]) == ["4", "9", "16"]
    pids = set(client.run(os.getpid).values())
    assert set(df["pid"]) <= pids  # run by the cluster's workers
