"""``VCpu``: one KVM vCPU fd, its mapped ``kvm_run`` area, and the raw calls on it.

The run loop (:mod:`kvmfw.cpu`) drives a VCpu; architecture plugins use its raw calls
(:meth:`VCpu.ioctl`, ONE_REG) to implement state sync. Devices never see it.

Kicking (QEMU's scheme): the thread that runs the vCPU leaves the kick signal unblocked; its
handler (C, in the ABI module) sets ``immediate_exit`` in that thread's ``kvm_run``. A kick
(``pthread_kill``) or the run timer therefore either interrupts a running guest
(``KVM_EXIT_INTR``) or makes the next entry return at once: no kick is lost, and no signal
mask is swapped on every entry (which ``KVM_SET_SIGNAL_MASK`` would cost).

Ownership: the thread-local slot belongs to the vCPU that last bound the thread; unbinding
or closing clears it only if it still points at this vCPU's ``kvm_run`` (one thread may run
vCPUs of several VMs one after the other). A vCPU run from a new thread is rebound there
(:meth:`VCpu.bind_thread`), so kicks and the run timer follow the thread that runs it.
"""

from __future__ import annotations

import mmap
import os
import signal
import threading
from typing import TYPE_CHECKING

from kvmfw.abi import IOCTLS, address_of, ffi, ioctl, lib
from kvmfw.coalesced import words as coalesced_words
from kvmfw.errors import KvmError, StateError

if TYPE_CHECKING:
    from kvmfw.vm import VM

KICK_SIGNAL = signal.SIGRTMIN + 2
"""The real-time signal kvmfw uses to kick vCPUs and to end run slices."""

_kick_handler_installed = False
_kick_lock = threading.Lock()

ONE_REG_MAX = 256
"""Bytes in KVM's largest ONE_REG register (``KVM_REG_SIZE_U2048``): the buffer's size."""

# Offsets in struct kvm_run, from the compiled layout.
RUN_PAYLOAD = ffi.offsetof("struct kvm_run", "io")
MMIO_DATA = ffi.offsetof("struct kvm_run", "mmio", "data")


def install_kick_handler() -> None:
    """Install the (empty) process-wide handler for :data:`KICK_SIGNAL`, once."""
    global _kick_handler_installed
    with _kick_lock:
        if not _kick_handler_installed:
            r = lib.kvmfw_install_kick_handler(KICK_SIGNAL)
            if r < 0:
                raise OSError(-r, "sigaction(kick signal)")
            _kick_handler_installed = True


class VCpu:
    """A vCPU: its fd, the shared ``kvm_run`` mapping, ONE_REG and raw ioctls."""

    def __init__(self, vm: VM, vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd: int = ioctl(vm.fd, IOCTLS.KVM_CREATE_VCPU, vcpu_id, f"vcpu {vcpu_id}")
        try:
            self._map = mmap.mmap(self.fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.fd)
            raise
        self.run_map = self._map
        """The whole mapped area (``kvm_run`` + coalesced-MMIO ring) as an mmap: slicing it
        gives bytes and slice assignment writes, the cheapest way to move IO data."""
        self.run_view = memoryview(self._map)
        """The same area as a writable memoryview."""
        self.run = ffi.from_buffer("struct kvm_run *", self._map)
        """``struct kvm_run`` as a cffi struct (valid until :meth:`close`)."""
        page = vm.kvm.coalesced_mmio_page
        self.coalesced_ring = coalesced_words(self.run_view, page * mmap.PAGESIZE) \
            if page else None
        """KVM's coalesced-MMIO ring page as 32-bit words (:mod:`kvmfw.coalesced`); None
        when KVM maps none."""
        self.coalesced_ring_offset = page * mmap.PAGESIZE if self.coalesced_ring is not None else 0
        self.thread_ident: int | None = None
        self.thread_tid: int | None = None
        self._one_reg = ffi.new("struct kvm_one_reg *")
        self._one_reg_buf = ffi.new("uint8_t[256]")
        self._one_reg.addr = address_of(self._one_reg_buf)
        self._one_reg_addr = address_of(self._one_reg)

    # --- running ---------------------------------------------------------------------

    def bind_thread(self) -> None:
        """Make the calling thread the one that runs this vCPU (kicks, the run timer)."""
        install_kick_handler()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {KICK_SIGNAL})
        lib.kvmfw_bind_run(address_of(self.run))
        self.thread_ident = threading.get_ident()
        self.thread_tid = lib.kvmfw_gettid()

    def unbind_thread(self) -> None:
        """Called on the bound thread when it stops running this vCPU."""
        if self.thread_ident == threading.get_ident() and self.run is not None:
            lib.kvmfw_unbind_run(address_of(self.run))
        self.thread_ident = None
        self.thread_tid = None

    @property
    def bound_here(self) -> bool:
        """Whether the calling thread is the one bound to run this vCPU."""
        return self.thread_ident == threading.get_ident()

    def kick(self) -> None:
        """Make a running ``KVM_RUN`` return soon (``KVM_EXIT_INTR``), or the next one return
        at once; safe from any thread."""
        if self.run is None:  # closed
            return
        ident = self.thread_ident
        if ident is None:
            self.run.immediate_exit = 1
        else:
            try:
                signal.pthread_kill(ident, KICK_SIGNAL)
            except ProcessLookupError:  # the thread has just ended
                self.run.immediate_exit = 1

    @property
    def exit_reason(self) -> int:
        return int(self.run.exit_reason)

    def run_data(self, offset: int, length: int) -> bytes:
        """Bytes of the mapped area at ``offset`` (e.g. IO data at ``io.data_offset``)."""
        return self._map[offset:offset + length]

    def set_run_data(self, offset: int, data: bytes) -> None:
        self._map[offset:offset + len(data)] = data

    # --- raw calls for architecture plugins ----------------------------------------------

    def ioctl(self, request: int, arg: int = 0, detail: str = "") -> int:
        """A vCPU ioctl (``arg`` a value or a buffer address from ``abi.address_of``)."""
        return ioctl(self.fd, request, arg, detail)

    def get_one_reg(self, reg_id: int, size: int | None = None) -> int:
        """``KVM_GET_ONE_REG``; ``size`` defaults to the size encoded in the id."""
        n = self._one_reg_size(reg_id, size)
        r = self._one_reg
        r.id = reg_id
        ioctl(self.fd, IOCTLS.KVM_GET_ONE_REG, self._one_reg_addr, f"reg {reg_id:#x}")
        return int.from_bytes(ffi.buffer(self._one_reg_buf, n), "little")

    def set_one_reg(self, reg_id: int, value: int, size: int | None = None) -> None:
        """``KVM_SET_ONE_REG``; StateError if ``value`` does not fit the register."""
        n = self._one_reg_size(reg_id, size)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 8 * n:
            raise StateError(f"value {value!r} does not fit the {n}-byte register {reg_id:#x}")
        r = self._one_reg
        r.id = reg_id
        ffi.buffer(self._one_reg_buf, n)[:] = value.to_bytes(n, "little")
        ioctl(self.fd, IOCTLS.KVM_SET_ONE_REG, self._one_reg_addr, f"reg {reg_id:#x}")

    @staticmethod
    def _one_reg_size(reg_id: int, size: int | None) -> int:
        """Bytes moved for ``reg_id``: KVM copies the size its id encodes to or from our
        buffer, so an id (or ``size``) larger than the buffer is refused, never sent."""
        if not 0 <= reg_id < 1 << 64:
            raise StateError(f"ONE_REG id {reg_id:#x} is not a 64-bit id")
        encoded = 1 << ((reg_id >> 52) & 0xF)
        n = encoded if size is None else size
        if encoded > ONE_REG_MAX or not 0 < n <= ONE_REG_MAX:
            raise StateError(f"ONE_REG id {reg_id:#x}: {max(n, encoded)} bytes is larger "
                             f"than KVM's largest register ({ONE_REG_MAX} bytes)")
        return n

    def reg_list(self) -> list[int]:
        """``KVM_GET_REG_LIST``: every ONE_REG id this vCPU has."""
        probe = ffi.new("uint64_t[1]")
        try:
            ioctl(self.fd, IOCTLS.KVM_GET_REG_LIST, address_of(probe))
        except KvmError as exc:
            if exc.errno != 7:  # E2BIG: n now holds the count
                raise
        n = int(probe[0])
        buf = ffi.new("uint64_t[]", n + 1)
        buf[0] = n
        ioctl(self.fd, IOCTLS.KVM_GET_REG_LIST, address_of(buf))
        return [int(buf[i + 1]) for i in range(int(buf[0]))]

    def nmi(self) -> None:
        ioctl(self.fd, IOCTLS.KVM_NMI)

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the fd (idempotent)."""
        if self.fd < 0:
            return
        if self.thread_ident == threading.get_ident():
            # the kick handler must not touch the unmapped area; the slot may meanwhile
            # belong to another VM's vCPU on this thread: then it stays
            lib.kvmfw_unbind_run(address_of(self.run))
        self.thread_ident = None
        self.thread_tid = None
        try:
            if self.coalesced_ring is not None:
                self.coalesced_ring.release()
                self.coalesced_ring = None
            self.run_view.release()
            self.run = None  # type: ignore[assignment]
            self.run_map = None  # type: ignore[assignment]
            self._map.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes with the process
        os.close(self.fd)
        self.fd = -1
