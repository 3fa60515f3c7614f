"""Minimal ACPI tables for SMP discovery: RSDP (ACPI 1.0, found by the BIOS-area scan),
RSDT and MADT (one Processor Local APIC entry per vCPU, the IO-APIC, the ISA override
IRQ 0 -> GSI 2 and LINT1 as NMI), the same machine the MP tables describe.

There is no FADT or DSDT: an OS finds every CPU and the IO-APIC here, but a full ACPI
interpreter (Linux's ACPICA) reports that it cannot load the namespace and carries on
with ACPI off. That is why the tables are opt-in (machine option ``acpi=on``)."""

from __future__ import annotations

import struct
from typing import Any

from kvmfw_x86.mptable import IOAPIC_ADDR, LAPIC_ADDR

RSDP_ADDR = 0xF1000
"""In 0xE0000-0xFFFFF on a 16-byte boundary, after the MP tables at 0xF0000."""
OEM_ID = b"KVMFW "
OEM_TABLE_ID = b"KVMFWX86"


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` sum to zero (mod 256)."""
    return (-sum(data)) & 0xFF


def _sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    hdr = struct.pack("<4sIBB6s8sI4sI", signature, 36 + len(body), revision, 0, OEM_ID,
                      OEM_TABLE_ID, 1, b"KVMF", 1)
    table = bytearray(hdr + body)
    table[9] = checksum(bytes(table))
    return bytes(table)


def madt(ncpus: int) -> bytes:
    """The Multiple APIC Description Table (revision 3)."""
    entries = [struct.pack("<BBBBI", 0, 8, i, i, 1) for i in range(ncpus)]  # enabled
    entries.append(struct.pack("<BBBBII", 1, 12, ncpus, 0, IOAPIC_ADDR, 0))  # GSI base 0
    entries.append(struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0))  # ISA IRQ 0 -> GSI 2
    entries.append(struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1))  # all CPUs: LINT1 is NMI
    body = struct.pack("<II", LAPIC_ADDR, 1) + b"".join(entries)  # PCAT_COMPAT: 8259s
    return _sdt(b"APIC", 3, body)


def build(ncpus: int, base: int = RSDP_ADDR) -> bytes:
    """RSDP (20 bytes, padded to 32) at ``base``, then the RSDT, then the MADT."""
    rsdt_addr = base + 32
    table = madt(ncpus)
    rsdt = _sdt(b"RSDT", 1, struct.pack("<I", rsdt_addr + 40))
    assert len(rsdt) == 40
    rsdp = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 0, rsdt_addr))
    rsdp[8] = checksum(bytes(rsdp))
    return bytes(rsdp).ljust(32, b"\0") + rsdt + table


def install(machine: Any, base: int = RSDP_ADDR) -> int:
    """Write the tables for ``machine.config.cpus`` vCPUs; returns the RSDP address."""
    machine.memory.write(base, build(machine.config.cpus, base))
    return base


def enabled(machine: Any) -> bool:
    """The ``acpi`` machine option (``on``/``off``, default off)."""
    v = str(machine.config.options.get("acpi", "off")).lower()
    return v in ("1", "on", "true", "yes")
