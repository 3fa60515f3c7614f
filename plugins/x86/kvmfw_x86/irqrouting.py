"""GSI routing for the in-kernel irqchip: the PC's, as the firmware tables describe it.

KVM's default table routes GSI ``n`` to PIC pin ``n`` (0-15) and IOAPIC pin ``n`` (0-23), so
the in-kernel PIT's IRQ 0 reaches IOAPIC pin 0. The MP table and the MADT (and every PC
firmware) say ISA IRQ 0 is IOAPIC pin 2 (an interrupt source override); Linux checks that
the timer arrives there, and without it prints ``..MP-BIOS bug: 8254 timer not connected to
IO-APIC`` and falls back to slower timer paths. QEMU (``kvm_pc_setup_irq_routing``) installs
the table below; kvmfw installs the same one.
"""

from __future__ import annotations

from typing import Any

from kvmfw.vm import IRQCHIP_IOAPIC, IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE

IOAPIC_PINS = 24
TIMER_IOAPIC_PIN = 2
"""Where ISA IRQ 0 lands on the IOAPIC (the firmware tables' interrupt source override)."""


def pc_routes() -> list[tuple[int, int, int]]:
    """``(gsi, irqchip, pin)``: ISA IRQs 0-15 on the PICs (GSI 2 is the cascade, not a
    line), GSI 0 on IOAPIC pin 2, GSIs 1 and 3-23 on their own IOAPIC pin."""
    routes = [(i, IRQCHIP_PIC_MASTER, i) for i in range(8) if i != 2]
    routes += [(i, IRQCHIP_PIC_SLAVE, i - 8) for i in range(8, 16)]
    routes.append((0, IRQCHIP_IOAPIC, TIMER_IOAPIC_PIN))
    routes += [(i, IRQCHIP_IOAPIC, i) for i in range(1, IOAPIC_PINS) if i != 2]
    return routes


def install(machine: Any) -> None:
    """Install :func:`pc_routes` on the machine's in-kernel irqchip (after
    ``KVM_CREATE_IRQCHIP``; the table survives irqchip resets)."""
    machine.vm.set_gsi_routing(pc_routes())
