"""The ``kvmfw`` command: ``run``, ``list-plugins``, ``info``, ``doctor``, ``sweep`` and the
commands plugins add.

Every error reaches the user as one line (``kvmfw: error: ...``) with a distinct exit
status per cause, plus a register dump for guest errors; never a traceback (set
``KVMFW_TRACEBACK=1`` to see one when reporting a bug).

Layout: this module is the CLI's entry point and the error reporting (the console script
enters through :mod:`kvmfw.entry`, which pauses the garbage collector while the CLI
starts); :mod:`kvmfw.cli.run` holds
``kvmfw run`` (its options, their parser and the run) without click, so that a plain
``kvmfw run ...`` never imports click; :mod:`kvmfw.cli.commands` is the click application
(every other command, ``--help``, and the command lines :func:`kvmfw.cli.run.parse`
leaves to click).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any

from kvmfw.cli import run
from kvmfw.cli.run import echo_err
from kvmfw.config import parse_size as parse_size  # re-exported: the CLI's size syntax
from kvmfw.entry import resume as resume_gc
from kvmfw.errors import GuestError, KvmfwError

EXIT_INTERNAL = 70


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning every error into one line and an exit status.

    As the program itself (the ``kvmfw`` script or ``python -m kvmfw.cli``, ``argv`` None,
    no tracer or profiler attached) it ends the process once the command is done: atexit
    handlers run (logging's flush among them), stdout and stderr are flushed, then
    ``os._exit``. The interpreter's own teardown, freeing every module and object one by
    one, has nothing left to do for the user and costs a tenth of a second here, a second
    or more on a slow (emulated) host: time between the guest's end and the shell prompt.
    Called any other way it raises ``SystemExit`` as usual."""
    code: Any = 0
    try:
        _main(argv)
    except SystemExit as exc:
        if argv is not None or not _is_the_program():
            raise
        code = exc.code
    finally:
        _settle_output()
    if argv is None and _is_the_program():
        _exit_process(code)


def _is_the_program() -> bool:
    """Whether this process is ``kvmfw`` itself: ``__main__`` is the console script or this
    module, and nothing (coverage, cProfile, a debugger) traces it and would want to write
    its results after ``main`` returns."""
    if sys.gettrace() is not None or sys.getprofile() is not None:
        return False
    mon = getattr(sys, "monitoring", None)  # (3.12+: coverage may use sys.monitoring)
    if mon is not None and any(mon.get_tool(i) for i in range(6)):
        return False
    main_mod = sys.modules.get("__main__")
    spec = getattr(main_mod, "__spec__", None)
    if spec is not None and spec.name in ("kvmfw.cli", "kvmfw.cli.__main__"):
        return True
    return os.path.basename(str(getattr(main_mod, "__file__", "") or "")) == "kvmfw"


def _exit_process(code: Any) -> None:
    """End the process with ``code`` (a ``SystemExit`` code) without the interpreter's
    teardown, unless a non-daemon thread is still running (the normal exit waits for it)
    or the code is not a status (a message: Python prints it)."""
    status = 0 if code is None else code
    others = [t for t in threading.enumerate()
              if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not isinstance(status, int) or others:
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()  # (what a normal exit runs first: logging.shutdown, coverage, ...)
    _settle_output()
    os._exit(status & 0xFF)  # (what the OS keeps of sys.exit(status) too)


def _settle_output() -> None:
    """Flush stdout and stderr now; one that cannot be written any more (a hung-up
    terminal, a closed pipe) is pointed at /dev/null, or the interpreter's own flush at
    exit would fail and replace the exit status with 120."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            with contextlib.suppress(OSError, ValueError):
                fd = os.open(os.devnull, os.O_WRONLY)
                os.dup2(fd, stream.fileno())
                os.close(fd)


def _main(argv: list[str] | None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        opts = run.parse(args[1:]) if args[:1] == ["run"] else None
        if opts is not None:
            run.command(opts)
        else:
            resume_gc()  # (only `kvmfw run` keeps the start-up pause longer: kvmfw.entry)
            from kvmfw.cli.commands import invoke

            invoke(args)
    except KvmfwError as exc:
        if os.environ.get("KVMFW_TRACEBACK"):
            raise
        echo_err(f"error: {exc}")
        if isinstance(exc, GuestError) and exc.dump:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(exc.dump + "\n")
        sys.exit(exc.exit_status)
    except KeyboardInterrupt:
        echo_err("interrupted")
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("KVMFW_TRACEBACK"):
            raise
        echo_err(f"internal error: {type(exc).__name__}: {exc} (this is a kvmfw bug: "
                 "rerun with KVMFW_TRACEBACK=1 and report it)")
        sys.exit(EXIT_INTERNAL)
