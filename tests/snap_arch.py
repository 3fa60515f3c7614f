"""The snapshot tests' guest and arch: the checkpoint tests' :class:`CkptArch` running
``guests/dirty.S``, which increments one byte in each of ``count`` pages per run, so tests
and ``benchmarks/snapshot.py`` run without any plugin installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckpt_arch import KVM_GET_SREGS, KVM_SREGS_SIZE, CkptArch
from realmode_arch import KVM_GET_REGS, KVM_REGS_SIZE, REGS, _fmt

from kvmfw.abi import address_of, ffi
from kvmfw.device import Device, Range
from kvmfw.errors import CheckpointError
from kvmfw.machine import Machine, MachineConfig

DIRTY_GUEST = Path(__file__).parent / "guests" / "dirty.bin"
ROM_COUNT, ROM_FIRST = 0xFE0, 0xFE2
EXIT_PORT, DMA_PORT = 0x13, 0x12


class SnapArch(CkptArch):
    """The checkpoint tests' arch (vCPU state: ``kvm_regs`` and ``kvm_sregs``) running
    the dirty guest."""

    def __init__(self) -> None:
        super().__init__(0, DIRTY_GUEST.read_bytes())


class Ports(Device):
    """The exit port (0x13 ends the run) and a "DMA" port (0x12): each write to it counts
    (device state, saved and restored) and makes the device write every ``dma`` payload
    into guest RAM through :meth:`GuestMemory.view` and :meth:`GuestMemory.mark_dirty`, as
    device DMA does."""

    name = "snap-ports"

    def __init__(self, ctx: Any, machine: Machine) -> None:
        super().__init__(ctx)
        self.machine = machine
        self.dma: list[tuple[int, bytes]] = []
        self.count = 0

    def ranges(self) -> list[Range]:
        return [Range("pio", DMA_PORT, 2, self.name)]

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if offset == 1:
            self.machine.request_exit(data[0], "guest wrote the exit port")
            return
        self.count += 1
        mem = self.ctx.memory
        for gpa, payload in self.dma:
            view = mem.view(gpa, len(payload))
            view[:] = payload
            mem.mark_dirty(gpa, len(payload))

    def save(self) -> dict[str, Any]:
        return {"count": self.count}

    def restore(self, state: dict[str, Any]) -> None:
        count = state.get("count")
        if not isinstance(count, int) or count < 0:
            raise CheckpointError("snap-ports: saved count invalid")
        self.count = count


def make(pages: int = 1, first: int = 1, memory: int = 1 << 20,
         **cfg: Any) -> tuple[Machine, Ports]:
    """A machine running the dirty guest: ``pages`` pages from page ``first`` per run."""
    if not 0 <= pages <= 256 or first < 0 or first + pages > 256:
        raise ValueError("the real-mode guest reaches pages 0..255")
    m = Machine(MachineConfig(memory=memory, **cfg), arch_plugin=SnapArch())
    set_pages(m, pages, first)
    ports = Ports(m.device_context(), m)
    m.add_device(ports)
    return m, ports


def rom(machine: Machine) -> Any:
    return next(r for r in machine.memory if r.name == "rom")


def set_pages(machine: Machine, pages: int, first: int = 1) -> None:
    v = rom(machine).view
    v[ROM_COUNT:ROM_COUNT + 2] = pages.to_bytes(2, "little")
    v[ROM_FIRST:ROM_FIRST + 2] = first.to_bytes(2, "little")


def regs_of(machine: Machine, index: int = 0) -> dict[str, int]:
    """The general registers of a vCPU, read from KVM now."""
    buf = ffi.new("uint8_t[]", KVM_REGS_SIZE)
    machine.cpus[index].vcpu.ioctl(KVM_GET_REGS, address_of(buf))
    return dict(zip(REGS, _fmt.unpack(ffi.buffer(buf)), strict=True))


def sregs_of(machine: Machine, index: int = 0) -> bytes:
    buf = ffi.new("uint8_t[]", KVM_SREGS_SIZE)
    machine.cpus[index].vcpu.ioctl(KVM_GET_SREGS, address_of(buf))
    return bytes(ffi.buffer(buf))
