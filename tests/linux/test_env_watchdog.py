"""The nested environment's own bounds, tested on any host (no Linux guest needed): the
per-test limit of the outer guest (envs/x86-linux-kvm/pytest_watchdog.py), the retry that
runs only what a frozen boot left, and a VMM that ignores its limit being killed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from linuxguest import _reap, _wait

ENV = Path(__file__).resolve().parents[2] / "envs" / "x86-linux-kvm"

SUITE = '''
import subprocess, time
def test_first(): pass
def test_hangs(): time.sleep(600)
def test_hangs_in_a_child(): subprocess.Popen(["sleep", "600"]).wait()
def test_fails(): assert False
def test_last(): pass
'''


def _clean_env() -> dict[str, str]:
    """This process's environment without the outer guest's own watchdog settings (these
    tests also run inside it, maybe in a retry boot) and pytest options."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("KVMFW_L1_", "KVMFW_TEST_", "PYTEST_"))}


def _pytest(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_suite.py").write_text(SUITE)
    (tmp_path / "out").mkdir(exist_ok=True)
    full = {**_clean_env(), "PYTHONPATH": str(ENV), "KVMFW_L1_OUT": str(tmp_path / "out"),
            "KVMFW_TEST_TIMEOUT": "2", **env}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pytest_watchdog",
                           "-p", "no:cacheprovider", "test_suite.py"], cwd=tmp_path, env=full,
                          capture_output=True, text=True, timeout=120)


def test_a_test_past_its_limit_fails_naming_itself_and_its_vmm_is_killed(tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = _pytest(tmp_path)
    assert time.monotonic() - t0 < 300  # two 2 s limits, not two 600 s sleeps
    assert "KVMFW_L1 TEST TIMEOUT test_suite.py::test_hangs:" in r.stderr
    assert "(sleep) of test_suite.py::test_hangs_in_a_child" in r.stderr  # killed
    assert "2 passed" in r.stdout and "3 failed" in r.stdout, r.stdout
    done = (tmp_path / "out" / "done.list").read_text().splitlines()
    assert [line.split("\t")[0] for line in done] == ["passed", "failed", "failed", "failed",
                                                     "passed"]
    # each failure's report is kept as it happens (a boot killed later would lose pytest's
    # end-of-session summary), with a line on the console
    log = (tmp_path / "out" / "failures.log").read_text()
    assert log.count("=== test_suite.py::") == 3 and "assert False" in log
    assert "KVMFW_L1 FAILED test_suite.py::test_fails (call): assert False" in r.stderr


def test_a_retry_runs_only_the_tests_a_frozen_boot_left(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "done.list").write_text("passed\ttest_suite.py::test_first\n"
                                   "failed\ttest_suite.py::test_hangs\n"
                                   "failed\ttest_suite.py::test_hangs_in_a_child\n")
    r = _pytest(tmp_path, KVMFW_L1_RETRY="1")
    assert "3 tests done in the earlier boot (2 not passed), 2 left" in r.stderr
    assert "1 failed, 1 passed, 3 deselected" in r.stdout, r.stdout
    assert r.returncode == 1


def test_a_retry_with_nothing_left_keeps_the_earlier_failures(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    names = ["first", "hangs", "hangs_in_a_child", "fails", "last"]
    (out / "done.list").write_text("".join(f"passed\ttest_suite.py::test_{n}\n" for n in names))
    assert _pytest(tmp_path, KVMFW_L1_RETRY="1").returncode == 0
    (out / "done.list").write_text("failed\ttest_suite.py::test_first\n" + "".join(
        f"passed\ttest_suite.py::test_{n}\n" for n in names[1:]))
    assert _pytest(tmp_path, KVMFW_L1_RETRY="1").returncode == 1


def test_a_vmm_past_its_deadline_is_killed_and_reaped() -> None:
    p = subprocess.Popen(["sleep", "600"])
    t0 = time.monotonic()
    rc, _ = _wait(p.pid, time.monotonic() + 0.5)
    assert rc is None and time.monotonic() - t0 < 30
    p.returncode = -9


def test_reaping_a_vmm_that_already_exited_is_not_an_error() -> None:
    p = subprocess.Popen(["true"])
    time.sleep(0.5)
    assert _reap(p.pid)[0] is None
    p.returncode = 0


def test_a_test_no_signal_can_end_ends_its_session_naming_itself(tmp_path: Path) -> None:
    (tmp_path / "test_stuck.py").write_text(
        "import signal, time\n"
        "def test_stuck():\n"
        "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n"
        "    time.sleep(600)\n")
    (tmp_path / "out").mkdir()
    env = {**_clean_env(), "PYTHONPATH": str(ENV), "KVMFW_L1_OUT": str(tmp_path / "out"),
           "KVMFW_TEST_TIMEOUT": "1", "KVMFW_TEST_GRACE": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pytest_watchdog",
                        "-p", "no:cacheprovider", "test_stuck.py"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3
    assert "KVMFW_L1 TEST STUCK test_stuck.py::test_stuck: did not end 1 s after" in r.stderr
    assert (tmp_path / "out" / "done.list").read_text() == "stuck\ttest_stuck.py::test_stuck\n"


def test_a_session_on_a_slower_machine_raises_the_derived_limits(tmp_path: Path) -> None:
    """The limits follow the outer guest's speed when each session starts, not only when
    guest-run.sh measured it (a machine that got busier gets longer limits, never shorter)."""
    (tmp_path / "test_limits.py").write_text(
        "import os\n"
        "def test_limits():\n"
        "    e = os.environ\n"
        "    print('LIMITS', e['KVMFW_TEST_TIMEOUT'], e['KVMFW_LINUX_TIMEOUT'])\n")
    (tmp_path / "out").mkdir()
    env = {**_clean_env(), "PYTHONPATH": str(ENV), "KVMFW_L1_OUT": str(tmp_path / "out"),
           "KVMFW_L1_SPEED": "1.0", "KVMFW_TEST_TIMEOUT": "300", "KVMFW_LINUX_TIMEOUT": "60",
           "KVMFW_L1_DERIVED": "test,linux", "KVMFW_L1_CALIBRATION_REF": "1e-6"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "pytest_watchdog",
                        "-p", "no:cacheprovider", "test_limits.py"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert "slower than before this session" in r.stderr, r.stderr
    test_limit, linux_limit = map(int, r.stdout.split("LIMITS ")[1].split()[:2])
    assert test_limit > 300 and linux_limit > 60 and test_limit == 5 * linux_limit
    env.update(KVMFW_L1_CALIBRATION_REF="1e6")  # a faster machine: the limits stay
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "pytest_watchdog",
                        "-p", "no:cacheprovider", "test_limits.py"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert "LIMITS 300 60" in r.stdout


def test_past_the_time_budget_no_test_starts_and_each_says_why(tmp_path: Path) -> None:
    """run.sh's KVMFW_X86_BUDGET, as the boot's deadline: what would start after it is
    skipped (not failed, and not run again by a retry), and the session says how many."""
    r = _pytest(tmp_path, KVMFW_L1_DEADLINE="1")  # any uptime is past 1 s
    assert r.returncode == 0 and "5 skipped" in r.stdout, r.stdout + r.stderr
    assert "KVMFW_L1 time budget spent: 5 tests of this session not run" in r.stderr
    done = (tmp_path / "out" / "done.list").read_text().splitlines()
    assert len(done) == 5 and all(line.startswith("passed\t") for line in done)
    (tmp_path / "out" / "done.list").unlink()
    r = _pytest(tmp_path, KVMFW_L1_DEADLINE=str(10 ** 9), KVMFW_TEST_TIMEOUT="2")
    assert "2 passed" in r.stdout and "3 failed" in r.stdout and "time budget spent" not in r.stderr
