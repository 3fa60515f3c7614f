"""A minimal, complete ACPI for the x86 board: what Linux needs to run with ACPI on.

Tables, written into the reserved area 0xE0000-0xE7FFF (Linux scans 0xE0000-0xFFFFF for
the RSDP)::

    RSDP (ACPI 1.0, rev 0) -> RSDT -> FADT -> FACS, DSDT
                                   -> MADT

- FADT (revision 3, as QEMU's ``pc``): the PM1a event/control blocks and the PM timer of
  the board's ``acpi-pm`` device (QEMU's PIIX4 PM layout at 0x600), SCI on IRQ 9, no SMI
  command port (the machine is always in ACPI mode), IAPC_BOOT_ARCH "legacy devices" and
  "8042" (when a device answers port 0x64), flags WBINVD, PROC_C1, SLP_BUTTON, RTC_S4,
  RESET_REG_SUP, USE_PLATFORM_CLOCK;
  the reset register is the PIIX reset control register (IO 0xCF9 <- 6), as QEMU's.
- FACS at RSDP + 0x80: the OS writes its firmware waking vector there; an S3 wake-up
  enters it (the x86 plugin's ``reset_machine``).
- DSDT, hand-assembled AML: ``Name (_S3_, ...)`` (type 1, QEMU's),
  ``Name (_S5_, Package () {typ, typ, 0, 0})`` and, under
  ``\\_SB_``, one ``Device`` per firmware node with an ACPI ``_HID`` that the machine's
  devices declare (``Device.firmware()``, see :class:`kvmfw.device.FirmwareNode`): ``VRnn``
  for virtio-mmio (``_HID "LNRO0005"``, as QEMU's ``microvm``; Linux's virtio_mmio driver
  binds to these), ``DVnn`` for any other kind, each with ``_UID nn`` and a ``_CRS`` of
  ``Memory32Fixed`` (or ``IO`` for a port range) and an extended ``Interrupt``.
- MADT: one Processor Local APIC per vCPU, the IO-APIC, the ISA overrides IRQ 0 -> GSI 2
  and IRQ 9 (SCI) level/active high, LINT1 as NMI: the machine the MP tables describe.

Hardware-reduced ACPI (the ``acpi-pm`` device with ``reduced=on``: the ``microvm`` board, as
QEMU's ``microvm``): a revision 5 FADT with HW_REDUCED_ACPI, no PM1 blocks, PM timer or
SCI, and the ACPI 5.0 sleep control/status registers (system IO, the device's port and
port + 1) for S5 and S3; the reset register as above. The MADT then has no PCAT_COMPAT flag
and no ISA overrides: Linux takes such a machine to have no 8259s and no PIT interrupt,
and skips their set-up (and its check that the 8254 timer reaches the IO-APIC), so the
ISA devices the OS should use (COM1, the RTC) are DSDT devices (``pnp=on``).
"""

from __future__ import annotations

import struct
from typing import Any

from kvmfw.device import firmware_nodes
from kvmfw.errors import ConfigError
from kvmfw.record import Frozen

from kvmfw_x86.mptable import IOAPIC_ADDR, LAPIC_ADDR, check_cpus

ACPI_BASE = 0xE0000
"""Where the tables go: the RSDP first, on a 16-byte boundary inside Linux's scan window."""
ACPI_SIZE = 0x8000
"""0xE0000-0xE7FFF; the loaders keep fallback boot structures at 0xE8000-0xEFFFF."""
RSDP_ADDR = ACPI_BASE
OEM_ID = b"KVMFW "
OEM_TABLE_ID = b"KVMFWX86"

PM_BASE = 0x600
"""Default port of the ``acpi-pm`` device (QEMU's PIIX4 PM base)."""
SCI_IRQ = 9
S5_SLP_TYP = 0
"""SLP_TYP of S5 (soft off), as QEMU's DSDT and the ``acpi-pm`` device's default."""
S3_SLP_TYP = 1
"""SLP_TYP of S3 (suspend to RAM), as QEMU's DSDT ``_S3`` and the ``acpi-pm`` default."""

FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_SLP_BUTTON = 1 << 5
FADT_RTC_S4 = 1 << 7
FADT_RESET_REG_SUP = 1 << 10
FADT_USE_PLATFORM_CLOCK = 1 << 15
FADT_HW_REDUCED_ACPI = 1 << 20
FADT_FLAGS = (FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_RTC_S4
              | FADT_RESET_REG_SUP | FADT_USE_PLATFORM_CLOCK)
RESET_PORT = 0xCF9
"""The ACPI reset register: the PIIX reset control register, as QEMU's ``pc`` FADT."""
RESET_VALUE = 0x06
"""SYS_RST | RST_CPU: a hard reset."""
FACS_OFFSET = 0x80
"""Where :func:`build` puts the FACS (from the RSDP): the x86 plugin reads the firmware
waking vector there on an S3 wake-up."""
BOOT_ARCH_LEGACY_DEVICES = 1 << 0
BOOT_ARCH_8042 = 1 << 1

VIRTIO_MMIO_HID = "LNRO0005"


class MmioDevice(Frozen):
    """A device to describe in the DSDT: window, interrupt (GSI, -1: none) and ``_HID``
    (a virtio-mmio transport unless told otherwise); ``space`` ``"pio"`` for IO ports."""

    base: int
    size: int
    irq: int
    hid: str = VIRTIO_MMIO_HID
    space: str = "mmio"
    edge: bool = False


class PmBlock(Frozen):
    """Where the ACPI PM registers are: PM1a event (4 bytes) at ``port``, PM1a control (2)
    at ``port + 4``, PM timer (4) at ``port + 8``; the SCI line and the S5 sleep type."""

    port: int = PM_BASE
    sci: int = SCI_IRQ
    s5_typ: int = S5_SLP_TYP
    s3_typ: int = S3_SLP_TYP
    """SLP_TYP of S3; negative: no S3 (no ``_S3`` object)."""
    timer: bool = True
    """Whether the FADT offers the PM timer (PM_TMR_BLK and PM_TMR_LEN 0 otherwise)."""
    reduced: bool = False
    """Hardware-reduced ACPI: ``port`` is the sleep control register, ``port + 1`` the
    sleep status register; no PM1 blocks, timer or SCI."""


DEFAULT_PM = PmBlock()
"""The board's PM block (the ``acpi-pm`` device's defaults)."""


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` sum to zero (mod 256)."""
    return (-sum(data)) & 0xFF


def _sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    hdr = struct.pack("<4sIBB6s8sI4sI", signature, 36 + len(body), revision, 0, OEM_ID,
                      OEM_TABLE_ID, 1, b"KVMF", 1)
    table = bytearray(hdr + body)
    table[9] = checksum(bytes(table))
    return bytes(table)


# --- MADT ------------------------------------------------------------------------------

def madt(ncpus: int, sci: int = SCI_IRQ, legacy: bool = True) -> bytes:
    """The Multiple APIC Description Table (revision 3). ``legacy``: the PC's 8259s are
    there (PCAT_COMPAT) and the ISA overrides apply; without it (hardware-reduced ACPI)
    neither is said."""
    check_cpus(ncpus)
    entries = [struct.pack("<BBBBI", 0, 8, i, i, 1) for i in range(ncpus)]  # enabled
    entries.append(struct.pack("<BBBBII", 1, 12, ncpus, 0, IOAPIC_ADDR, 0))  # GSI base 0
    if legacy:
        entries.append(struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0))  # ISA IRQ 0 -> GSI 2
        entries.append(struct.pack("<BBBBIH", 2, 10, 0, sci, sci, 0x000D))  # SCI: level
    entries.append(struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1))  # all CPUs: LINT1 is NMI
    body = struct.pack("<II", LAPIC_ADDR, 1 if legacy else 0) + b"".join(entries)
    return _sdt(b"APIC", 3, body)


# --- FADT and FACS -------------------------------------------------------------------------

def facs() -> bytes:
    """The Firmware ACPI Control Structure (64 bytes, no checksum; the OS sets the waking
    vector)."""
    return struct.pack("<4sIIIIIBB", b"FACS", 64, 0, 0, 0, 0, 1, 0).ljust(64, b"\0")


def fadt(dsdt_addr: int, facs_addr: int, pm: PmBlock = DEFAULT_PM,
         i8042: bool = True) -> bytes:
    """The Fixed ACPI Description Table, revision 3 (244 bytes; the X_ fields are left 0 so
    the OS uses the 32-bit ones), or revision 5 (268 bytes) for a hardware-reduced
    ``pm``. ``i8042``: IAPC_BOOT_ARCH says a keyboard controller is there (without it, as
    on QEMU's ``microvm``, Linux does not probe one)."""
    body = bytearray((268 if pm.reduced else 244) - 36)

    def put(offset: int, fmt: str, *values: int) -> None:
        struct.pack_into(fmt, body, offset - 36, *values)

    put(36, "<II", facs_addr, dsdt_addr)
    put(45, "<B", 0)  # preferred PM profile: unspecified
    put(48, "<IBBBB", 0, 0, 0, 0, 0)  # SMI_CMD 0: always in ACPI mode
    if not pm.reduced:
        put(46, "<H", pm.sci)
        put(56, "<I", pm.port)  # PM1a_EVT_BLK
        put(64, "<I", pm.port + 4)  # PM1a_CNT_BLK
        put(76, "<I", pm.port + 8 if pm.timer else 0)  # PM_TMR_BLK
        put(88, "<BBBB", 4, 2, 0, 4 if pm.timer else 0)  # PM1_EVT/PM1_CNT/PM2_CNT/PM_TMR_LEN
    put(96, "<HH", 0xFFF, 0xFFF)  # no C2, no C3
    put(108, "<B", 0x32)  # CMOS century register
    put(109, "<H", BOOT_ARCH_LEGACY_DEVICES | (BOOT_ARCH_8042 if i8042 else 0))
    put(112, "<I", FADT_FLAGS | (FADT_HW_REDUCED_ACPI if pm.reduced else 0))
    put(116, "<BBBBQ", 1, 8, 0, 1, RESET_PORT)  # RESET_REG: system IO, 8 bits, byte access
    put(128, "<B", RESET_VALUE)
    if pm.reduced:  # SLEEP_CONTROL_REG, SLEEP_STATUS_REG: system IO, 8 bits, byte access
        put(244, "<BBBBQ", 1, 8, 0, 1, pm.port)
        put(256, "<BBBBQ", 1, 8, 0, 1, pm.port + 1)
    return _sdt(b"FACP", 5 if pm.reduced else 3, bytes(body))


# --- AML (the DSDT) ---------------------------------------------------------------------------

def aml_pkglength(body_len: int) -> bytes:
    """The PkgLength encoding of a package whose contents (after PkgLength) are
    ``body_len`` bytes long; the encoded length counts the PkgLength bytes too."""
    if body_len + 1 < 0x40:
        return bytes([body_len + 1])
    for n in (2, 3, 4):
        total = body_len + n
        if total < 1 << (4 + 8 * (n - 1)):
            out = [((n - 1) << 6) | (total & 0xF)]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(n - 1)]
            return bytes(out)
    raise ValueError(f"AML package too long: {body_len} bytes")


def aml_integer(value: int) -> bytes:
    """The shortest integer encoding (Zero, One, Byte, Word, DWord or QWord constant)."""
    if value == 0:
        return b"\x00"
    if value == 1:
        return b"\x01"
    for op, fmt, limit in ((0x0A, "<B", 0xFF), (0x0B, "<H", 0xFFFF),
                           (0x0C, "<I", 0xFFFFFFFF), (0x0E, "<Q", (1 << 64) - 1)):
        if 0 <= value <= limit:
            return bytes([op]) + struct.pack(fmt, value)
    raise ValueError(f"AML integer out of range: {value}")


def aml_nameseg(name: str) -> bytes:
    seg = name.encode("ascii").ljust(4, b"_")
    if len(seg) != 4:
        raise ValueError(f"AML name segment must be 1-4 characters: {name!r}")
    return seg


def aml_name(name: str, value: bytes) -> bytes:
    """``Name (name, value)`` with an already encoded data object."""
    return b"\x08" + aml_nameseg(name) + value


def aml_string(text: str) -> bytes:
    return b"\x0D" + text.encode("ascii") + b"\x00"


def aml_package(*elements: bytes) -> bytes:
    body = bytes([len(elements)]) + b"".join(elements)
    return b"\x12" + aml_pkglength(len(body)) + body


def aml_buffer(data: bytes) -> bytes:
    body = aml_integer(len(data)) + data
    return b"\x11" + aml_pkglength(len(body)) + body


def aml_device(name: str, *terms: bytes) -> bytes:
    body = aml_nameseg(name) + b"".join(terms)
    return b"\x5B\x82" + aml_pkglength(len(body)) + body


def aml_scope(path: bytes, *terms: bytes) -> bytes:
    body = path + b"".join(terms)
    return b"\x10" + aml_pkglength(len(body)) + body


def res_memory32_fixed(base: int, size: int, writable: bool = True) -> bytes:
    """Memory32Fixed (ReadWrite, base, size) large resource descriptor."""
    return struct.pack("<BHBII", 0x86, 9, 1 if writable else 0, base, size)


def res_io(port: int, size: int) -> bytes:
    """IO (Decode16, port, port, 1, size) small resource descriptor."""
    if not 0 <= port <= 0xFFFF or not 0 < size <= 0xFF:
        raise ValueError(f"IO resource {port:#x}+{size} does not fit a 16-bit descriptor")
    return struct.pack("<BBHHBB", 0x47, 1, port, port, 1, size)


def res_interrupt(gsi: int, *, level: bool = True, active_low: bool = False) -> bytes:
    """Extended Interrupt descriptor: consumer, exclusive, one interrupt number."""
    flags = 0x01 | (0 if level else 0x02) | (0x04 if active_low else 0)
    return struct.pack("<BHBBI", 0x89, 6, flags, 1, gsi)


def resource_template(*descriptors: bytes) -> bytes:
    """A ResourceTemplate buffer: the descriptors and an end tag with checksum 0."""
    return aml_buffer(b"".join(descriptors) + b"\x79\x00")


def dsdt_aml(virtio: list[MmioDevice], pm: PmBlock = DEFAULT_PM) -> bytes:
    """The DSDT's AML: ``_S3_`` (unless disabled), ``_S5_`` and a ``\\_SB_`` device per
    declared firmware node (``VRnn`` virtio-mmio, ``DVnn`` others)."""
    s3 = aml_name("_S3_", aml_package(aml_integer(pm.s3_typ), aml_integer(pm.s3_typ),
                                      aml_integer(0), aml_integer(0))) \
        if pm.s3_typ >= 0 else b""
    s5 = aml_name("_S5_", aml_package(aml_integer(pm.s5_typ), aml_integer(pm.s5_typ),
                                      aml_integer(0), aml_integer(0)))
    devices, counts = [], {"VR": 0, "DV": 0}
    for d in virtio:
        prefix = "VR" if d.hid == VIRTIO_MMIO_HID else "DV"
        i = counts[prefix]
        counts[prefix] += 1
        window = res_io(d.base, d.size) if d.space == "pio" else \
            res_memory32_fixed(d.base, d.size)
        irq = [res_interrupt(d.irq, level=not d.edge)] if d.irq >= 0 else []
        devices.append(aml_device(f"{prefix}{i:02d}", aml_name("_HID", aml_string(d.hid)),
                                  aml_name("_UID", aml_integer(i)),
                                  aml_name("_CRS", resource_template(window, *irq))))
    sb = aml_scope(b"\\_SB_", *devices) if devices else b""
    return s3 + s5 + sb


def dsdt(virtio: list[MmioDevice], pm: PmBlock = DEFAULT_PM) -> bytes:
    """The Differentiated System Description Table (revision 2: 64-bit integers)."""
    return _sdt(b"DSDT", 2, dsdt_aml(virtio, pm))


# --- the whole set ----------------------------------------------------------------------

def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def build(ncpus: int, base: int = ACPI_BASE, virtio: list[MmioDevice] | None = None,
          pm: PmBlock = DEFAULT_PM, i8042: bool = True) -> bytes:
    """All tables as one blob to write at ``base``: RSDP (20 bytes, padded to 32), RSDT,
    FACS (64-byte aligned), DSDT, FADT, MADT."""
    out = bytearray(32)
    rsdt_addr = base + 32
    out += bytes(48)  # the RSDT (44 bytes: 2 entries), filled in below
    facs_off = _align(len(out), 64)
    assert facs_off == FACS_OFFSET
    out += bytes(facs_off - len(out)) + facs()
    dsdt_off = len(out)
    out += dsdt(virtio or [], pm)
    fadt_off = _align(len(out), 16)
    out += bytes(fadt_off - len(out)) + fadt(base + dsdt_off, base + facs_off, pm, i8042)
    madt_off = _align(len(out), 16)
    out += bytes(madt_off - len(out)) + madt(ncpus, pm.sci, legacy=not pm.reduced)
    rsdt = _sdt(b"RSDT", 1, struct.pack("<II", base + fadt_off, base + madt_off))
    out[32:32 + len(rsdt)] = rsdt
    rsdp = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 0, rsdt_addr))
    rsdp[8] = checksum(bytes(rsdp))
    out[0:20] = rsdp
    if len(out) > ACPI_SIZE:
        raise ValueError(f"ACPI tables ({len(out)} bytes) exceed their {ACPI_SIZE:#x}-byte area")
    return bytes(out)


def acpi_devices(machine: Any) -> list[MmioDevice]:
    """What the machine's devices declare for ACPI (``Device.firmware()`` nodes with an
    ``acpi_hid``), in the order they were added; never guessed from class names, so a
    third-party device appears exactly as a built-in one."""
    out = []
    for node in firmware_nodes(getattr(machine, "devices", [])):
        if not node.acpi_hid or node.base + node.size > 1 << 32:
            continue  # Memory32Fixed reaches 4 GiB; nothing to say otherwise
        if node.space == "pio" and (node.base + node.size > 0x10000 or node.size > 0xFF):
            continue
        out.append(MmioDevice(node.base, node.size, node.irq, node.acpi_hid, node.space,
                              node.irq_trigger == "edge"))
    return out


virtio_mmio_devices = acpi_devices
"""The former name (virtio-mmio windows are now one kind of declared node)."""


def pm_block(machine: Any) -> PmBlock:
    """The ``acpi-pm`` device's port, SCI, sleep types, whether it offers its timer and
    whether the machine is hardware-reduced, or the defaults if there is none."""
    for d in getattr(machine, "devices", []):
        if getattr(d, "name", None) == "acpi-pm":
            p = d.params
            return PmBlock(int(p["port"]), int(p["irq"]) if int(p["irq"]) >= 0 else SCI_IRQ,
                           int(p["s5_typ"]), int(p.get("s3_typ", S3_SLP_TYP)),
                           timer=bool(p.get("timer", True)),
                           reduced=bool(p.get("reduced", False)))
    return PmBlock()


def has_i8042(machine: Any) -> bool:
    """Whether a device answers the PC keyboard controller's command port (0x64)."""
    bus = getattr(machine, "bus", None)
    return bus is not None and bus.space("pio").lookup(0x64) is not None


def install(machine: Any, base: int = ACPI_BASE) -> int:
    """Write the tables for ``machine`` (its vCPUs, declared devices, PM block and whether
    it has an i8042); returns the RSDP address."""
    machine.memory.write(base, build(machine.config.cpus, base, acpi_devices(machine),
                                     pm_block(machine), has_i8042(machine)))
    return base


def enabled(machine: Any, default: bool = True) -> bool:
    """The ``acpi`` machine option: ``on``/``off`` (or a boolean); unset (or ``auto``)
    means ``default``: on, as QEMU's firmware always provides the tables."""
    v = str(machine.config.options.get("acpi", "auto")).lower()
    if v in ("auto", "default", ""):
        return default
    if v in ("1", "on", "true", "yes"):
        return True
    if v in ("0", "off", "false", "no"):
        return False
    raise ConfigError(f"option acpi must be on, off or auto, not {v!r}")
