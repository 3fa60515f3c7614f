"""Default boards, published as ``kvmfw.boards`` entry points (``x86``, ``armv8``): the
core builds the board named after the arch when the arch plugin has no
``default_devices`` hook of its own, or the one ``-o board=NAME`` names. No arch plugin
imports this module: any package can contribute a board the same way.

Each function returns ``--device`` strings, so a board is exactly what a user could type.
"""

from __future__ import annotations

X86_PSEUDO_OP_BASE = 0xFFFF0000


def x86_default() -> list[str]:
    """The PC ``kvmfw run`` builds when no ``--device`` is given.

    COM1 16550 at 0x3f8/IRQ 4, the CMOS RTC at 0x70/IRQ 8, the i8042 (for ``reboot=k``),
    fw_cfg at 0x510, the ACPI PM block at 0x600 (SCI on IRQ 9; the x86 plugin's FADT points
    there, and ``poweroff`` ends the run through it), the PCI host bridge (configuration
    space through the x86 plugin's 0xcf8/0xcfc decoding, BAR aperture at 0xc0000000) and
    the pseudo-op window at
    0xffff0000. The in-kernel irqchip and PIT are the x86 plugin's. Debug-exit is only
    added on request (``--device debug-exit``).
    """
    return [
        "uart16550,port=0x3f8,irq=4",
        "cmos-rtc,port=0x70,irq=8",
        "i8042,port=0x60,irq=1,aux_irq=12",
        "fw-cfg,port=0x510",
        "acpi-pm,port=0x600,irq=9",
        "pci-host",
        f"pseudo-op,base={X86_PSEUDO_OP_BASE:#x}",
    ]


def x86_microvm() -> list[str]:
    """A PC without PCI and without an i8042, as QEMU's ``-M microvm,rtc=on``: COM1, the
    CMOS RTC, fw_cfg, hardware-reduced ACPI (the ACPI 5.0 sleep registers for
    ``poweroff``, and a reset through the ACPI reset register: there is no ``reboot=k``
    line) and the pseudo-op window. Disks and consoles are virtio-mmio devices (``--device
    virtio-blk,...``). Linux boots faster on it: no PCI bus to enumerate, no keyboard
    controller to probe (the x86 plugin's FADT then says there is none) and, as on QEMU's
    microvm, no PM timer to verify as a clocksource and no 8259s, 8254 interrupt or PM1
    registers to set up (so COM1 and the RTC are ACPI devices, ``pnp=on``)."""
    return [
        "uart16550,port=0x3f8,irq=4,pnp=on",
        "cmos-rtc,port=0x70,irq=8,pnp=on",
        "fw-cfg,port=0x510",
        "acpi-pm,port=0x600,irq=-1,timer=off,reduced=on",
        f"pseudo-op,base={X86_PSEUDO_OP_BASE:#x}",
    ]


ARMV8_UART_BASE, ARMV8_UART_SPI = 0x09000000, 1
ARMV8_PSEUDO_OP_BASE = 0x10010000  # gem5's arm64 m5ops address, as the armv8 plugin's device tree


def armv8_default() -> list[str]:
    """An ARM ``virt``-like board: PL011 at 0x09000000 (SPI 1) and the pseudo-op window.

    The armv8 plugin describes these in its device tree; it may return its own list.
    """
    return [f"pl011,base={ARMV8_UART_BASE:#x},irq={ARMV8_UART_SPI}",
            f"pseudo-op,base={ARMV8_PSEUDO_OP_BASE:#x}"]


BOARDS = {"x86": x86_default, "armv8": armv8_default}


def x86_board(machine: object) -> list[str]:
    """The ``kvmfw.boards`` entry point ``x86``: :func:`x86_default`."""
    return x86_default()


def microvm_board(machine: object) -> list[str]:
    """The ``kvmfw.boards`` entry point ``microvm`` (``--option board=microvm``, x86 only):
    :func:`x86_microvm`."""
    arch = getattr(machine, "arch", "x86")
    if arch != "x86":
        from kvmfw.errors import ConfigError

        raise ConfigError(f"board=microvm is an x86 board; this machine is {arch} (drop "
                          "--option board=microvm)")
    return x86_microvm()


def armv8_board(machine: object) -> list[str]:
    """The ``kvmfw.boards`` entry point ``armv8``: :func:`armv8_default`."""
    return armv8_default()


def default_devices(arch: str, machine: object = None) -> list[str]:
    """The default board of ``arch`` (what an arch plugin's ``default_devices`` hook calls);
    an unknown arch has no default devices."""
    fn = BOARDS.get(arch)
    return fn() if fn is not None else []
