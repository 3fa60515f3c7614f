"""pytest plugin of the outer guest (guest-run.sh loads it with ``-p pytest_watchdog``).

- A per-test limit, ``KVMFW_TEST_TIMEOUT`` seconds (guest-run.sh scales it by the measured
  speed of the outer guest): when a test overruns it, the console says which test, every
  thread's stack is dumped, the test's child processes (VMMs) are killed and the test fails
  (SIGALRM in the main thread). If the test still has not ended ``KVMFW_TEST_GRACE`` seconds
  later (blocked where no signal reaches it), the session ends here, saying so; run.sh's
  retry runs what is left.
- The bounds follow the outer guest's speed (``measure_speed``: a fixed loop against its time
  in a lightly loaded outer guest, ``KVMFW_L1_CALIBRATION_REF``): guest-run.sh measures it
  first (``python3 pytest_watchdog.py --bounds``), and every session measures again and
  raises the limits it derived (``KVMFW_L1_DERIVED``) if the machine got slower since.
- A time budget (run.sh's ``KVMFW_X86_BUDGET``, here ``KVMFW_L1_DEADLINE``: the uptime
  past which no test starts): later tests are skipped, each saying so, and the session says
  how many. What runs first is what runs only here (``tests/linux``).
- Progress for the host: the test running now goes to ``$KVMFW_L1_OUT/current`` (the
  heartbeat of guest-run.sh reports it), each finished test is appended to
  ``$KVMFW_L1_OUT/done.list`` (``outcome<TAB>nodeid``), each failure's report to
  ``$KVMFW_L1_OUT/failures.log`` and a line on the console at once. A retry (``KVMFW_L1_RETRY=1``)
  deselects the tests already done and counts the failures among them.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

OUT = Path(os.environ.get("KVMFW_L1_OUT", "/opt/kvmfw-out"))
_CONSOLE = os.dup(2)
"""stderr as it was before pytest's capture (``-p`` imports this module before that)."""


def _say(text: str) -> None:
    os.write(_CONSOLE, f"\nKVMFW_L1 {text}\n".encode())


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


TEST_BASE = 300.0
"""Per-test limit at speed 1, s (the slowest Linux test, interactive: a boot plus 3 steps)."""
LINUX_BASE = 60.0
"""Limit of one Linux boot at speed 1, s (boots take 5-15 s on a quiet machine)."""
CALIBRATION_REF = 0.080
"""The loop's time in a lightly loaded outer guest on the reference machine, s (natively
there: 0.016 s; in the outer guest with the machine busy: 0.12-0.41 s)."""


def measure_speed() -> tuple[float, float]:
    """(slowdown against ``CALIBRATION_REF``, at least 1; the loop's median time in s)."""
    ref = float(os.environ.get("KVMFW_L1_CALIBRATION_REF", "") or CALIBRATION_REF)

    def once() -> float:
        t, n = time.perf_counter(), 0
        for i in range(200_000):
            n += i * i
        return time.perf_counter() - t

    median = sorted(once() for _ in range(3))[1]
    return max(1.0, round(median / ref, 1)), median


class TestTimeout(Exception):
    """The test ran past its limit."""


class Watchdog:
    def __init__(self, limit: float, grace: float) -> None:
        self.limit, self.grace = limit, grace
        self.nodeid: str | None = None
        self.started = 0.0
        self.fired = False
        self._cond = threading.Condition()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._loop, name="kvmfw-test-watchdog",
                                        daemon=True)
        self._thread.start()

    def start(self, nodeid: str) -> None:
        with self._cond:
            self.nodeid, self.started, self.fired = nodeid, time.monotonic(), False
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self.nodeid = None
            self._cond.notify()

    def _loop(self) -> None:
        with self._cond:
            while True:
                if self.nodeid is None:
                    self._cond.wait()
                    continue
                nodeid, started, fired = self.nodeid, self.started, self.fired
                due = started + self.limit + (self.grace if fired else 0)
                left = due - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                if not fired:
                    self.fired = True
                    self._expire(nodeid)
                else:
                    self._give_up(nodeid)

    def _expire(self, nodeid: str) -> None:
        _say(f"TEST TIMEOUT {nodeid}: still running after {self.limit:.0f} s "
             f"(KVMFW_TEST_TIMEOUT); stacks:")
        faulthandler.dump_traceback(_CONSOLE, all_threads=True)
        # the test first (it is still blocked, e.g. waiting for its VMM), then its children
        if self._main is not None:
            signal.pthread_kill(self._main, signal.SIGALRM)
        for pid in _descendants(os.getpid()):
            comm = _comm(pid)  # (before the kill: a reaped process has no /proc entry)
            try:
                os.kill(pid, signal.SIGKILL)
                _say(f"killed pid {pid} ({comm}) of {nodeid}")
            except OSError:
                pass

    def _give_up(self, nodeid: str) -> None:
        _say(f"TEST STUCK {nodeid}: did not end {self.grace:.0f} s after its timeout; "
             "ending this pytest session (run.sh retries what is left)")
        _record("stuck", nodeid)
        faulthandler.dump_traceback(_CONSOLE, all_threads=True)
        os._exit(3)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _write_through(path: Path, text: str) -> None:
    """Write and fsync: the share is 9p with cache=loose, where the host would otherwise
    see the data only at writeback."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _record(outcome: str, nodeid: str) -> None:
    with open(OUT / "done.list", "a") as f:
        f.write(f"{outcome}\t{nodeid}\n")
        f.flush()
        os.fsync(f.fileno())


def _done() -> dict[str, str]:
    done: dict[str, str] = {}
    try:
        for line in (OUT / "done.list").read_text().splitlines():
            outcome, _, nodeid = line.partition("\t")
            if nodeid:
                done[nodeid] = outcome
    except OSError:
        pass
    return done


_dog: Watchdog | None = None
_earlier_failures = 0
_done_earlier = 0


_in_phase = False
"""True while the test's setup, call or teardown runs: only there does a timeout raise (not
in pytest's own reporting, which a late signal would turn into an INTERNALERROR)."""


def _on_alarm(signum: int, frame: Any) -> None:
    dog = _dog
    if _in_phase and dog is not None and dog.fired and dog.nodeid is not None:
        raise TestTimeout(f"{dog.nodeid} ran past its limit of {dog.limit:.0f} s "
                          "(KVMFW_TEST_TIMEOUT, scaled by the outer guest's measured speed)")


def _rescale() -> None:
    """Raise the derived limits if the outer guest is slower now than when they were set."""
    derived = os.environ.get("KVMFW_L1_DERIVED", "")
    if not derived:
        return
    speed, median = measure_speed()
    if speed <= float(os.environ.get("KVMFW_L1_SPEED", "1") or 1):
        return
    os.environ["KVMFW_L1_SPEED"] = str(speed)
    if "test" in derived:
        os.environ["KVMFW_TEST_TIMEOUT"] = str(round(TEST_BASE * speed))
    if "linux" in derived:
        os.environ["KVMFW_LINUX_TIMEOUT"] = str(round(LINUX_BASE * speed))
    _say(f"slower than before this session: speed x{speed} (calibration loop {median:.3f} s), "
         f"per-test limit {os.environ.get('KVMFW_TEST_TIMEOUT')} s, Linux boot limit "
         f"{os.environ.get('KVMFW_LINUX_TIMEOUT')} s")


class Budget:
    """Skips every test that would start after ``deadline`` (seconds of uptime)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.skipped = 0

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if time.clock_gettime(time.CLOCK_BOOTTIME) > self.deadline:  # /proc/uptime's clock
            self.skipped += 1
            pytest.skip(f"not run: the nested environment's time budget (KVMFW_X86_BUDGET) "
                        f"was spent at uptime {self.deadline:.0f}s; the host's own KVM ran "
                        "the core, x86 and devices suites")

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.skipped:
            _say(f"time budget spent: {self.skipped} tests of this session not run "
                 "(skipped, each saying why)")


def pytest_configure(config: pytest.Config) -> None:
    global _dog
    deadline = os.environ.get("KVMFW_L1_DEADLINE", "")
    if deadline and not config.pluginmanager.has_plugin("kvmfw-budget"):
        config.pluginmanager.register(Budget(float(deadline)), "kvmfw-budget")
    _rescale()
    limit = float(os.environ.get("KVMFW_TEST_TIMEOUT", "0") or 0)
    if limit > 0 and _dog is None:
        _dog = Watchdog(limit, float(os.environ.get("KVMFW_TEST_GRACE", "60")))
        signal.signal(signal.SIGALRM, _on_alarm)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """A retry runs only what the frozen boot left; failures among the rest still count."""
    global _earlier_failures, _done_earlier
    if os.environ.get("KVMFW_L1_RETRY") != "1":
        return
    done = _done()
    keep = [i for i in items if i.nodeid not in done]
    gone = [i for i in items if i.nodeid in done]
    _earlier_failures = sum(done[i.nodeid] != "passed" for i in gone)
    _done_earlier = len(gone)
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = keep
        _say(f"retry: {len(gone)} tests done in the earlier boot "
             f"({_earlier_failures} not passed), {len(keep)} left")


_failed_now = False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    global _failed_now
    _failed_now = False
    try:
        _write_through(OUT / "current", item.nodeid + "\n")
    except OSError:
        pass
    if _dog is not None:
        _dog.start(item.nodeid)
    try:
        yield
    finally:
        if _dog is not None:
            _dog.stop()
        _record("failed" if _failed_now else "passed", item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    yield from _phase()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    yield from _phase()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    yield from _phase()


def _phase() -> Any:
    global _in_phase
    _in_phase = True
    try:
        yield
    finally:
        _in_phase = False


FAILURE_LOG_LIMIT = 20_000
"""Characters of one failure's report kept in ``failures.log`` (its end: the assertion)."""


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    global _failed_now
    if report.failed:
        _failed_now = True
        # pytest prints failures at the session's end, which a boot killed by run.sh's
        # timeout never reaches: keep each one now, in full, on the share and the console
        text = report.longreprtext[-FAILURE_LOG_LIMIT:]
        try:
            with open(OUT / "failures.log", "a") as f:
                f.write(f"=== {report.nodeid} ({report.when})\n{text}\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            pass
        crash = getattr(report.longrepr, "reprcrash", None)
        why = (crash.message if crash is not None else text.strip()).splitlines() or ["?"]
        _say(f"FAILED {report.nodeid} ({report.when}): {why[0][:300]} "
             "(the whole report: logs/failures.log on the host)")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("KVMFW_L1_RETRY") != "1":
        return
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and _done_earlier:
        session.exitstatus = pytest.ExitCode.OK  # everything ran in the earlier boot
    if _earlier_failures and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED



if __name__ == "__main__":  # guest-run.sh: python3 pytest_watchdog.py --bounds
    spd, med = measure_speed()
    print(f"{spd} {med:.3f} {round(TEST_BASE * spd)} {round(LINUX_BASE * spd)}")
