"""kvmfw.debug: loggers that import logging only when something is logged, and debug flags.

The checks of "logging not loaded yet" run in a fresh interpreter (pytest itself has
imported logging here)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from kvmfw.debug import DEBUG, LazyLogger, enable, get_logger
from kvmfw.errors import ConfigError


def fresh(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60)


def test_nothing_logged_below_warning_imports_nothing() -> None:
    r = fresh("""
        import sys
        from kvmfw.debug import DEBUG, get_logger
        log = get_logger("kvmfw.test")
        log.debug("a %s", "debug record")
        log.info("an info record")
        assert not log.isEnabledFor(DEBUG) and log.isEnabledFor(30)
        print("logging" in sys.modules, "traceback" in sys.modules)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]
    assert r.stderr == ""


def test_warnings_and_errors_read_as_unconfigured_logging_writes_them() -> None:
    code = """
        import sys
        {make}
        log.warning("kvmfw: warning: %d is %s", 3, "odd")
        log.error("plain 100%")
        log.info("dropped")
        print("logging" in sys.modules)
    """
    lazy = fresh(code.format(make="from kvmfw.debug import get_logger; "
                                  "log = get_logger('kvmfw.test')"))
    real = fresh(code.format(make="import logging; log = logging.getLogger('kvmfw.test')"))
    assert lazy.returncode == real.returncode == 0, lazy.stderr + real.stderr
    assert lazy.stderr == real.stderr == "kvmfw: warning: 3 is odd\nplain 100%\n"
    assert lazy.stdout.split() == ["False"]


def test_once_logging_is_configured_records_go_through_it(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    log = get_logger("kvmfw.test.configured")
    assert isinstance(log, LazyLogger)
    with caplog.at_level(logging.DEBUG, logger="kvmfw.test.configured"):
        log.debug("d %d", 1)  # (the first call: through LazyLogger.debug)
        assert log.isEnabledFor(DEBUG)
        log.info("i")
        log.warning("w")
        log.error("e", exc_info=False)
        log.log(logging.INFO, "via log")
        assert log.getEffectiveLevel() == logging.DEBUG  # (anything else: the real logger's)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("DEBUG", "d 1"), ("INFO", "i"), ("WARNING", "w"), ("ERROR", "e"), ("INFO", "via log")]
    assert log.name == "kvmfw.test.configured"
    assert {r.filename for r in caplog.records} == {"test_debug.py"}  # (the caller's line)


def test_debug_flags_turn_on_the_loggers_kvmfw_logs_through() -> None:
    import io

    out = io.StringIO()
    try:
        assert enable("Bus", stream=out) == ["kvmfw.bus"]
        get_logger("kvmfw.bus").debug("claimed %#x", 0x3F8)
        assert out.getvalue() == "kvmfw.bus: claimed 0x3f8\n"
    finally:
        real = logging.getLogger("kvmfw.bus")
        real.setLevel(logging.NOTSET)
        real.handlers.clear()
    with pytest.raises(ConfigError, match="unknown debug flag 'Nope'"):
        enable("Nope")


def test_a_debug_flag_may_name_any_kvmfw_logger() -> None:
    """A plugin's own logger (``kvmfw.x86.vmlinux``) is reached by its name; names outside
    kvmfw's tree, or not dotted identifiers, are refused as unknown flags."""
    import io

    out = io.StringIO()
    try:
        assert enable("Bus,kvmfw.plugin.thing", stream=out) == ["kvmfw.bus", "kvmfw.plugin.thing"]
        get_logger("kvmfw.plugin.thing").info("layout %d", 7)
        assert out.getvalue() == "kvmfw.plugin.thing: layout 7\n"
    finally:
        for name in ("kvmfw.bus", "kvmfw.plugin.thing"):
            real = logging.getLogger(name)
            real.setLevel(logging.NOTSET)
            real.handlers.clear()
    for bad in ("root", "kvmfw.", "kvmfw..x", "kvmfw.x-y", "other.kvmfw"):
        with pytest.raises(ConfigError, match="unknown debug flag"):
            enable(bad)
