"""ACPI tables (default for bzImages, ``acpi=on``/``off``): found and parsed the way an OS
does it, from guest RAM; the DSDT's AML read back by a small parser (and by ``iasl -d``)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import GUESTS, bzimage, requires_kvm

from kvmfw_x86 import acpi, loaders, mptable


def find_rsdp(read: Any) -> int | None:
    """Scan 0xE0000-0xFFFFF on 16-byte boundaries for a valid ACPI 1.0 RSDP (as Linux's
    ``acpi_find_root_pointer`` does when there is no EBDA pointer)."""
    area = read(0xE0000, 0x20000)
    for off in range(0, len(area) - 20, 16):
        if area[off:off + 8] == b"RSD PTR " and sum(area[off:off + 20]) & 0xFF == 0:
            return 0xE0000 + off
    return None


def table(read: Any, addr: int) -> bytes:
    length = struct.unpack("<I", read(addr + 4, 4))[0]
    data = read(addr, length)
    assert sum(data) & 0xFF == 0, f"{data[:4]!r} checksum"
    return bytes(data)


def parse_madt(read: Any) -> dict[str, Any]:
    rsdp = find_rsdp(read)
    assert rsdp is not None
    rsdt_addr = struct.unpack("<I", read(rsdp + 16, 4))[0]
    rsdt = table(read, rsdt_addr)
    assert rsdt[:4] == b"RSDT"
    ptrs = struct.unpack(f"<{(len(rsdt) - 36) // 4}I", rsdt[36:])
    madts = [table(read, p) for p in ptrs if read(p, 4) == b"APIC"]
    assert len(madts) == 1
    m = madts[0]
    out: dict[str, Any] = {"lapic_addr": struct.unpack_from("<I", m, 36)[0], "cpus": [],
                           "ioapics": [], "overrides": [], "nmis": 0}
    off = 44
    while off < len(m):
        kind, length = m[off], m[off + 1]
        assert length >= 2 and off + length <= len(m)
        if kind == 0:
            _, apic_id, flags = struct.unpack_from("<BBI", m, off + 2)
            if flags & 1:
                out["cpus"].append(apic_id)
        elif kind == 1:
            out["ioapics"].append(struct.unpack_from("<BxII", m, off + 2))
        elif kind == 2:
            out["overrides"].append(struct.unpack_from("<BBIH", m, off + 2)[1:3])
        elif kind == 4:
            out["nmis"] += 1
        off += length
    return out


@pytest.mark.parametrize("ncpus", [1, 2, 4, 64])
def test_tables_checksum_and_describe_every_cpu(ncpus: int) -> None:
    blob = acpi.build(ncpus)
    mem = bytearray(0x100000)
    mem[acpi.RSDP_ADDR:acpi.RSDP_ADDR + len(blob)] = blob

    def read(a: int, n: int) -> bytes:
        return bytes(mem[a:a + n])

    assert sum(blob[:20]) & 0xFF == 0 and blob[15] == 0  # RSDP, ACPI 1.0
    madt = parse_madt(read)
    assert madt["cpus"] == list(range(ncpus))
    assert madt["lapic_addr"] == mptable.LAPIC_ADDR
    assert madt["ioapics"] == [(ncpus, mptable.IOAPIC_ADDR, 0)]
    assert madt["overrides"] == [(0, 2), (9, 9)] and madt["nmis"] == 1


def rsdt_tables(read: Any) -> dict[bytes, bytes]:
    """Every table the RSDT points at, by signature (checksums checked)."""
    rsdp = find_rsdp(read)
    assert rsdp is not None
    rsdt = table(read, struct.unpack("<I", read(rsdp + 16, 4))[0])
    ptrs = struct.unpack(f"<{(len(rsdt) - 36) // 4}I", rsdt[36:])
    return {read(p, 4): table(read, p) for p in ptrs}


class Aml:
    """Enough of an AML parser for the DSDT kvmfw writes: Scope, Device, Name with
    integers, strings, packages and buffers. ``names`` maps absolute paths to values."""

    def __init__(self, code: bytes) -> None:
        self.code = code
        self.names: dict[str, Any] = {}
        self.devices: list[str] = []
        self._terms(0, len(code), "\\")

    def _pkglen(self, at: int) -> tuple[int, int]:
        lead = self.code[at]
        n = lead >> 6
        if n == 0:
            return lead & 0x3F, at + 1
        value = lead & 0x0F
        for i in range(n):
            value |= self.code[at + 1 + i] << (4 + 8 * i)
        return value, at + 1 + n

    def _nameseg(self, at: int) -> tuple[str, int]:
        return self.code[at:at + 4].decode(), at + 4

    def _data(self, at: int) -> tuple[Any, int]:
        op = self.code[at]
        if op in (0x00, 0x01):
            return op, at + 1
        if op == 0xFF:
            return (1 << 64) - 1, at + 1
        sizes = {0x0A: "<B", 0x0B: "<H", 0x0C: "<I", 0x0E: "<Q"}
        if op in sizes:
            return struct.unpack_from(sizes[op], self.code, at + 1)[0], \
                at + 1 + struct.calcsize(sizes[op])
        if op == 0x0D:
            end = self.code.index(b"\0", at + 1)
            return self.code[at + 1:end].decode(), end + 1
        if op == 0x12:  # Package
            length, body = self._pkglen(at + 1)
            end = at + 1 + length
            count, cur, items = self.code[body], body + 1, []
            while cur < end:
                item, cur = self._data(cur)
                items.append(item)
            assert cur == end and len(items) == count
            return items, end
        if op == 0x11:  # Buffer
            length, body = self._pkglen(at + 1)
            end = at + 1 + length
            size, cur = self._data(body)
            data = self.code[cur:end]
            assert len(data) == size
            return bytes(data), end
        raise AssertionError(f"unexpected AML opcode {op:#x} at {at:#x}")

    def _terms(self, at: int, end: int, scope: str) -> None:
        sep = "" if scope == "\\" else "."
        while at < end:
            op = self.code[at]
            if op == 0x08:  # Name
                name, cur = self._nameseg(at + 1)
                value, at = self._data(cur)
                self.names[f"{scope}{sep}{name}"] = value
            elif op == 0x10:  # Scope
                length, cur = self._pkglen(at + 1)
                assert self.code[cur] == 0x5C, "kvmfw's scopes are absolute"
                name, cur = self._nameseg(cur + 1)
                self._terms(cur, at + 1 + length, "\\" + name)
                at += 1 + length
            elif self.code[at:at + 2] == b"\x5B\x82":  # Device
                length, cur = self._pkglen(at + 2)
                name, cur = self._nameseg(cur)
                path = f"{scope}{sep}{name}"
                self.devices.append(path)
                self._terms(cur, at + 2 + length, path)
                at += 2 + length
            else:
                raise AssertionError(f"unexpected AML opcode {op:#x} at {at:#x}")
        assert at == end, "a package overran its PkgLength"


def resources(buf: bytes) -> list[tuple[str, Any]]:
    """Decode a _CRS buffer: Memory32Fixed, IO and Extended Interrupt descriptors, end
    tag."""
    out: list[tuple[str, Any]] = []
    at = 0
    while True:
        tag = buf[at]
        if tag == 0x79:
            assert sum(buf[:at + 2]) & 0xFF == 0 or buf[at + 1] == 0
            assert at + 2 == len(buf)
            return out
        if tag == 0x47:  # IO (Decode16, min, max, alignment, length)
            decode, lo, hi, align, length = struct.unpack_from("<BHHBB", buf, at + 1)
            assert decode == 1 and lo == hi and align == 1
            out.append(("io", (lo, length)))
            at += 8
            continue
        assert tag & 0x80, "only IO among the small descriptors expected"
        length = struct.unpack_from("<H", buf, at + 1)[0]
        body = buf[at + 3:at + 3 + length]
        if tag == 0x86:
            rw, base, size = struct.unpack_from("<BII", body)
            out.append(("mem32", (base, size, bool(rw & 1))))
        elif tag == 0x89:
            flags, count = body[0], body[1]
            gsis = struct.unpack_from(f"<{count}I", body, 2)
            out.append(("irq", (gsis, "level" if not flags & 2 else "edge",
                                "low" if flags & 4 else "high", bool(flags & 1))))
        else:
            raise AssertionError(f"unexpected resource descriptor {tag:#x}")
        at += 3 + length


VIRTIO = [acpi.MmioDevice(0xD0000000, 0x200, 5), acpi.MmioDevice(0xD0000200, 0x200, 10)]


def _mem_with(blob: bytes, base: int = acpi.ACPI_BASE) -> Any:
    mem = bytearray(0x100000)
    mem[base:base + len(blob)] = blob
    return lambda a, n: bytes(mem[a:a + n])


def test_fadt_points_at_the_pm_block_dsdt_and_facs() -> None:
    read = _mem_with(acpi.build(2, virtio=VIRTIO))
    t = rsdt_tables(read)
    assert set(t) == {b"FACP", b"APIC"}
    f = t[b"FACP"]
    assert len(f) == 244 and f[8] == 3
    facs_addr, dsdt_addr = struct.unpack_from("<II", f, 36)
    assert facs_addr % 64 == 0 and read(facs_addr, 4) == b"FACS"
    assert struct.unpack("<I", read(facs_addr + 4, 4))[0] == 64
    assert table(read, dsdt_addr)[:4] == b"DSDT"
    assert struct.unpack_from("<HI", f, 46) == (9, 0)  # SCI_INT 9, SMI_CMD 0: ACPI mode
    assert struct.unpack_from("<I", f, 56)[0] == 0x600  # PM1a_EVT_BLK
    assert struct.unpack_from("<I", f, 64)[0] == 0x604  # PM1a_CNT_BLK
    assert struct.unpack_from("<I", f, 76)[0] == 0x608  # PM_TMR_BLK
    assert tuple(f[88:92]) == (4, 2, 0, 4)  # PM1_EVT_LEN, PM1_CNT_LEN, PM2, PM_TMR_LEN
    assert struct.unpack_from("<H", f, 109)[0] & 3 == 3  # legacy devices, 8042
    flags = struct.unpack_from("<I", f, 112)[0]
    assert flags & acpi.FADT_WBINVD and flags & acpi.FADT_PROC_C1
    assert not flags & (1 << 8), "the PM timer is 24 bits wide (TMR_VAL_EXT clear)"
    assert not flags & (1 << 20), "not a hardware-reduced machine"


def test_a_pm_block_without_its_timer_leaves_it_out_of_the_fadt() -> None:
    f = acpi.fadt(0x1000, 0x2000, acpi.PmBlock(timer=False))
    assert struct.unpack_from("<II", f, 56) == (0x600, 0)  # PM1a_EVT_BLK, PM1b_EVT_BLK
    assert struct.unpack_from("<I", f, 76)[0] == 0  # PM_TMR_BLK
    assert tuple(f[88:92]) == (4, 2, 0, 0)  # no PM_TMR_LEN: Linux has no acpi_pm clocksource


def test_dsdt_aml_parses_back_to_s5_and_the_virtio_devices() -> None:
    read = _mem_with(acpi.build(1, virtio=VIRTIO))
    f = rsdt_tables(read)[b"FACP"]
    dsdt = table(read, struct.unpack_from("<I", f, 40)[0])
    aml = Aml(dsdt[36:])
    assert aml.names["\\_S5_"][:2] == [acpi.S5_SLP_TYP, acpi.S5_SLP_TYP]
    assert aml.devices == ["\\_SB_.VR00", "\\_SB_.VR01"]
    for i, d in enumerate(VIRTIO):
        dev = f"\\_SB_.VR{i:02d}"
        assert aml.names[f"{dev}._HID"] == "LNRO0005"
        assert aml.names[f"{dev}._UID"] == i
        assert resources(aml.names[f"{dev}._CRS"]) == [
            ("mem32", (d.base, d.size, True)), ("irq", ((d.irq,), "level", "high", True))]


def test_hardware_reduced_fadt_madt_and_isa_devices_as_qemu_microvm() -> None:
    """``PmBlock(reduced=True)``: a revision 5 FADT with HW_REDUCED_ACPI and the sleep
    registers in place of the PM1 blocks, timer and SCI; a MADT without PCAT_COMPAT and
    ISA overrides; COM1 and the RTC as PNP devices with IO windows and edge IRQs."""
    isa = [acpi.MmioDevice(0x3F8, 8, 4, "PNP0501", "pio", edge=True),
           acpi.MmioDevice(0x70, 2, 8, "PNP0B00", "pio", edge=True)]
    read = _mem_with(acpi.build(2, virtio=isa + VIRTIO[:1],
                                pm=acpi.PmBlock(0x600, timer=False, reduced=True), i8042=False))
    t = rsdt_tables(read)
    f = t[b"FACP"]
    assert len(f) == 268 and f[8] == 5
    assert struct.unpack_from("<I", f, 112)[0] & acpi.FADT_HW_REDUCED_ACPI
    assert struct.unpack_from("<HI", f, 46) == (0, 0)  # no SCI, no SMI command port
    assert struct.unpack_from("<IIII", f, 56) == (0, 0, 0, 0)  # no PM1a/b event/control
    assert struct.unpack_from("<I", f, 76)[0] == 0 and tuple(f[88:92]) == (0, 0, 0, 0)
    assert struct.unpack_from("<BBBBQ", f, 244) == (1, 8, 0, 1, 0x600)  # SLEEP_CONTROL_REG
    assert struct.unpack_from("<BBBBQ", f, 256) == (1, 8, 0, 1, 0x601)  # SLEEP_STATUS_REG
    assert struct.unpack_from("<BBBBQ", f, 116) == (1, 8, 0, 1, 0xCF9) and f[128] == 6
    m = parse_madt(read)
    assert m["cpus"] == [0, 1] and m["overrides"] == [] and m["nmis"] == 1
    assert struct.unpack_from("<I", t[b"APIC"], 40)[0] == 0  # no PCAT_COMPAT: no 8259s
    aml = Aml(table(read, struct.unpack_from("<I", f, 40)[0])[36:])
    assert aml.names["\\_S5_"][:2] == [0, 0] and aml.names["\\_S3_"][:2] == [1, 1]
    assert aml.names["\\_SB_.DV00._HID"] == "PNP0501"
    assert resources(aml.names["\\_SB_.DV00._CRS"]) == [
        ("io", (0x3F8, 8)), ("irq", ((4,), "edge", "high", True))]
    assert aml.names["\\_SB_.DV01._HID"] == "PNP0B00"
    assert resources(aml.names["\\_SB_.DV01._CRS"]) == [
        ("io", (0x70, 2)), ("irq", ((8,), "edge", "high", True))]
    assert aml.names["\\_SB_.VR00._HID"] == "LNRO0005"
    full = rsdt_tables(_mem_with(acpi.build(2)))  # the PC's tables are as before
    assert full[b"FACP"][8] == 3 and struct.unpack_from("<I", full[b"APIC"], 40)[0] == 1


def test_fadt_reset_register_and_s3_as_qemu_pc() -> None:
    """The FADT offers the reset register (0xCF9 <- 6, RESET_REG_SUP) and the DSDT an
    ``_S3_`` of type 1, as QEMU's ``pc``; the FACS is where the x86 plugin looks for the
    waking vector."""
    read = _mem_with(acpi.build(1))
    f = rsdt_tables(read)[b"FACP"]
    assert struct.unpack_from("<I", f, 112)[0] & (1 << 10)  # RESET_REG_SUP
    assert struct.unpack_from("<BBBBQ", f, 116) == (1, 8, 0, 1, 0xCF9)
    assert f[128] == 6
    assert struct.unpack_from("<I", f, 36)[0] == acpi.ACPI_BASE + acpi.FACS_OFFSET
    aml = Aml(table(read, struct.unpack_from("<I", f, 40)[0])[36:])
    assert aml.names["\\_S3_"][:2] == [1, 1]
    assert "\\_S3_" not in Aml(acpi.dsdt_aml([], acpi.PmBlock(s3_typ=-1))).names


def test_dsdt_without_devices_still_offers_s5() -> None:
    aml = Aml(acpi.dsdt_aml([]))
    assert aml.devices == [] and "\\_S5_" in aml.names


@pytest.mark.parametrize("n", [0, 1, 0x3E, 0x3F, 0x40, 0xFFF, 0x1000, 0xFFFFF])
def test_pkglength_encoding_round_trips(n: int) -> None:
    enc = acpi.aml_pkglength(n)
    aml = Aml.__new__(Aml)
    aml.code = enc
    value, end = aml._pkglen(0)
    assert value == n + len(enc) and end == len(enc)


def test_many_devices_need_multi_byte_pkglengths_and_still_parse() -> None:
    many = [acpi.MmioDevice(0xD0000000 + i * 0x200, 0x200, 5 + i % 8) for i in range(12)]
    aml = Aml(acpi.dsdt_aml(many))
    assert len(aml.devices) == 12 and aml.names["\\_SB_.VR11._UID"] == 11


@pytest.mark.skipif(shutil.which("iasl") is None,
                    reason="iasl (Debian package acpica-tools) is not installed")
def test_iasl_decompiles_the_dsdt(tmp_path: Path) -> None:
    blob = acpi.dsdt(VIRTIO)
    (tmp_path / "dsdt.dat").write_bytes(blob)
    r = subprocess.run(["iasl", "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert "Name (_S5, Package (0x04)" in dsl
    assert dsl.count('Name (_HID, "LNRO0005")') == 2
    assert "Memory32Fixed (ReadWrite,\n" in dsl and "0xD0000200" in dsl
    assert "Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, )" in dsl
    assert "0x0000000A," in dsl


@requires_kvm
@pytest.mark.kvm
@pytest.mark.parametrize("guest", ["smp.elf", "multiboot.elf", "long64.elf"])
def test_elf_and_multiboot_guests_get_acpi_unless_off(machine_factory: Any, guest: str) -> None:
    """QEMU's firmware always provides ACPI tables: ELF and multiboot guests get them by
    default (they used to get none), ``acpi=off`` leaves them out."""
    for opt, want in (("on", True), ("off", False), (None, True), (False, False)):
        m, _ = machine_factory(cpus=4, **({} if opt is None else {"acpi": opt}))
        loaders.load(m, str(GUESTS / guest), {})
        read = m.memory.read
        assert read(mptable.MP_TABLE_ADDR, 4) == b"_MP_"
        if want:
            assert parse_madt(read)["cpus"] == [0, 1, 2, 3]
        else:
            assert find_rsdp(read) is None


@requires_kvm
@pytest.mark.kvm
def test_bzimage_gets_acpi_describing_the_machine(machine_factory: Any,
                                                  tmp_path: Path) -> None:
    pytest.importorskip("kvmfw_devices", reason="the devices plugin is not installed")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    k = tmp_path / "bzImage"
    k.write_bytes(bzimage())
    m, _ = machine_factory(cpus=2)
    m.add_device_spec("acpi-pm,port=0xb000,irq=10")
    m.add_device_spec(f"virtio-blk,file={disk},base=0xd0001000,irq=6")
    loaders.load(m, str(k), {"cmdline": "console=ttyS0"})
    read = m.memory.read
    t = rsdt_tables(read)
    assert parse_madt(read)["cpus"] == [0, 1]
    f = t[b"FACP"]
    assert struct.unpack_from("<HI", f, 46) == (10, 0)
    assert struct.unpack_from("<I", f, 56)[0] == 0xB000
    aml = Aml(table(read, struct.unpack_from("<I", f, 40)[0])[36:])
    assert aml.devices == ["\\_SB_.VR00"]
    assert resources(aml.names["\\_SB_.VR00._CRS"]) == [
        ("mem32", (0xD0001000, 0x200, True)), ("irq", ((6,), "level", "high", True))]
    # the e820 map reserves the tables (0xE0000-0xFFFFF), the MP tables are there too
    bp = read(loaders.BOOT_PARAMS_ADDR, 4096)
    e820 = [struct.unpack_from("<QQI", bp, 0x2D0 + i * 20) for i in range(bp[0x1E8])]
    assert (0xE0000, 0x20000, 2) in e820
    assert read(mptable.MP_TABLE_ADDR, 4) == b"_MP_"

    assert struct.unpack_from("<H", f, 109)[0] == 1  # legacy devices; no i8042 on port 0x64

    m2, _ = machine_factory(acpi="off")
    loaders.load(m2, str(k), {"cmdline": "console=ttyS0"})
    assert find_rsdp(m2.memory.read) is None

    m3, _ = machine_factory()
    m3.add_device_spec("i8042,port=0x60,irq=1,aux_irq=12")
    loaders.load(m3, str(k), {"cmdline": "console=ttyS0"})
    f3 = rsdt_tables(m3.memory.read)[b"FACP"]
    assert struct.unpack_from("<H", f3, 109)[0] == 3  # legacy devices, 8042
    assert struct.unpack_from("<I", f, 76)[0] == 0xB008  # the device's PM timer ...

    m4, _ = machine_factory()
    m4.add_device_spec("acpi-pm,port=0x600,irq=9,timer=off")  # ... unless it is off
    loaders.load(m4, str(k), {"cmdline": "console=ttyS0"})
    f4 = rsdt_tables(m4.memory.read)[b"FACP"]
    assert struct.unpack_from("<I", f4, 76)[0] == 0 and f4[91] == 0

    m5, _ = machine_factory(cpus=2)  # the microvm board's: hardware-reduced, ISA in ACPI
    for spec in ("uart16550,port=0x3f8,irq=4,pnp=on", "cmos-rtc,port=0x70,irq=8,pnp=on",
                 "acpi-pm,port=0x600,irq=-1,timer=off,reduced=on"):
        m5.add_device_spec(spec)
    loaders.load(m5, str(k), {"cmdline": "console=ttyS0"})
    t5 = rsdt_tables(m5.memory.read)
    assert t5[b"FACP"][8] == 5 and struct.unpack_from("<Q", t5[b"FACP"], 248)[0] == 0x600
    assert parse_madt(m5.memory.read)["overrides"] == []
    aml5 = Aml(table(m5.memory.read, struct.unpack_from("<I", t5[b"FACP"], 40)[0])[36:])
    assert [aml5.names[f"{d}._HID"] for d in aml5.devices] == ["PNP0501", "PNP0B00"]


@requires_kvm
@pytest.mark.kvm
def test_acpi_option_refuses_unknown_values(machine_factory: Any) -> None:
    from kvmfw.errors import ConfigError

    m, _ = machine_factory(acpi="maybe")
    with pytest.raises(ConfigError, match="acpi must be on, off or auto"):
        loaders.load(m, str(GUESTS / "prot32.elf"), {})
