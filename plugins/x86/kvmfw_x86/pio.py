"""Port IO for KVM_EXIT_IO: 1/2/4-byte accesses, string IO (``rep ins/outs``, count > 1)
and PCI configuration mechanism #1 (0xCF8 address, 0xCFC-0xCFF data).

PCI configuration goes to a *config-space object*: anything with
``config_read(bus, dev, fn, offset, size) -> int`` and
``config_write(bus, dev, fn, offset, size, value)`` (:class:`PciConfigSpace`). The plugin
finds one among the machine's devices (or ``machine.pci``); without one, every function
reads as absent (all ones), as on a PC without PCI devices. A device that claims 0xCF8
on the bus itself takes precedence: the plugin then routes those ports like any others.
A machine with no configuration space at all (the microvm board) has no mechanism #1 either,
as QEMU's microvm: 0xCF8-0xCFF are then plain unclaimed ports (all ones, answered by the
compiled exit path without Python: Linux's early PCI scan makes over a thousand of these
accesses), except the reset control register 0xCF9, which the plugin still answers.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from kvmfw.errors import InternalKvmError

PCI_ADDR_PORT = 0xCF8
PCI_DATA_PORT = 0xCFC
RESET_CONTROL_PORT = 0xCF9
"""The PIIX reset control register (byte access; the ACPI reset register points here):
a write with RST_CPU (bit 2) resets the machine, SYS_RST (bit 1) reads back."""
RCR_SYS_RST, RCR_RST_CPU = 0x02, 0x04
PIO_DATA_MAX = 4096
"""KVM's port IO data area is one page (``pio_data``): a string exit moves at most that."""
KVM_EXIT_IO = 2


@runtime_checkable
class PciConfigSpace(Protocol):
    """What the x86 plugin needs from a PCI host bridge's configuration space."""

    def config_read(self, bus: int, dev: int, fn: int, offset: int, size: int) -> int: ...

    def config_write(self, bus: int, dev: int, fn: int, offset: int, size: int,
                     value: int) -> None: ...


def _is_config_space(obj: Any) -> bool:
    """``isinstance(obj, PciConfigSpace)``, without the protocol check's cost (Python 3.11
    recomputes a protocol's members on every check: ~30 us per object, here ~0.3 ms at the
    guest's first PCI probe, ~10 ms in a nested guest)."""
    return callable(getattr(obj, "config_read", None)) \
        and callable(getattr(obj, "config_write", None))


def find_pci(machine: Any) -> PciConfigSpace | None:
    """The machine's PCI configuration space, if any device provides one."""
    obj = getattr(machine, "pci", None)
    if _is_config_space(obj):
        return obj
    for d in getattr(machine, "devices", []):
        if _is_config_space(d):
            return d
        cs = getattr(d, "config_space", None)
        if _is_config_space(cs):
            return cs
    return None


class PortIo:
    """Handles every port IO exit of one machine (shared by its vCPUs)."""

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self.pio = machine.bus.pio
        self.pci_address = 0
        self.rcr = 0
        self._pci: PciConfigSpace | None = None
        self._pci_checked = False
        self._bus_owns_cf8: bool | None = None
        self.decode_pci = True
        """Whether 0xCF8-0xCFF are PCI mechanism #1; decided at the first access to them
        (a configuration space set on the machine before then counts)."""
        self.stats = {"string_io": 0, "pci_config": 0, "resets": 0}

    @property
    def pci(self) -> PciConfigSpace | None:
        if not self._pci_checked:
            self._pci = find_pci(self.machine)
            self._pci_checked = True
        return self._pci

    def handle(self, cpu: Any, io: Any) -> bool:
        direction, size, port, count, off = io  # unpacking the exit tuple is the fastest
        mm = cpu.vcpu.run_map  # slicing the mmap gives bytes without a memoryview copy
        if 0xCF8 <= port <= 0xCFF and self._intercept_pci(port):
            return self._pci_io(mm, off, io)
        pio = self.pio
        if count == 1:
            if direction:
                pio.write(port, mm[off:off + size])
            else:
                mm[off:off + size] = pio.read(port, size)
            return True
        self.stats["string_io"] += 1
        _check_string_io(len(mm), size, count, off, port)
        if direction:
            for i in range(count):
                o = off + i * size
                pio.write(port, mm[o:o + size])
        else:
            for i in range(count):
                o = off + i * size
                mm[o:o + size] = pio.read(port, size)
        return True

    def _intercept_pci(self, port: int) -> bool:
        if self._bus_owns_cf8 is None:
            self._bus_owns_cf8 = self.pio.lookup(PCI_ADDR_PORT) is not None
            if not self._bus_owns_cf8 and self.pci is None:
                # no PCI at all: no mechanism #1; the bus (and the compiled path) takes the
                # ports from now on, the reset control register stays the plugin's
                self.decode_pci = False
                self.pio.release("pci-config")
                self.pio.reserve(RESET_CONTROL_PORT, 1, "reset-control")
        return not self._bus_owns_cf8 and (self.decode_pci or port == RESET_CONTROL_PORT)

    def _pci_io(self, view: Any, off: int, io: Any) -> bool:
        size, port = io.size, io.port
        _check_string_io(len(view), size, io.count, off, port)
        self.stats["pci_config"] += 1
        for i in range(io.count):
            o = off + i * size
            if port == PCI_ADDR_PORT and size == 4:
                if io.direction:
                    self.pci_address = int.from_bytes(view[o:o + 4], "little") & 0x8FFFFFFC
                else:
                    view[o:o + 4] = self.pci_address.to_bytes(4, "little")
                continue
            if port == RESET_CONTROL_PORT and size == 1 \
                    and self.pio.lookup(RESET_CONTROL_PORT) is None:
                self._reset_control(view, o, io.direction)
                continue
            if port < PCI_DATA_PORT or not self.pci_address & 0x80000000:
                # not a config access (e.g. byte access to 0xCF9, the reset control
                # register): plain port IO
                if io.direction:
                    self.pio.write(port, bytes(view[o:o + size]))
                else:
                    view[o:o + size] = self.pio.read(port, size)
                continue
            a = self.pci_address
            bus, dev, fn = (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7
            reg = (a & 0xFC) | (port & 3)
            space = self.pci
            if io.direction:
                value = int.from_bytes(view[o:o + size], "little")
                if space is not None:
                    space.config_write(bus, dev, fn, reg, size, value)
            else:
                value = space.config_read(bus, dev, fn, reg, size) if space is not None \
                    else (1 << (8 * size)) - 1
                view[o:o + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        return True

    def _reset_control(self, view: Any, off: int, write: int) -> None:
        """0xCF9 as QEMU's PIIX: RST_CPU resets the machine (``Machine.request_reset``:
        a reboot, or the run's end with ``reboot=off``); SYS_RST is kept and reads back."""
        if not write:
            view[off:off + 1] = bytes([self.rcr])
            return
        value = view[off]
        if value & RCR_RST_CPU:
            self.stats["resets"] += 1
            self.rcr = 0
            self.machine.request_reset(f"reset (reset control register 0xcf9 <- {value:#04x})")
            return
        self.rcr = value & RCR_SYS_RST


def _check_string_io(map_len: int, size: int, count: int, off: int, port: int) -> None:
    """Refuse a string-IO exit whose elements would reach outside KVM's data page.

    ``count`` is set by KVM from the guest's ``rep`` count (KVM caps it at one page of
    data); checked anyway, before any device sees an element, so a kernel that reports
    more, or a corrupted run area, cannot make the host loop over or write past the
    mapping."""
    if size not in (1, 2, 4) or count < 1 or size * count > PIO_DATA_MAX \
            or off < 0 or off + size * count > map_len:
        raise InternalKvmError(
            f"port IO exit at port {port:#x} with size {size}, count {count}, data offset "
            f"{off:#x} reaches outside KVM's {PIO_DATA_MAX}-byte data page (mapping of "
            f"{map_len:#x} bytes): the run area is inconsistent", exit_reason=KVM_EXIT_IO,
            details={"port": port, "size": size, "count": count, "data_offset": off})
