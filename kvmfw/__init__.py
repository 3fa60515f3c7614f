"""kvmfw: run real guests on /dev/kvm with a run loop you can script and extend in Python.

The core knows no ISA and no device: architecture plugins (``kvmfw.arch`` entry points)
and device plugins (``kvmfw.devices``) provide them through the hooks in
:mod:`kvmfw.hookspecs`.
"""

from kvmfw.api import Console, RunEnd
from kvmfw.device import Device, DeviceContext, Range
from kvmfw.errors import KvmfwError
from kvmfw.hookspecs import PLUGIN_API, SyncLevel, hookimpl
from kvmfw.machine import Machine, MachineConfig, RunResult

__version__ = "0.1.0"

__all__ = ["PLUGIN_API", "Console", "Device", "DeviceContext", "KvmfwError", "Machine",
           "MachineConfig", "Range", "RunEnd", "RunResult", "SyncLevel", "hookimpl",
           "__version__"]
