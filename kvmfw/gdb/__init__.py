"""A GDB remote-protocol stub for kvmfw guests (``kvmfw run --gdb tcp::1234``).

``protocol`` frames packets, ``server`` is the TCP transport, ``client`` a small client
to script a stub from Python, ``stub`` the
ISA-neutral logic, ``target`` the data the arch plugin's ``gdb_*`` hooks return.
Start one with :meth:`kvmfw.machine.Machine.start_gdb`.
"""

from kvmfw.gdb.client import GdbClient
from kvmfw.gdb.server import GdbServer, parse_endpoint
from kvmfw.gdb.stub import GdbStub
from kvmfw.gdb.target import (
    BreakKind,
    Breakpoint,
    Feature,
    GdbError,
    GdbTarget,
    GdbUnsupported,
    Reg,
    Stop,
)

__all__ = ["BreakKind", "Breakpoint", "Feature", "GdbClient", "GdbError", "GdbServer", "GdbStub",
           "GdbTarget", "GdbUnsupported", "Reg", "Stop", "parse_endpoint"]
