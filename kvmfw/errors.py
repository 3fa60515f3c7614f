"""The typed exception hierarchy of kvmfw: one class per way things go wrong.

Every error carries a one-line ``str()`` saying what happened and, where there is one, a
``hint`` saying what to do. The CLI prints exactly that line (plus a register dump for guest
errors) and maps the class to an exit status; it never shows a traceback.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any


class KvmfwError(Exception):
    """Base of every error kvmfw raises on purpose."""

    exit_status = 2
    hint: str = ""

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg} ({self.hint})" if self.hint else msg


# --- /dev/kvm and ioctls -------------------------------------------------------------

class KvmUnavailableError(KvmfwError):
    """``/dev/kvm`` is missing, not permitted or not a usable KVM."""

    exit_status = 3


class KvmError(KvmfwError):
    """A KVM ioctl failed; names the ioctl and the errno."""

    def __init__(self, ioctl: str, errno: int, detail: str = "") -> None:
        self.ioctl = ioctl
        self.errno = errno
        name = _errno.errorcode.get(errno, str(errno))
        text = f"{ioctl} failed: {name} ({os.strerror(errno)})"
        super().__init__(f"{text}: {detail}" if detail else text)


class KvmApiVersionError(KvmUnavailableError):
    """The kernel speaks a KVM API version other than 12."""


class AbiModuleMissingError(KvmUnavailableError, ImportError):
    """kvmfw's compiled ABI module is not installed (a broken or unbuilt install)."""


# --- memory, bus, devices ---------------------------------------------------------------

class GuestMemoryError(KvmfwError):
    """A guest-physical range is invalid, overlaps, or no memory slot is left."""


class BusError(KvmfwError):
    """A bus registration or access is invalid."""


class BusOverlapError(BusError):
    """A device range overlaps one already registered."""


class UnclaimedAccessError(BusError):
    """The guest accessed an address no device claims and the policy is ``fatal``."""

    exit_status = 6


class DeviceError(BusError):
    """A device raised while handling a guest access."""

    exit_status = 6


# --- the guest ending a run badly ---------------------------------------------------

class GuestError(KvmfwError):
    """The run ended because of what the guest did; carries the exit and a register dump."""

    exit_status = 5

    def __init__(self, message: str, *, exit_reason: int | None = None,
                 details: dict[str, Any] | None = None, dump: str = "") -> None:
        super().__init__(message)
        self.exit_reason = exit_reason
        self.details = details or {}
        self.dump = dump


class TripleFaultError(GuestError):
    """KVM_EXIT_SHUTDOWN: the guest triple-faulted (or otherwise shut the vCPU down)."""


class EntryFailureError(GuestError):
    """KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest (invalid state)."""


class InternalKvmError(GuestError):
    """KVM_EXIT_INTERNAL_ERROR: KVM could not continue the guest."""


class EmulationFailureError(InternalKvmError):
    """KVM's instruction emulator failed on a guest instruction."""


class GuestExceptionError(GuestError):
    """KVM_EXIT_EXCEPTION: an exception KVM hands to userspace."""


class UnhandledExitError(GuestError):
    """An exit that neither the core nor any plugin handles."""


class GuestCrashError(GuestError):
    """The guest reported a crash (KVM_SYSTEM_EVENT_CRASH) or failed through a device."""


class RunTimeoutError(KvmfwError):
    """The run hit its host-time limit."""

    exit_status = 124


class StoppedBySignal(KvmfwError):
    """A signal (SIGTERM, SIGHUP, SIGINT) stopped kvmfw; exit status 128 + the signal, as a
    shell reports a process killed by it."""

    def __init__(self, signum: int, message: str) -> None:
        self.signum = signum
        self.exit_status = 128 + signum
        super().__init__(message)


# --- plugins, config, images -----------------------------------------------------------

class PluginError(KvmfwError):
    """A plugin could not be found, loaded or called."""

    exit_status = 4


class PluginLoadError(PluginError):
    """A plugin failed to import or to register."""

    def __init__(self, name: str, group: str, cause: BaseException | str) -> None:
        self.name = name
        self.group = group
        self.cause = cause
        super().__init__(f"plugin {name!r} ({group}) failed to load: {_describe(cause)}")


class ArchNotFoundError(PluginError):
    """No architecture plugin for the requested architecture is installed."""


class PluginHookError(PluginError):
    """A plugin raised inside a hook."""

    def __init__(self, hook: str, plugin: str, cause: BaseException) -> None:
        self.hook = hook
        self.plugin = plugin
        self.cause = cause
        super().__init__(f"plugin {plugin!r} raised in hook {hook}: {_describe(cause)}")


class PluginApiMismatchError(PluginError):
    """A plugin was written for another major version of the core's plugin API."""


class ConfigError(KvmfwError):
    """A configuration value (CLI or TOML) is invalid."""

    exit_status = 2


class ImageError(KvmfwError):
    """A guest image is missing, unreadable, truncated or of an unknown format."""

    exit_status = 7


class CheckpointError(KvmfwError):
    """A checkpoint is corrupt, incompatible, or cannot be taken now."""

    exit_status = 9


class StateError(KvmfwError):
    """An operation is not allowed in the CPU's current state."""


def _describe(cause: BaseException | str) -> str:
    if isinstance(cause, BaseException):
        text = str(cause)
        return f"{type(cause).__name__}: {text}" if text else type(cause).__name__
    return cause
