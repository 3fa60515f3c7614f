"""Debug flags (``--debug-flags Kvm,KvmIO``) mapped onto :mod:`logging` loggers."""

from __future__ import annotations

import logging
import sys

from kvmfw.errors import ConfigError

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
    """Turn on the named flags (comma-separated or a list); returns the loggers enabled."""
    names = [f.strip() for f in (flags.split(",") if isinstance(flags, str) else flags)
             if f.strip()]
    expanded: list[str] = []
    for n in names:
        if n in COMPOUND:
            expanded += COMPOUND[n]
        elif n in FLAGS:
            expanded.append(n)
        else:
            known = ", ".join(list(FLAGS) + list(COMPOUND))
            raise ConfigError(f"unknown debug flag {n!r} (known: {known})")
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    enabled = []
    for n in expanded:
        logger = logging.getLogger(FLAGS[n][0])
        logger.setLevel(logging.DEBUG)
        if not logger.handlers:
            logger.addHandler(handler)
        enabled.append(FLAGS[n][0])
    return enabled
