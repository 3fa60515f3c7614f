"""The compiled exit path on x86: Linux-style port 0x80 delays and unclaimed ports are
answered in C; what the plugin answers itself (PCI configuration ports, the userspace
APIC page) never is; the guest sees the same with ``fastpath=off``. A machine without PCI
(the microvm board) has no configuration ports: after the first access they are unclaimed
ports answered in C, and the reset control register 0xCF9 still resets."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import make_machine, requires_kvm
from kvmfw.fastpath import build_entries

from kvmfw_x86 import loaders
from kvmfw_x86.lapic import LAPIC_ADDR

pytestmark = [requires_kvm, pytest.mark.kvm]

GUEST = """
    .code16
    .globl _start
_start:
    mov $50, %cx
1:  out %al, $0x80          /* io_delay, as Linux's */
    loop 1b
    mov $0xcf8, %dx         /* PCI config: 00:03.0 register 0 */
    mov $0x80001800, %eax
    out %eax, %dx
    mov $0xcfc, %dx
    in %dx, %eax
    out %eax, $0xe0
    mov $0x300, %dx         /* nothing there: all ones */
    in %dx, %al
    out %al, $0xe0
    out %al, $0xe4
    hlt
"""


class PciSpace:
    def config_read(self, bus: int, dev: int, fn: int, offset: int, size: int) -> int:
        return 0x10001AF4 if (bus, dev, fn, offset) == (0, 3, 0, 0) else (1 << 8 * size) - 1

    def config_write(self, bus: int, dev: int, fn: int, offset: int, size: int,
                     value: int) -> None:
        pass


NO_PCI_GUEST = """
    .code16
    .globl _start
_start:
    mov $20, %cx
1:  mov $0xcf8, %dx         /* Linux's early scan: address, then vendor/device */
    mov $0x80000000, %eax
    out %eax, %dx
    in %dx, %eax            /* mechanism #1 would give the address back */
    out %eax, $0xe0
    mov $0xcfc, %dx
    in %dx, %eax
    out %eax, $0xe0
    loop 1b
    mov $0xcf9, %dx         /* the reset control register: RST_CPU | SYS_RST */
    mov $6, %al
    out %al, %dx
    out %al, $0xe4          /* not reached: the reset ends the run */
    hlt
"""


def _guest(tmp_path: Path, text: str = GUEST) -> Path:
    src, obj, out = tmp_path / "g.S", tmp_path / "g.o", tmp_path / "g.bin"
    src.write_text(text)
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0x7c00", "--oformat", "binary", "-o",
                    str(out), str(obj)], check=True)
    return out


def test_io_delay_and_unclaimed_ports_in_c_pci_config_in_python(tmp_path: Path) -> None:
    image = _guest(tmp_path)
    seen = {}
    for fast in (True, False):
        m, rep = make_machine(fastpath=fast)
        try:
            m.pci = PciSpace()  # type: ignore[attr-defined]
            loaders.load(m, str(image), {"load_addr": 0x7C00})
            r = m.run(timeout=60)
            cpu = m.cpus[0]
            pio = cpu.x86_port_io.__self__  # the machine's PortIo
            seen[fast] = (r.reason, rep.values, cpu.stats.io, pio.stats["pci_config"],
                          m.bus.pio.unclaimed_writes, m.bus.pio.unclaimed_reads)
            # the 50 delays and the read of port 0x300; never the PCI ports
            assert cpu.stats.fast_exits == (51 if fast else 0)
        finally:
            m.close()
    assert seen[True] == seen[False]
    assert seen[True][1] == [0x10001AF4, 0xFF] and seen[True][3] == 2
    assert seen[True][4:] == (50, 1)


def test_without_pci_the_config_ports_are_unclaimed_and_answered_in_c(tmp_path: Path) -> None:
    image = _guest(tmp_path, NO_PCI_GUEST)
    seen = {}
    for fast in (True, False):
        m, rep = make_machine(fastpath=fast, reboot=False)
        try:
            loaders.load(m, str(image), {"load_addr": 0x7C00})
            r = m.run(timeout=60)
            cpu = m.cpus[0]
            pio = cpu.x86_port_io.__self__
            seen[fast] = (r.reason, rep.values, pio.stats["pci_config"], pio.stats["resets"])
            # the first access decides (in Python); the other 59 and none of 0xCF9 in C
            assert cpu.stats.fast_exits == (59 if fast else 0)
            assert [n for *_, n in m.bus.pio.reserved()] == ["reset-control"]
        finally:
            m.close()
    assert seen[True] == seen[False]
    reason, values, _pci, resets = seen[True]
    assert "reset" in reason and resets == 1
    assert values == [0xFFFFFFFF] * 40  # all ones: no mechanism #1, no device


def test_the_userspace_apic_page_and_pci_ports_are_reserved() -> None:
    m, _rep = make_machine(irqchip="userspace")
    try:
        entries = build_entries(m.bus)
        assert not [e for e in entries if e.space == "mmio" and e.base <= LAPIC_ADDR < e.end]
        assert not [e for e in entries if e.space == "pio" and e.base < 0xD00 and e.end > 0xCF8]
        assert [e for e in entries if e.space == "pio" and e.base <= 0x80 < e.end]
    finally:
        m.close()
