"""``Kvm``: the process's handle on ``/dev/kvm`` (API version, capabilities, limits)."""

from __future__ import annotations

import errno
import os
from functools import cached_property
from typing import TYPE_CHECKING

from kvmfw.abi import IOCTLS, Cap, constants, ioctl
from kvmfw.errors import KvmApiVersionError, KvmError, KvmUnavailableError

if TYPE_CHECKING:
    from kvmfw.vm import VM

DEFAULT_PATH = "/dev/kvm"

_OPEN_HINTS = {
    errno.ENOENT: "no such device: load the KVM module (modprobe kvm_intel or kvm_amd), "
                  "enable virtualization in the firmware, or enable nested virtualization "
                  "if this is a VM",
    errno.ENXIO: "the KVM module is not loaded: modprobe kvm_intel or kvm_amd",
    errno.ENODEV: "the KVM module is not loaded: modprobe kvm_intel or kvm_amd",
    errno.EACCES: "permission denied: add your user to the 'kvm' group "
                  "(sudo usermod -aG kvm $USER, then log in again) or run as root",
    errno.EPERM: "operation not permitted: add your user to the 'kvm' group or run as root",
}


class Kvm:
    """An open ``/dev/kvm``; create VMs with :meth:`create_vm`."""

    def __init__(self, path: str = DEFAULT_PATH) -> None:
        self.path = path
        try:
            self.fd: int = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            hint = _OPEN_HINTS.get(exc.errno or 0, exc.strerror or "cannot open")
            raise KvmUnavailableError(f"cannot open {path}: {hint}") from None
        try:
            version = ioctl(self.fd, IOCTLS.KVM_GET_API_VERSION)
            if version != constants.KVM_API_VERSION:
                raise KvmApiVersionError(
                    f"{path} speaks KVM API version {version}, kvmfw needs "
                    f"{constants.KVM_API_VERSION}: use a Linux kernel from 2.6.22 on")
            self.vcpu_mmap_size: int = ioctl(self.fd, IOCTLS.KVM_GET_VCPU_MMAP_SIZE)
            if not self.check_extension(Cap.IMMEDIATE_EXIT):
                # kicks and the run timer rely on it (no signal mask is swapped per entry)
                raise KvmUnavailableError(
                    f"{path} lacks KVM_CAP_IMMEDIATE_EXIT, which kvmfw needs to stop a "
                    "vCPU without losing a kick: use a Linux kernel from 4.11 on")
        except KvmError as exc:
            os.close(self.fd)
            raise KvmUnavailableError(f"{path} is not a usable KVM device: {exc}") from None
        except BaseException:
            os.close(self.fd)
            raise

    # --- capabilities -----------------------------------------------------------------

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 if unsupported, else the capability's value."""
        try:
            return ioctl(self.fd, IOCTLS.KVM_CHECK_EXTENSION, int(cap))
        except KvmError as exc:
            if exc.errno == errno.EINVAL:
                return 0
            raise

    def capabilities(self) -> dict[str, int]:
        """Every capability this kvmfw knows, by name, with the kernel's answer."""
        return {name: self.check_extension(c) for name, c in constants.cap_items()}

    @cached_property
    def nr_memslots(self) -> int:
        """Memory slots per address space (KVM's documented fallback is 32)."""
        return self.check_extension(Cap.NR_MEMSLOTS) or 32

    @cached_property
    def max_vcpus(self) -> int:
        """Maximum vCPUs per VM (``KVM_CAP_MAX_VCPUS``, else ``NR_VCPUS``, else 4)."""
        return self.check_extension(Cap.MAX_VCPUS) or self.check_extension(Cap.NR_VCPUS) or 4

    @cached_property
    def recommended_vcpus(self) -> int:
        return self.check_extension(Cap.NR_VCPUS) or 4

    @cached_property
    def max_vcpu_id(self) -> int:
        return self.check_extension(Cap.MAX_VCPU_ID) or self.max_vcpus

    @cached_property
    def coalesced_mmio_page(self) -> int:
        """Page offset of the coalesced-MMIO ring in the vCPU mapping; 0 = unsupported."""
        return self.check_extension(Cap.COALESCED_MMIO)

    @cached_property
    def module(self) -> str:
        """The kernel module providing ``/dev/kvm`` (e.g. kvm_intel, kvm_amd, kvm_pvm)."""
        for name in ("kvm_intel", "kvm_amd", "kvm_pvm", "kvm_arm", "kvm_riscv"):
            if os.path.isdir(f"/sys/module/{name}"):
                return name
        return "kvm"

    # --- VMs ---------------------------------------------------------------------------

    def create_vm(self, machine_type: int = 0) -> VM:
        """``KVM_CREATE_VM``: a new, empty :class:`~kvmfw.vm.VM`."""
        from kvmfw.vm import VM

        return VM(self, machine_type)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
