"""The KVM ABI: structs (cffi, compiled against <linux/kvm.h>), constants and ioctls.

This is the only place that knows ioctl numbers and the only place that calls ``ioctl``.
Numbers are computed from the compiled struct sizes (``_IOW(KVMIO, nr, sizeof(...))``), so a
layout that disagrees with the kernel gives a wrong number and fails with ``ENOTTY``
instead of corrupting state; ``tests/abi`` checks every number against the host headers.

Architecture plugins define their own ioctls with :func:`define_ioctl` (sizes from their own
cffi module) and call :func:`ioctl` with a buffer address.
"""

from __future__ import annotations

import errno
from typing import Any

from kvmfw.abi import constants
from kvmfw.abi.constants import Cap, ExitReason, InternalError, SystemEvent
from kvmfw.errors import AbiModuleMissingError, KvmError

try:
    from kvmfw.abi._kvm import ffi, lib
except ImportError as exc:  # only on a broken install or a source tree never built
    raise AbiModuleMissingError(
        "kvmfw's compiled KVM ABI module (kvmfw.abi._kvm) is missing: install kvmfw with "
        "pip (a C compiler and kernel headers must be present: apt-get install gcc "
        "linux-libc-dev), or build it in place with python kvmfw/abi/_build.py"
    ) from exc

__all__ = [
    "Cap", "ExitReason", "InternalError", "SystemEvent", "constants", "ffi", "lib",
    "IOC_NONE", "IOC_WRITE", "IOC_READ", "KVMIO", "ioctl_number", "define_ioctl",
    "ioctl", "ioctl_name", "address_of", "IOCTLS",
]

# asm-generic/ioctl.h (x86, arm64 and riscv use the generic encoding)
IOC_NONE, IOC_WRITE, IOC_READ = 0, 1, 2
_NRBITS, _TYPEBITS, _SIZEBITS = 8, 8, 14
_TYPESHIFT = _NRBITS
_SIZESHIFT = _TYPESHIFT + _TYPEBITS
_DIRSHIFT = _SIZESHIFT + _SIZEBITS
KVMIO = 0xAE


def ioctl_number(direction: int, nr: int, size: int = 0, kind: int = KVMIO) -> int:
    """``_IOC(dir, type, nr, size)`` of the kernel's generic ioctl encoding."""
    if size >= 1 << _SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit the encoding")
    return (direction << _DIRSHIFT) | (size << _SIZESHIFT) | (kind << _TYPESHIFT) | nr


class _Ioctls:
    """Namespace of ioctl numbers by KVM name: ``IOCTLS.KVM_RUN``."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    def add(self, name: str, number: int) -> int:
        setattr(self, name, number)
        self._names[number] = name
        return number

    def name(self, number: int) -> str:
        return self._names.get(number, f"ioctl 0x{number:x}")

    def __getattr__(self, name: str) -> int:  # only reached for undefined names
        raise AttributeError(f"no KVM ioctl named {name!r} is defined")


IOCTLS = _Ioctls()


def define_ioctl(name: str, direction: int, nr: int, arg: str | int | None = None,
                 ffi_: Any = None) -> int:
    """Define (or re-define) an ioctl: ``arg`` is a C type name (sized by ``ffi_``, the
    core's by default), a byte size, or None for ``_IO``."""
    if arg is None:
        size = 0
    elif isinstance(arg, int):
        size = arg
    else:
        size = (ffi_ or ffi).sizeof(arg)
    return IOCTLS.add(name, ioctl_number(direction, nr, size))


_R, _W, _RW = IOC_READ, IOC_WRITE, IOC_READ | IOC_WRITE
for _name, _dir, _nr, _arg in [
    # system ioctls (on /dev/kvm)
    ("KVM_GET_API_VERSION", IOC_NONE, 0x00, None),
    ("KVM_CREATE_VM", IOC_NONE, 0x01, None),
    ("KVM_CHECK_EXTENSION", IOC_NONE, 0x03, None),
    ("KVM_GET_VCPU_MMAP_SIZE", IOC_NONE, 0x04, None),
    # VM ioctls
    ("KVM_CREATE_VCPU", IOC_NONE, 0x41, None),
    ("KVM_GET_DIRTY_LOG", _W, 0x42, "struct kvm_dirty_log"),
    ("KVM_SET_USER_MEMORY_REGION", _W, 0x46, "struct kvm_userspace_memory_region"),
    ("KVM_SET_TSS_ADDR", IOC_NONE, 0x47, None),
    ("KVM_SET_IDENTITY_MAP_ADDR", _W, 0x48, "uint64_t"),
    ("KVM_CREATE_IRQCHIP", IOC_NONE, 0x60, None),
    ("KVM_IRQ_LINE", _W, 0x61, "struct kvm_irq_level"),
    ("KVM_IRQ_LINE_STATUS", _RW, 0x67, "struct kvm_irq_level"),
    ("KVM_REGISTER_COALESCED_MMIO", _W, 0x67, "struct kvm_coalesced_mmio_zone"),
    ("KVM_UNREGISTER_COALESCED_MMIO", _W, 0x68, "struct kvm_coalesced_mmio_zone"),
    ("KVM_SET_GSI_ROUTING", _W, 0x6A, "struct kvm_irq_routing"),
    ("KVM_IRQFD", _W, 0x76, "struct kvm_irqfd"),
    ("KVM_IOEVENTFD", _W, 0x79, "struct kvm_ioeventfd"),
    ("KVM_SET_BOOT_CPU_ID", IOC_NONE, 0x78, None),
    ("KVM_CREATE_DEVICE", _RW, 0xE0, "struct kvm_create_device"),
    ("KVM_SET_DEVICE_ATTR", _W, 0xE1, "struct kvm_device_attr"),
    ("KVM_GET_DEVICE_ATTR", _W, 0xE2, "struct kvm_device_attr"),
    ("KVM_HAS_DEVICE_ATTR", _W, 0xE3, "struct kvm_device_attr"),
    ("KVM_ENABLE_CAP", _W, 0xA3, "struct kvm_enable_cap"),
    ("KVM_CLEAR_DIRTY_LOG", _RW, 0xC0, "struct kvm_clear_dirty_log"),
    # vCPU ioctls
    ("KVM_RUN", IOC_NONE, 0x80, None),
    ("KVM_SET_SIGNAL_MASK", _W, 0x8B, "struct kvm_signal_mask"),
    ("KVM_NMI", IOC_NONE, 0x9A, None),
    ("KVM_SET_GUEST_DEBUG", _W, 0x9B, "struct kvm_guest_debug"),
    ("KVM_GET_ONE_REG", _W, 0xAB, "struct kvm_one_reg"),
    ("KVM_SET_ONE_REG", _W, 0xAC, "struct kvm_one_reg"),
    ("KVM_GET_REG_LIST", _RW, 0xB0, "struct kvm_reg_list"),
    ("KVM_GET_STATS_FD", IOC_NONE, 0xCE, None),
]:
    define_ioctl(_name, _dir, _nr, _arg)

# KVM_ENABLE_CAP is a system, VM and vCPU ioctl with one number; KVM_IRQ_LINE_STATUS and
# KVM_REGISTER_COALESCED_MMIO share nr 0x67 but differ in direction.


def ioctl_name(number: int) -> str:
    """The KVM name of an ioctl number (for messages)."""
    return IOCTLS.name(number)


def address_of(cdata: Any, ffi_: Any = None) -> int:
    """The address of a cffi buffer, to pass to :func:`ioctl` (keep ``cdata`` alive)."""
    return int((ffi_ or ffi).cast("uintptr_t", cdata))


_raw_ioctl = lib.kvmfw_ioctl
_EINTR = errno.EINTR
_KVM_RUN = IOCTLS.KVM_RUN


EINTR_RETRIES = 100
"""How often :func:`ioctl` reissues a call a signal interrupted before giving up."""


def ioctl(fd: int, request: int, arg: int = 0, detail: str = "") -> int:
    """Issue one ioctl; return its non-negative result or raise :class:`KvmError`.

    ``arg`` is an integer (a value for ``_IO`` ioctls, or a buffer address from
    :func:`address_of`). A call a signal interrupted (``EINTR``: KVM checks for pending
    signals in long calls, e.g. ``KVM_CREATE_VM``, and a kick or run-timer signal can land
    on any thread that ran a vCPU) did nothing and is issued again, up to
    :data:`EINTR_RETRIES` times; ``KVM_RUN`` is not, there ``EINTR`` is the kick.
    """
    r = _raw_ioctl(fd, request, arg)
    if r < 0:
        tries = 0
        while r == -_EINTR and request != _KVM_RUN and tries < EINTR_RETRIES:
            tries += 1
            r = _raw_ioctl(fd, request, arg)
        if r < 0:
            raise KvmError(IOCTLS.name(request), -r, detail)
    return r
