"""kvmfw: run real guests on /dev/kvm with a run loop you can script and extend in Python.

The core knows no ISA and no device: architecture plugins (``kvmfw.arch`` entry points)
and device plugins (``kvmfw.devices``) provide them through the hooks in
:mod:`kvmfw.hookspecs`.

The names below are imported when first used (PEP 562), so ``import kvmfw.cli`` (every
``kvmfw`` command) pays only for what the command needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvmfw.api import Console, RunEnd
    from kvmfw.device import Device, DeviceContext, Range
    from kvmfw.errors import KvmfwError
    from kvmfw.hookspecs import PLUGIN_API, SyncLevel, hookimpl
    from kvmfw.machine import Machine, MachineConfig, RunResult

__version__ = "0.1.0"

_LAZY = {"Console": "kvmfw.api", "RunEnd": "kvmfw.api", "Device": "kvmfw.device",
         "DeviceContext": "kvmfw.device", "Range": "kvmfw.device",
         "KvmfwError": "kvmfw.errors", "PLUGIN_API": "kvmfw.hookspecs",
         "SyncLevel": "kvmfw.hookspecs", "hookimpl": "kvmfw.hookspecs",
         "Machine": "kvmfw.machine", "MachineConfig": "kvmfw.machine",
         "RunResult": "kvmfw.machine"}

__all__ = ["PLUGIN_API", "Console", "Device", "DeviceContext", "KvmfwError", "Machine",
           "MachineConfig", "Range", "RunEnd", "RunResult", "SyncLevel", "hookimpl",
           "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvmfw' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
