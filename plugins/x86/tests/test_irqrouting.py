"""GSI routing of the in-kernel irqchip (issue 13): the PIT's IRQ 0 on IOAPIC pin 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import requires_kvm
from kvmfw.vm import IRQCHIP_IOAPIC, IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE

from kvmfw_x86 import irqrouting, loaders

GUESTS = Path(__file__).parent / "guests"


def test_pc_routes_match_qemu_and_the_firmware_tables() -> None:
    routes = irqrouting.pc_routes()
    assert len(routes) == len(set(routes))
    ioapic = {gsi: pin for gsi, chip, pin in routes if chip == IRQCHIP_IOAPIC}
    assert ioapic[0] == 2 and 2 not in ioapic  # ISA IRQ 0 -> pin 2; GSI 2 is no line
    assert all(ioapic[g] == g for g in range(1, 24) if g != 2)
    pic = {(gsi, chip, pin) for gsi, chip, pin in routes if chip != IRQCHIP_IOAPIC}
    assert pic == {(g, IRQCHIP_PIC_MASTER, g) for g in range(8) if g != 2} | {
        (g, IRQCHIP_PIC_SLAVE, g - 8) for g in range(8, 16)}


@requires_kvm
@pytest.mark.parametrize("routed", [True, False], ids=["pc-routing", "kvm-default"])
def test_pit_tick_reaches_ioapic_pin_2(machine_factory, monkeypatch, routed: bool) -> None:
    """The guest unmasks IOAPIC pins 0 (vector 0x31) and 2 (vector 0x30) and reports the
    first PIT tick's vector: 0x30 as on a PC (and under QEMU). With KVM's default table
    (the old kvmfw, reproduced by skipping the install) the tick arrives on pin 0."""
    if not routed:
        monkeypatch.setattr(irqrouting, "install", lambda machine: None)
    m, rep = machine_factory(irqchip="kernel")
    assert (m.vm.gsi_routes == irqrouting.pc_routes()) is routed
    loaders.load(m, str(GUESTS / "pit_ioapic.elf"), {})
    r = m.run(timeout=120)  # a hang guard only: the guest ends the run at the first tick
    assert r.reason == "reporter: guest done"
    assert rep.values == [0x30 if routed else 0x31]


@requires_kvm
def test_irq_lines_still_reach_the_pic_with_the_table(machine_factory) -> None:
    """The 8259 path (real-mode guests, early Linux) is unchanged by the table: the PIT
    guest of test_io_irq sees its ticks as vector 8 through the master PIC."""
    m, rep = machine_factory(irqchip="kernel")
    assert m.vm.gsi_routes == irqrouting.pc_routes()
    loaders.load(m, str(GUESTS / "pit.bin"), {"load_addr": 0x7C00})
    r = m.run(timeout=120)
    assert r.reason == "reporter: guest done"
    assert rep.values == [0x08, 0x08, 2]
