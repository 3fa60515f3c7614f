"""A minimal, test-only architecture plugin: x86 real mode through raw KVM_GET/SET_REGS.

It lets the core's tests run real guests without depending on ``plugins/x86``: the guest
(tests/guests/realmode.S) starts at the reset vector, so only ``kvm_regs`` is synced.
``kvm_regs`` is 18 little-endian u64 (rax..r15, rip, rflags); tests/abi checks that size
against the host headers.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from kvmfw import SyncLevel, hookimpl
from kvmfw.abi import IOC_READ, IOC_WRITE, address_of, define_ioctl, ffi
from kvmfw.memory import MemoryRegion

KVMFW_PLUGIN_API = (1, 0)
GUEST = Path(__file__).parent / "guests" / "realmode.bin"
ROM_BASE = 0xFFFFF000
REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
KVM_REGS_SIZE = 8 * len(REGS)
KVM_GET_REGS = define_ioctl("KVM_GET_REGS", IOC_READ, 0x81, KVM_REGS_SIZE)
KVM_SET_REGS = define_ioctl("KVM_SET_REGS", IOC_WRITE, 0x82, KVM_REGS_SIZE)
_fmt = struct.Struct("<18Q")


class RealModeContext:
    """The general registers; ``pc`` is the linear address at the reset code segment."""

    def __init__(self) -> None:
        self.regs: dict[str, int] = dict.fromkeys(REGS, 0)

    def __getattr__(self, name: str) -> int:
        regs = self.__dict__.get("regs")
        if regs is not None and name in regs:
            return regs[name]
        raise AttributeError(name)

    @property
    def pc(self) -> int:
        return 0xFFFF0000 + (self.regs["rip"] & 0xFFFF)


class RealModeArch:
    """Hook implementations; ``calls`` records hook calls for the tests."""

    def __init__(self, program: int = 0, guest: bytes | None = None, *,
                 direct_port_io: bool = False) -> None:
        self.program = program
        self.direct_port_io = direct_port_io
        """Let single port accesses bypass :meth:`handle_exit_io` (``KvmCPU.direct_port_io``:
        it does only what the bus does)."""
        self.guest = guest if guest is not None else GUEST.read_bytes()
        self.calls: list[str] = []
        self.pio_handled = 0

    @hookimpl
    def arch_name(self) -> str:
        return "realmode-test"

    @hookimpl
    def memory_layout(self, size: int) -> list[tuple[int, int, str]]:
        return [(0, size, "ram")]

    @hookimpl
    def machine_configure(self, machine: Any) -> None:
        rom = MemoryRegion.anonymous(ROM_BASE, 0x1000, "rom")
        rom.view[:len(self.guest)] = self.guest
        machine.vm.add_memory(rom)

    @hookimpl
    def vcpu_init(self, cpu: Any) -> None:
        cpu.direct_port_io = self.direct_port_io

    @hookimpl
    def create_thread_context(self, cpu: Any) -> RealModeContext:
        ctx = RealModeContext()
        buf = ffi.new("uint8_t[]", KVM_REGS_SIZE)
        cpu.vcpu.ioctl(KVM_GET_REGS, address_of(buf))
        ctx.regs.update(zip(REGS, _fmt.unpack(ffi.buffer(buf)), strict=True))
        ctx.regs["rax"] = self.program
        cpu.mark_context_dirty()
        return ctx

    @hookimpl
    def update_kvm_state(self, cpu: Any, context: RealModeContext, level: SyncLevel) -> bool:
        self.calls.append("push")
        buf = ffi.new("uint8_t[]", _fmt.pack(*(context.regs[r] for r in REGS)))
        cpu.vcpu.ioctl(KVM_SET_REGS, address_of(buf))
        return True

    @hookimpl
    def update_thread_context(self, cpu: Any, context: RealModeContext,
                              level: SyncLevel) -> bool:
        self.calls.append("pull")
        buf = ffi.new("uint8_t[]", KVM_REGS_SIZE)
        cpu.vcpu.ioctl(KVM_GET_REGS, address_of(buf))
        context.regs.update(zip(REGS, _fmt.unpack(ffi.buffer(buf)), strict=True))
        return True

    @hookimpl
    def handle_exit_io(self, cpu: Any, io: Any) -> bool:
        """Port IO without string IO: one access of ``io.size`` bytes per exit."""
        direction, size, port, _count, off = io  # an IoExit is a tuple: unpacking is fastest
        mm = cpu.vcpu.run_map
        if direction:  # out
            cpu.machine.bus.pio.write(port, mm[off:off + size])
        else:
            mm[off:off + size] = cpu.machine.bus.pio.read(port, size)
        return True

    @hookimpl
    def dump_state(self, cpu: Any) -> str:
        r = cpu.context.regs
        return " ".join(f"{n}={r[n]:#x}" for n in REGS)
