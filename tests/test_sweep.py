"""kvmfw.sweep without a guest: the spec's checks (a bad spec is one line before any task
starts), the variants it expands to, and the results table's journal (resume, torn lines).
Sweeps of real guests on a LocalCluster: plugins/x86/tests/test_sweep_x86.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvmfw.errors import ConfigError
from kvmfw.sweep import spec as sp


def kvmfw(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-m", "kvmfw.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "ck"
    d.mkdir()
    (d / "manifest.json").write_text("{}")  # the spec checks only that it is one
    return d


def parse(text: str, tmp_path: Path) -> sp.SweepSpec:
    p = tmp_path / "s.toml"
    p.write_text(text)
    return sp.load(p)


def test_grid_variants_and_columns(tmp_path: Path, ckpt: Path) -> None:
    s = parse(f'''
[base]
checkpoint = "{ckpt.name}"
[grid]
"param.n" = [1, 2, 3]
timeout = [5, 10]
[[variant]]
"param.n" = 99
[collect]
stats = ["system.cpu0.vm_exits"]
console = {{ v = 'v=(\\d+)' }}
files = ["out.txt"]
[limits]
repetitions = 2
''', tmp_path)
    assert len(s.variants) == (3 * 2 + 1) * 2
    assert s.base["checkpoint"] == str(ckpt.resolve())
    assert s.variants[0].params == {"param.n": 1, "timeout": 5}
    assert s.variants[-1].params == {"param.n": 99} and s.variants[-1].rep == 1
    assert len({v.key for v in s.variants}) == len(s.variants)
    # keys are stable: the same spec names its variants the same way (what --resume needs)
    assert [v.key for v in parse(s.path.read_text(), tmp_path).variants] == \
        [v.key for v in s.variants]  # type: ignore[union-attr]
    cols = s.columns()
    for c in ("variant", "rep", "param.n", "timeout", "status", "exit_status", "error",
              "stats.system.cpu0.vm_exits", "console.v", "file.out.txt", "host", "pid"):
        assert c in cols


@pytest.mark.parametrize(("body", "msg"), [
    ('[base]\ncheckpoint = "CK"\n[grid]\nbogus = [1]', "unknown option 'bogus'"),
    ('[base]\ncheckpoint = "CK"\n[grid]\n', "[grid] is empty"),
    ('[base]\ncheckpoint = "CK"\n[grid]\n"param.n" = []', "non-empty list"),
    ('[base]\ncheckpoint = "CK"\n', "no variants"),
    ('[base]\ncheckpoint = "nope"\n[grid]\n"param.n" = [1]', "is not a checkpoint"),
    ('[base]\ncheckpoint = "CK"\n[grid]\nmemory = ["64M"]', "fixed by the checkpoint"),
    ('[base]\ncheckpoint = "CK"\n[grid]\nconsole = ["none"]', "set by the sweep itself"),
    ('[base]\ncheckpoint = "CK"\n[grid]\n"param.../x" = [1]', "written to a file"),
    ('[base]\ncheckpoint = "CK"\n[grid]\ntimeout = [-1]', "must be a positive number"),
    ('[base]\nkernel = "nokernel.elf"\n[grid]\n"param.n" = [1]', "does not exist"),
    ('[base]\n[grid]\n"param.n" = [1]', "needs checkpoint = DIR or kernel"),
    ('[base]\ncheckpoint = "CK"\n[grid]\n"param.n" = [1]\n[collect]\nconsole = {a="("}',
     "bad regular expression"),
    ('[base]\ncheckpoint = "CK"\n[grid]\n"param.n" = [1]\n[limits]\nrepetitions = 0',
     "repetitions"),
    ('[base]\ncheckpoint = "CK"\n[grid]\n"param.n" = [1, 1]', "appears twice"),
    ('[base]\ncheckpoint = "CK"\n[grid]\n"param.n" = [1]\n[extra]\n', "unknown section"),
    ('[base]\ncheckpoint = "CK"\n[grid]\n"param.a" = [0,1,2,3,4,5,6,7,8,9]\n'
     '"param.b" = [0,1,2,3,4,5,6,7,8,9]\n"param.c" = [0,1,2,3,4,5,6,7,8,9]\n'
     '"param.d" = [0,1,2,3,4,5,6,7,8,9]\n"param.e" = [0,1,2,3,4,5,6,7,8,9]\n'
     '"param.f" = [0,1,2,3,4,5,6,7,8,9]\n"param.g" = [0,1]', "more than 1000000"),
    ("[base\n", "not valid TOML"),
])
def test_bad_spec_is_one_line_before_any_task(tmp_path: Path, ckpt: Path, body: str,
                                              msg: str) -> None:
    p = tmp_path / "s.toml"
    p.write_text(body.replace('"CK"', f'"{ckpt.name}"'))
    with pytest.raises(ConfigError) as ei:
        sp.load(p)
    assert msg in str(ei.value) and "\n" not in str(ei.value)
    out = tmp_path / "out"
    r = kvmfw("sweep", str(p), "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("kvmfw: error: "), r.stderr
    assert msg in r.stderr
    assert not out.exists()  # nothing started: no cluster, no table


def test_missing_spec_file(tmp_path: Path) -> None:
    r = kvmfw("sweep", str(tmp_path / "none.toml"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not exist" in r.stderr and r.stderr.count("\n") == 1


def test_retry_failed_needs_resume(tmp_path: Path) -> None:
    r = kvmfw("sweep", str(tmp_path / "none.toml"), "--out", str(tmp_path / "o"),
              "--retry-failed")
    assert r.returncode == 2 and "--retry-failed needs --resume" in r.stderr
    assert r.stderr.count("\n") == 1


def test_journal_resume_and_torn_line(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason="the results table needs the sweep extra "
                        "(pip install 'kvmfw[sweep]')")
    pd = pytest.importorskip("pandas", reason="the results table needs the sweep extra")
    from kvmfw.sweep.results import CSV, JOURNAL, PARQUET, ResultsWriter, read_journal

    cols = ["variant", "rep", "key", "param.n", "status"]
    w = ResultsWriter(tmp_path, cols)
    w.add({"variant": 0, "rep": 0, "key": "a", "param.n": 1, "status": "ok"})
    w.add({"variant": 1, "rep": 0, "key": "b", "param.n": 2, "status": "error"})
    # a crash here: the CSV and the journal already hold both rows
    assert len(pd.read_csv(tmp_path / CSV)) == 2
    with open(tmp_path / JOURNAL, "a") as f:
        f.write('{"variant": 2, "rep": 0, "key": "c", "par')  # torn by the crash
    rows = read_journal(tmp_path)
    assert sorted(rows) == ["a", "b"]
    w.close()
    # resumed: the retried row replaces the old one; nothing is duplicated
    w2 = ResultsWriter(tmp_path, cols, rows)
    w2.add({"variant": 1, "rep": 0, "key": "b", "param.n": 2, "status": "ok"})
    w2.close()
    df = pd.read_parquet(tmp_path / PARQUET)
    assert list(df["key"]) == ["a", "b"] and list(df["status"]) == ["ok", "ok"]
    assert len(pd.read_csv(tmp_path / CSV)) == 3  # the CSV is a log; the journal dedups
    assert json.loads((tmp_path / JOURNAL).read_text().splitlines()[-1])["status"] == "ok"


def test_mixed_value_types_still_make_a_parquet_table(tmp_path: Path) -> None:
    """A parameter given as a number in one variant and text in another (or a stat that is
    missing in some rows) must not stop the table being written."""
    pytest.importorskip("pyarrow", reason="the results table needs the sweep extra")
    pd = pytest.importorskip("pandas", reason="the results table needs the sweep extra")
    from kvmfw.sweep.results import PARQUET, ResultsWriter

    w = ResultsWriter(tmp_path, ["variant", "rep", "key", "param.x", "stats.s"])
    w.add({"variant": 0, "rep": 0, "key": "a", "param.x": 1, "stats.s": 3})
    w.add({"variant": 1, "rep": 0, "key": "b", "param.x": "one", "stats.s": None})
    w.add({"variant": 2, "rep": 0, "key": "c", "param.x": True, "stats.s": 2.5})
    w.close()
    df = pd.read_parquet(tmp_path / PARQUET)
    assert list(df["param.x"]) == ["1", "one", "True"]
    assert list(df["stats.s"])[0] == 3 and pd.isna(list(df["stats.s"])[1])
