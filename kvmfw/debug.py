"""Debug flags (``--debug-flags Kvm,KvmIO``) mapped onto :mod:`logging` loggers, and
:func:`get_logger`, the loggers kvmfw and its plugins log through."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from kvmfw.errors import ConfigError

if TYPE_CHECKING:
    import logging

DEBUG = 10
"""``logging.DEBUG``, for ``log.isEnabledFor(DEBUG)`` without importing :mod:`logging`."""
WARNING = 30
"""``logging.WARNING``: the level a logger has until someone configures logging."""


class LazyLogger:
    """The :class:`logging.Logger` called ``name``, imported when something is logged.

    A run that logs nothing then never imports :mod:`logging`, nor what it imports
    (traceback, linecache, tokenize, textwrap, string): about 5 ms of a 100 ms start-up
    here, and ten times that under an emulated host. While :mod:`logging` is not loaded
    nothing can have configured it, so its defaults hold, without the import: ``debug``
    and ``info`` records are dropped, :meth:`isEnabledFor` says so, and a warning or error
    is written to stderr as the message alone (what :data:`logging.lastResort` does for an
    unconfigured logger). Once :mod:`logging` is loaded, by anyone, the logger's own
    methods are bound here."""

    _BOUND = ("debug", "info", "warning", "error", "exception", "critical", "log",
              "isEnabledFor")

    def __init__(self, name: str) -> None:
        self.name = name

    def _bind(self) -> logging.Logger:
        import logging

        real = logging.getLogger(self.name)
        for m in self._BOUND:  # (instance attributes shadow the methods below from now on)
            self.__dict__[m] = getattr(real, m)
        return real

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if "logging" in sys.modules:
            self._bind().debug(msg, *args, **_from_caller(kwargs))

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if "logging" in sys.modules:
            self._bind().info(msg, *args, **_from_caller(kwargs))

    def warning(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if "logging" in sys.modules or kwargs:  # (exc_info, extra, ...: logging's to format)
            self._bind().warning(msg, *args, **_from_caller(kwargs))
        else:
            _last_resort(msg, args)

    def error(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if "logging" in sys.modules or kwargs:
            self._bind().error(msg, *args, **_from_caller(kwargs))
        else:
            _last_resort(msg, args)

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - logging's name
        if "logging" not in sys.modules:
            return level >= WARNING
        return self._bind().isEnabledFor(level)

    def __getattr__(self, attr: str) -> Any:  # handlers, setLevel, exception, ...
        return getattr(self._bind(), attr)

    def __repr__(self) -> str:
        return f"<LazyLogger {self.name}>"


def _from_caller(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with one more ``stacklevel``: a record's file and line are then the
    caller's, not this module's (only the first record of a logger comes through here)."""
    kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1
    return kwargs


def _last_resort(msg: object, args: tuple[Any, ...]) -> None:
    """A record as unconfigured :mod:`logging` writes it: the message, to stderr."""
    text = str(msg) % args if args else str(msg)
    try:
        sys.stderr.write(text + "\n")
    except (OSError, ValueError, AttributeError):  # (closed or missing stderr: as logging)
        pass


def get_logger(name: str) -> logging.Logger:
    """The logger ``name`` (as :func:`logging.getLogger`), imported on first use."""
    return LazyLogger(name)  # type: ignore[return-value]


FLAGS: dict[str, tuple[str, str]] = {
    "Kvm": ("kvmfw.cpu", "the run loop: entries, exits, state changes"),
    "KvmRun": ("kvmfw.run", "every KVM_RUN with its slice and exit reason"),
    "KvmIO": ("kvmfw.io", "every port IO and MMIO access"),
    "KvmInt": ("kvmfw.int", "interrupt delivery"),
    "KvmContext": ("kvmfw.context", "thread-context syncs"),
    "KvmTimer": ("kvmfw.timer", "the run timer and time accounting"),
    "Bus": ("kvmfw.bus", "bus registrations and unclaimed accesses"),
    "Plugins": ("kvmfw.plugins", "plugin discovery and loading"),
    "Devices": ("kvmfw.device", "device models"),
}
COMPOUND = {"KvmAll": ["Kvm", "KvmRun", "KvmIO", "KvmInt", "KvmContext", "KvmTimer"],
            "All": list(FLAGS)}


def enable(flags: str | list[str], stream: object = None) -> list[str]:
    """Turn on the named flags (comma-separated or a list), or loggers by name (any
    ``kvmfw.``-dotted name: a plugin's own, e.g. ``kvmfw.x86.vmlinux``); returns the
    loggers enabled."""
    names = [f.strip() for f in (flags.split(",") if isinstance(flags, str) else flags)
             if f.strip()]
    expanded: list[str] = []
    for n in names:
        if n in COMPOUND:
            expanded += COMPOUND[n]
        elif n in FLAGS:
            expanded.append(n)
        elif n.startswith("kvmfw.") and all(p.isidentifier() for p in n.split(".")):
            expanded.append(n)  # a logger by name
        else:
            known = ", ".join(list(FLAGS) + list(COMPOUND))
            raise ConfigError(f"unknown debug flag {n!r} (known: {known}, or a logger name "
                              "such as kvmfw.x86.vmlinux)")
    import logging

    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    enabled = []
    for n in expanded:
        name = FLAGS[n][0] if n in FLAGS else n
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        if not logger.handlers:
            logger.addHandler(handler)
        enabled.append(name)
    return enabled
