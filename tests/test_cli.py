"""The kvmfw command as a user runs it: output, exit status, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from kvmtest import needs_kvm

from kvmfw.cli import parse_size
from kvmfw.errors import ConfigError


def kvmfw(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    # run outside the source tree, so the installed kvmfw (with its compiled module) loads
    return subprocess.run([sys.executable, "-m", "kvmfw.cli", *args], capture_output=True,
                          text=True, check=check, timeout=120, cwd="/")


def test_parse_size() -> None:
    assert parse_size("256M") == 256 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("4096B") == 4096
    assert parse_size("0x10M") == 16 << 20
    assert parse_size("64KiB") == 64 << 10
    with pytest.raises(ConfigError, match="not a size"):
        parse_size("lots")


@needs_kvm
def test_info_lists_api_caps_limits_and_perf() -> None:
    r = kvmfw("info")
    assert r.returncode == 0
    assert "api_version          12" in r.stdout
    assert "capabilities:" in r.stdout and "USER_MEMORY" in r.stdout
    assert "perf " in r.stdout
    data = json.loads(kvmfw("info", "--json").stdout)
    assert data["api_version"] == 12 and data["capabilities"]["USER_MEMORY"] == 1
    assert data["max_vcpus"] >= 1 and data["memory_slots"] >= 32
    assert isinstance(data["perf"]["available"], bool) and data["perf"]["reason"]


@needs_kvm
def test_info_says_whether_perf_counts_guest_instructions() -> None:
    """Issue 17: the instruction counter is probed on its own (an emulated PMU may count
    cycles only); the arm64 guest features are listed on arm64 hosts only."""
    import platform
    data = json.loads(kvmfw("info", "--json").stdout)
    insns = data["perf"]["instructions"]
    assert isinstance(insns["available"], bool) and insns["reason"]
    assert "perf instructions" in kvmfw("info").stdout
    if platform.machine() == "x86_64":
        assert data["guest_features"] == {}
    from kvmfw.doctor import guest_features
    f = guest_features({"ARM_EL1_32BIT": 0, "ARM_PMU_V3": 1}, "armv8")
    assert f["aarch32 guests"][0] is False and "AArch32 at EL1" in f["aarch32 guests"][1]
    assert f["guest pmu"][0] is True


def test_info_without_kvm_is_one_line_with_a_status(tmp_path: Path) -> None:
    r = kvmfw("info", "--kvm", str(tmp_path / "nope"))
    assert r.returncode == 3
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("kvmfw: error: cannot open")


def test_list_plugins_table() -> None:
    r = kvmfw("list-plugins")
    assert r.returncode == 0
    assert "host architecture:" in r.stdout


def test_bad_config_file_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("memory = \n")
    r = kvmfw("run", "--config", str(cfg))
    assert r.returncode == 2 and "is not valid TOML" in r.stderr and "Traceback" not in r.stderr
    cfg.write_text('mem = "1G"\n')
    r = kvmfw("run", "--config", str(cfg))
    assert r.returncode == 2 and "unknown key(s) mem" in r.stderr


def test_unknown_debug_flag_is_one_line() -> None:
    r = kvmfw("run", "--debug-flags", "Nope", "--no-summary")
    assert r.returncode == 2 and "unknown debug flag 'Nope'" in r.stderr


def test_missing_kernel_and_initrd_are_image_errors(tmp_path: Path) -> None:
    r = kvmfw("run", "--initrd", str(tmp_path / "none.img"))
    assert r.returncode == 7 and "initrd" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_help_flags_lists_debug_flags() -> None:
    r = kvmfw("run", "--help-flags")
    assert r.returncode == 0 and "KvmIO" in r.stdout and "KvmAll" in r.stdout


def one_line_error(r: subprocess.CompletedProcess[str], status: int = 2) -> str:
    """The run ended with ``status`` and exactly one ``kvmfw: error:`` line (no traceback,
    no "internal error ... this is a kvmfw bug")."""
    assert r.returncode == status, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("kvmfw: error: "), r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    return r.stderr


@pytest.mark.parametrize(("args", "msg"), [
    (["--max-ticks", "-5"], "--max-ticks -5: must be between 1 and"),
    (["--host-factor", "0"], "--host-factor 0: must be between 1e-06 and 1e+06"),
    (["--host-factor", "-1"], "--host-factor -1: must be between"),
    (["--timeout", "0"], "--timeout 0: must be a positive number of seconds"),
    (["--console", "file:/proc/version"], "kernel interface file, not a log"),
    (["--pseudo-op-dir", "/nonexistent"], "--pseudo-op-dir /nonexistent is not a directory"),
    (["--cpus", "two"], "--cpus must be a whole number"),
    (["--memory", "lots"], "--memory: not a size"),
])
def test_bad_values_are_refused_before_the_run(args: list[str], msg: str) -> None:
    # each was an internal error, or accepted silently, on the landed code
    r = kvmfw("run", "--console", "none", *args)
    assert msg in one_line_error(r)
    assert "status 0" not in r.stderr


def test_toml_timeout_that_is_not_a_number_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('timeout = "ten"\nconsole = "none"\n')
    r = kvmfw("run", "--config", str(cfg))
    assert f"timeout in {cfg} must be a number of seconds, not 'ten'" in one_line_error(r)
    assert "Thread" not in r.stderr


def test_unwritable_stats_path_is_reported_before_the_guest_runs(tmp_path: Path) -> None:
    r = kvmfw("run", "--stats", str(tmp_path / "no" / "such" / "dir" / "s.json"))
    assert "does not exist (create it first)" in one_line_error(r)
    assert r.stdout == ""  # the guest never ran (the landed code ran it, then complained)
    r = kvmfw("run", "--stats", str(tmp_path))
    assert "is a directory" in one_line_error(r)


def test_click_usage_errors_are_one_line_too() -> None:
    r = kvmfw("run", "--unclaimed", "maybe")
    assert "'maybe' is not one of 'ignore', 'fatal'" in one_line_error(r)
    assert "(see kvmfw run --help)" in r.stderr
    assert "No such option '--nosuch'" in one_line_error(kvmfw("run", "--nosuch"))


@needs_kvm
def test_info_names_the_vcpu_limit_run_enforces() -> None:
    data = json.loads(kvmfw("info", "--json").stdout)
    assert 1 <= data["guest_vcpu_limit"] <= min(data["max_vcpus"], data["max_vcpu_id"])
    assert data["guest_vcpu_limit_why"]
