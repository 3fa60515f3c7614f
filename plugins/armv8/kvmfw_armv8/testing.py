"""Test helpers: whether this host has a real arm64 ``/dev/kvm`` (KVM tests skip otherwise)."""

from __future__ import annotations

import os
import platform

ENV_HINT = "run plugins/armv8/env/run-arm64-kvm.sh to run them in an emulated arm64 host"


def arm64_kvm_unavailable_reason() -> str | None:
    """None if this host has a usable arm64 ``/dev/kvm``, else a one-line reason."""
    machine = platform.machine()
    if machine not in ("aarch64", "arm64"):
        return f"needs an arm64 /dev/kvm, this host is {machine} ({ENV_HINT})"
    if not os.path.exists("/dev/kvm"):
        return f"no /dev/kvm on this arm64 host ({ENV_HINT})"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None
