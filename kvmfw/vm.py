"""``VM``: one KVM virtual machine (memory slots, coalesced MMIO, IRQ lines, devices, vCPUs)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmfw.abi import IOCTLS, Cap, address_of, constants, ffi, ioctl
from kvmfw.errors import GuestMemoryError, KvmError, KvmfwError
from kvmfw.memory import GuestMemory, MemoryRegion

if TYPE_CHECKING:
    from kvmfw.kvm import Kvm
    from kvmfw.vcpu import VCpu

# <linux/kvm.h> values for the routing/eventfd ioctls below
IRQ_ROUTING_IRQCHIP = 1
IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE, IRQCHIP_IOAPIC = 0, 1, 2
IRQFD_FLAG_DEASSIGN = 1
IOEVENTFD_FLAG_DATAMATCH, IOEVENTFD_FLAG_PIO, IOEVENTFD_FLAG_DEASSIGN = 1, 2, 4


class KvmDevice:
    """An in-kernel device (``KVM_CREATE_DEVICE``) and its attributes."""

    def __init__(self, vm: VM, type_: int, flags: int = 0) -> None:
        cd = ffi.new("struct kvm_create_device *")
        cd.type = type_
        cd.flags = flags
        ioctl(vm.fd, IOCTLS.KVM_CREATE_DEVICE, address_of(cd), f"device type {type_}")
        self.type = type_
        self.fd: int = cd.fd

    def _attr(self, request: int, group: int, attr: int, buf: object | None) -> int:
        a = ffi.new("struct kvm_device_attr *")
        a.group = group
        a.attr = attr
        a.addr = address_of(buf) if buf is not None else 0
        return ioctl(self.fd, request, address_of(a), f"group {group} attr {attr:#x}")

    def has_attr(self, group: int, attr: int) -> bool:
        try:
            self._attr(IOCTLS.KVM_HAS_DEVICE_ATTR, group, attr, None)
            return True
        except KvmError as exc:
            if exc.errno == errno.ENXIO:
                return False
            raise

    def get_attr(self, group: int, attr: int, size: int = 8) -> int:
        buf = ffi.new("uint8_t[]", size)
        self._attr(IOCTLS.KVM_GET_DEVICE_ATTR, group, attr, buf)
        return int.from_bytes(ffi.buffer(buf), "little")

    def set_attr(self, group: int, attr: int, value: int | None = None, size: int = 8) -> None:
        """Set an attribute; ``value=None`` passes no data (e.g. a CTRL_INIT command)."""
        buf = None if value is None else ffi.new("uint8_t[]", value.to_bytes(size, "little"))
        self._attr(IOCTLS.KVM_SET_DEVICE_ATTR, group, attr, buf)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VM:
    """A KVM VM; owns its memory regions, in-kernel devices and vCPUs."""

    def __init__(self, kvm: Kvm, machine_type: int = 0) -> None:
        self.kvm = kvm
        self.fd: int = ioctl(kvm.fd, IOCTLS.KVM_CREATE_VM, machine_type)
        self.memory = GuestMemory()
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._next_vcpu_id = 0
        self.vcpus: list[VCpu] = []
        self.devices: list[KvmDevice] = []
        self.irqchip_in_kernel = False
        self.gsi_routes: list[tuple[int, int, int]] | None = None
        """The last table given to :meth:`set_gsi_routing` (None: KVM's default)."""
        self.coalesced_zones: list[tuple[int, int, bool]] = []
        self.on_coalesced_zone: Callable[[], None] | None = None
        """Called after a zone is registered (the machine turns on ring draining: a zone
        nobody drains would lose its writes)."""
        # one preallocated struct for the frequent KVM_IRQ_LINE
        self._irq_level = ffi.new("struct kvm_irq_level *")
        self._irq_level_addr = address_of(self._irq_level)
        self.dirty_manual_protect = False
        """Use ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` for dirty logging where the kernel has
        it (read before the first tracker is made; see :mod:`kvmfw.dirty`)."""

    # --- capabilities (VM-level answers can differ from the system's) ---------------

    def check_extension(self, cap: int) -> int:
        try:
            return ioctl(self.fd, IOCTLS.KVM_CHECK_EXTENSION, int(cap))
        except KvmError as exc:
            if exc.errno == errno.EINVAL:
                return self.kvm.check_extension(cap)
            raise

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on the VM."""
        ec = ffi.new("struct kvm_enable_cap *")
        ec.cap = int(cap)
        ec.flags = flags
        for i, a in enumerate(args):
            ec.args[i] = a
        ioctl(self.fd, IOCTLS.KVM_ENABLE_CAP, address_of(ec), constants.cap_name(cap))

    # --- memory -------------------------------------------------------------------

    def _alloc_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        if self._next_slot >= self.kvm.nr_memslots:
            raise GuestMemoryError(
                f"no KVM memory slot left (the kernel allows {self.kvm.nr_memslots}): "
                "use fewer, larger memory regions")
        self._next_slot += 1
        return self._next_slot - 1

    def _set_slot(self, slot: int, region: MemoryRegion | None, flags: int = 0) -> None:
        m = ffi.new("struct kvm_userspace_memory_region *")
        m.slot = slot
        if region is not None:
            m.flags = flags
            m.guest_phys_addr = region.gpa
            m.memory_size = region.size
            m.userspace_addr = region.host_addr
        ioctl(self.fd, IOCTLS.KVM_SET_USER_MEMORY_REGION, address_of(m),
              f"slot {slot}" + (f" gpa {region.gpa:#x} size {region.size:#x}" if region else ""))

    def set_slot_flags(self, region: MemoryRegion, log_flags: int) -> None:
        """Re-install ``region``'s slot with ``log_flags`` (``KVM_MEM_LOG_DIRTY_PAGES`` or
        0); its read-only flag is kept."""
        if region.slot is None:
            raise GuestMemoryError(f"memory region {region.name} is not installed")
        flags = (constants.KVM_MEM_READONLY if region.readonly else 0) | log_flags
        self._set_slot(region.slot, region, flags)

    def add_memory(self, region: MemoryRegion, *, log_dirty: bool = False) -> MemoryRegion:
        """Install ``region`` in a free memory slot (logged for dirty pages if
        ``log_dirty`` or while a dirty tracker lives)."""
        self.memory.add(region)
        flags = (constants.KVM_MEM_READONLY if region.readonly else 0) | (
            constants.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0)
        installed = False
        try:
            region.slot = self._alloc_slot()
            self._set_slot(region.slot, region, flags)
            installed = True
            if self.memory.dirty is not None:
                self.memory.dirty.region_added(region)
        except BaseException:
            self.memory.remove(region)
            if region.slot is not None:
                if installed:
                    self._set_slot(region.slot, None)
                self._free_slots.append(region.slot)
                region.slot = None
            raise
        return region

    def add_ram(self, gpa: int, size: int, name: str = "ram") -> MemoryRegion:
        """Anonymous, zeroed guest RAM at ``gpa``."""
        region = MemoryRegion.anonymous(gpa, size, name)
        try:
            return self.add_memory(region)
        except BaseException:
            region.close()
            raise

    def remove_memory(self, region: MemoryRegion) -> None:
        """Take ``region`` out of the guest (its slot becomes free) and unmap it."""
        if self.memory.dirty is not None:
            self.memory.dirty.region_removed(region)
        if region.slot is not None:
            self._set_slot(region.slot, None)
            self._free_slots.append(region.slot)
            region.slot = None
        self.memory.remove(region)
        region.close()

    # --- coalesced MMIO -------------------------------------------------------------

    def register_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        """Writes to ``[addr, addr+size)`` are queued in the ring instead of exiting."""
        self._coalesced(IOCTLS.KVM_REGISTER_COALESCED_MMIO, addr, size, pio)
        self.coalesced_zones.append((addr, size, pio))
        if self.on_coalesced_zone is not None:
            self.on_coalesced_zone()

    def unregister_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        self._coalesced(IOCTLS.KVM_UNREGISTER_COALESCED_MMIO, addr, size, pio)
        self.coalesced_zones.remove((addr, size, pio))

    def _coalesced(self, request: int, addr: int, size: int, pio: bool) -> None:
        z = ffi.new("struct kvm_coalesced_mmio_zone *")
        z.addr = addr
        z.size = size
        z.pio = 1 if pio else 0
        ioctl(self.fd, request, address_of(z), f"zone {addr:#x}+{size:#x}")

    # --- interrupts -----------------------------------------------------------------

    def create_irqchip(self) -> None:
        """``KVM_CREATE_IRQCHIP``: the kernel emulates the interrupt controllers."""
        ioctl(self.fd, IOCTLS.KVM_CREATE_IRQCHIP)
        self.irqchip_in_kernel = True

    def enable_kernel_irqchip(self) -> None:
        """Mark the VM as using an in-kernel irqchip created another way (e.g. a vGIC)."""
        self.irqchip_in_kernel = True

    def set_irq_line(self, irq: int, level: int) -> None:
        """``KVM_IRQ_LINE``: drive an in-kernel irqchip input (arch-specific numbering)."""
        lvl = self._irq_level
        lvl.irq = irq
        lvl.level = level
        ioctl(self.fd, IOCTLS.KVM_IRQ_LINE, self._irq_level_addr, f"irq {irq}")

    def set_gsi_routing(self, routes: list[tuple[int, int, int]]) -> None:
        """``KVM_SET_GSI_ROUTING``: replace the whole table with irqchip routes
        ``(gsi, irqchip, pin)`` (a GSI may be listed once per irqchip)."""
        limit = self.check_extension(Cap.IRQ_ROUTING)
        if not limit:
            raise KvmfwError("this KVM has no GSI routing (KVM_CAP_IRQ_ROUTING)")
        if len(routes) > limit:
            raise KvmfwError(f"{len(routes)} GSI routes: this KVM takes at most {limit}")
        hsize = ffi.sizeof("struct kvm_irq_routing")
        esize = ffi.sizeof("struct kvm_irq_routing_entry")
        buf = ffi.new("uint8_t[]", hsize + len(routes) * esize)
        ffi.cast("struct kvm_irq_routing *", buf).nr = len(routes)
        ents = ffi.cast("struct kvm_irq_routing_entry *", buf + hsize)
        for i, (gsi, chip, pin) in enumerate(routes):
            ents[i].gsi = gsi
            ents[i].type = IRQ_ROUTING_IRQCHIP
            ents[i].u.irqchip.irqchip = chip
            ents[i].u.irqchip.pin = pin
        ioctl(self.fd, IOCTLS.KVM_SET_GSI_ROUTING, address_of(buf), f"{len(routes)} routes")
        self.gsi_routes = list(routes)

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        """``KVM_IRQFD``: a write to eventfd ``fd`` raises GSI ``gsi`` (an edge: the kernel
        pulses the line) without a trip through userspace."""
        f = ffi.new("struct kvm_irqfd *")
        f.fd = fd
        f.gsi = gsi
        f.flags = IRQFD_FLAG_DEASSIGN if deassign else 0
        ioctl(self.fd, IOCTLS.KVM_IRQFD, address_of(f), f"gsi {gsi}")

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        """``KVM_IOEVENTFD``: a guest write of ``length`` bytes (0: any) at ``addr`` (port
        ``addr`` when ``pio``), with ``datamatch`` if given, completes in the kernel and
        signals eventfd ``fd`` instead of exiting."""
        e = ffi.new("struct kvm_ioeventfd *")
        e.addr = addr
        e.len = length
        e.fd = fd
        e.flags = (IOEVENTFD_FLAG_PIO if pio else 0) | \
            (IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            e.flags |= IOEVENTFD_FLAG_DATAMATCH
            e.datamatch = datamatch
        ioctl(self.fd, IOCTLS.KVM_IOEVENTFD, address_of(e),
              f"{'port' if pio else 'addr'} {addr:#x} len {length}")

    # --- in-kernel devices and vCPUs --------------------------------------------------

    def create_device(self, type_: int, flags: int = 0) -> KvmDevice:
        dev = KvmDevice(self, type_, flags)
        self.devices.append(dev)
        return dev

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, IOCTLS.KVM_SET_TSS_ADDR, addr)

    def alloc_vcpu_id(self) -> int:
        vid = self._next_vcpu_id
        if vid >= self.kvm.max_vcpus:
            raise KvmfwError(
                f"this KVM allows at most {self.kvm.max_vcpus} vCPUs per VM")
        self._next_vcpu_id += 1
        return vid

    def create_vcpu(self, vcpu_id: int | None = None) -> VCpu:
        """``KVM_CREATE_VCPU`` and map its ``kvm_run`` area."""
        from kvmfw.vcpu import VCpu

        vcpu = VCpu(self, self.alloc_vcpu_id() if vcpu_id is None else vcpu_id)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        """Close vCPUs, in-kernel devices, the VM fd, and unmap guest memory."""
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        for d in self.devices:
            d.close()
        self.devices.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.memory.close()

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
