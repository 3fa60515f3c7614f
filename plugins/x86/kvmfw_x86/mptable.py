"""Intel MultiProcessor Specification 1.4 tables, so an SMP Linux guest finds every CPU
without ACPI: a floating pointer in the BIOS area and a configuration table with one
processor entry per vCPU, the ISA bus, the IO-APIC and the ISA interrupt routing.

The floating pointer is at 0xF0000, inside the BIOS area Linux scans (reserved in the e820
map). A kernel built without ``CONFIG_X86_MPPARSE`` (Debian's ``cloud-amd64`` flavour, for
one) never looks for these tables: it finds its CPUs only through the ACPI MADT, which the
loaders write by default for bzImages (see :mod:`kvmfw_x86.acpi`)."""

from __future__ import annotations

import struct
from typing import Any

from kvmfw.errors import ConfigError

MP_TABLE_ADDR = 0xF0000
IOAPIC_ADDR = 0xFEC00000
LAPIC_ADDR = 0xFEE00000


def _csum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


MAX_CPUS = 254
"""APIC ids are 8 bits in these tables and the MADT's Local APIC entries; the IO-APIC takes
the id after the last CPU and 0xFF is the broadcast id."""


def check_cpus(ncpus: int) -> None:
    """A :class:`ConfigError` for a vCPU count the tables cannot describe."""
    if not 1 <= ncpus <= MAX_CPUS:
        raise ConfigError(f"the x86 firmware tables describe 1 to {MAX_CPUS} vCPUs (8-bit APIC "
                          f"ids), not {ncpus}: use --cpus {MAX_CPUS} or fewer")


def build(ncpus: int, base: int = MP_TABLE_ADDR) -> bytes:
    """The floating pointer (16 bytes at ``base``) followed by the configuration table."""
    check_cpus(ncpus)
    entries = []
    for i in range(ncpus):
        flags = 0x1 | (0x2 if i == 0 else 0)  # enabled, BSP
        entries.append(struct.pack("<BBBBIIII", 0, i, 0x14, flags, 0x600, 0x201, 0, 0))
    entries.append(struct.pack("<BB6s", 1, 0, b"ISA   "))  # bus 0
    ioapic_id = ncpus
    entries.append(struct.pack("<BBBBI", 2, ioapic_id, 0x11, 1, IOAPIC_ADDR))
    for irq in range(16):
        if irq == 2:
            continue  # the cascade
        pin = 2 if irq == 0 else irq  # the PIT reaches IO-APIC pin 2 (ISA override)
        entries.append(struct.pack("<BBHBBBB", 3, 0, 0, 0, irq, ioapic_id, pin))
    entries.append(struct.pack("<BBHBBBB", 4, 3, 0, 0, 0, 0xFF, 0))  # ExtINT -> LINT0
    entries.append(struct.pack("<BBHBBBB", 4, 1, 0, 0, 0, 0xFF, 1))  # NMI -> LINT1
    body = b"".join(entries)
    length = 44 + len(body)
    hdr = struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", length, 4, 0, b"KVMFW   ",
                      b"KVMFW-X86   ", 0, 0, len(entries), LAPIC_ADDR, 0, 0, 0)
    table = bytearray(hdr + body)
    table[7] = _csum(bytes(table))
    fp = bytearray(struct.pack("<4sIBBB5s", b"_MP_", base + 16, 1, 4, 0, bytes(5)))
    fp[10] = _csum(bytes(fp))
    return bytes(fp) + bytes(table)


def install(machine: Any, base: int = MP_TABLE_ADDR) -> int:
    """Write the tables for ``machine.config.cpus`` vCPUs; returns their address."""
    machine.memory.write(base, build(machine.config.cpus, base))
    return base
