"""What an architecture plugin tells the stub: its registers, breakpoints and stops.

ISA-neutral data only: the arch fills these in (``gdb_*`` hooks in
:mod:`kvmfw.hookspecs`); the stub never knows which ISA it serves.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from xml.sax.saxutils import quoteattr

from kvmfw.errors import KvmfwError


class GdbError(KvmfwError):
    """A debugger request the target cannot honour (no free debug register, an
    unsupported breakpoint type, a register that cannot be written). The stub answers
    the packet with an error code; the run goes on."""


class GdbUnsupported(GdbError):
    """The target has no such feature (a read-only watchpoint on x86): the stub answers
    with an empty packet, which tells GDB "not supported" rather than "failed"."""


class BreakKind(enum.IntEnum):
    """GDB's ``Z``/``z`` types."""

    SOFTWARE = 0
    HARDWARE = 1
    WRITE = 2
    READ = 3
    ACCESS = 4


@dataclass(frozen=True)
class Breakpoint:
    """One inserted breakpoint or watchpoint: ``address`` is a guest virtual address;
    ``length`` is GDB's ``kind`` (the breakpoint instruction's length for 0/1, the
    watched length for 2-4)."""

    kind: BreakKind
    address: int
    length: int


@dataclass(frozen=True)
class Stop:
    """Why a vCPU stopped (the ``gdb_debug_exit`` hook's answer).

    ``reason``: ``swbreak``, ``hwbreak``, ``step``, ``watch``, ``rwatch``, ``awatch``,
    ``trap`` (a debug exit the stub did not ask for) or ``guest`` (the guest's own
    breakpoint, which the arch re-injected: no stop); ``address`` is the data address of
    a watchpoint hit.
    """

    reason: str
    address: int | None = None


@dataclass(frozen=True)
class Reg:
    """One register in GDB's order: ``bits`` wide, GDB ``type`` and register ``group``."""

    name: str
    bits: int
    type: str = "int"
    group: str | None = None


@dataclass(frozen=True)
class Feature:
    """A target-description feature (``org.gnu.gdb.i386.core`` ...): its registers in
    order and any XML type definitions (``<flags>``, ``<vector>``, ``<union>``) they use."""

    name: str
    regs: tuple[Reg, ...]
    types: str = ""


@dataclass(frozen=True)
class GdbTarget:
    """A target description: GDB's ``architecture`` name and features; registers are
    numbered from 0 across the features in order (the ``g`` packet's layout)."""

    architecture: str
    features: tuple[Feature, ...]
    notes: tuple[str, ...] = field(default=())
    """What this target does differently on this KVM (e.g. software breakpoints served
    by debug registers), shown by ``monitor info`` and logged at attach."""
    stepped_watchpoints: bool = False
    """The KVM may miss data watchpoints (kvm_pvm's instruction emulator ignores debug
    registers): while a write watchpoint is set the stub single-steps every vCPU and
    compares the watched bytes after each instruction (correct, slow)."""
    stepped_breakpoints: bool = False
    """The KVM reports neither breakpoint instructions nor execution breakpoints: while
    a software or hardware breakpoint is set the stub single-steps every vCPU and
    compares the thread context's ``pc`` with the breakpoint addresses (correct, slow)."""

    @property
    def registers(self) -> list[Reg]:
        return [r for f in self.features for r in f.regs]

    @property
    def sizes(self) -> list[int]:
        """Bytes per register, in order."""
        return [(r.bits + 7) // 8 for r in self.registers]

    def xml(self) -> str:
        """``target.xml`` (one self-contained document, no ``xi:include``)."""
        out = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
               "<target>", f"<architecture>{self.architecture}</architecture>"]
        n = 0
        for f in self.features:
            out.append(f"<feature name={quoteattr(f.name)}>")
            if f.types:
                out.append(f.types.strip())
            for r in f.regs:
                group = f" group={quoteattr(r.group)}" if r.group else ""
                out.append(f"<reg name={quoteattr(r.name)} bitsize=\"{r.bits}\" "
                           f"type={quoteattr(r.type)} regnum=\"{n}\"{group}/>")
                n += 1
            out.append("</feature>")
        out.append("</target>")
        return "\n".join(out) + "\n"
