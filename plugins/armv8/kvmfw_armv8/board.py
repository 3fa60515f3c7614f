"""The kvmfw ARMv8 board: memory map, configuration and device-tree generation.

The map follows QEMU's ``virt`` board so stock arm64 kernels find what they expect:

==============  ===============================================
0x0800_0000     GIC distributor (64 KiB); GICv2 CPU interface at +0x1_0000
0x080A_0000     GICv3 redistributors, 128 KiB per vCPU
0x0900_0000     PL011 UART, SPI 1
0x0A00_0000     virtio-mmio slots, 0x200 apart, SPI 16 + slot
0x1001_0000     kvmfw pseudo-op window (gem5's m5ops address)
0x4000_0000     RAM
==============  ===============================================
"""

from __future__ import annotations

from typing import Any

import fdt

from kvmfw.device import FirmwareNode
from kvmfw.device import firmware_nodes as declared_nodes
from kvmfw.errors import ConfigError
from kvmfw.record import Record
from kvmfw_armv8 import abi

RAM_BASE = 0x4000_0000
GICD_BASE, GICD_SIZE = 0x0800_0000, 0x1_0000
GICC_BASE, GICC_SIZE = 0x0801_0000, 0x2000
GICR_BASE, GICR_STRIDE = 0x080A_0000, 0x2_0000
GICR_LIMIT = 0x0900_0000
UART_BASE, UART_SIZE, UART_SPI = 0x0900_0000, 0x1000, 1
VIRTIO_BASE, VIRTIO_STRIDE, VIRTIO_SPI0 = 0x0A00_0000, 0x200, 16
PSEUDO_OP_BASE = 0x1001_0000
NR_IRQS = 256
"""Interrupt IDs the vGIC has: 32 private + 224 SPIs."""
MAX_CPUS_GICV3 = (GICR_LIMIT - GICR_BASE) // GICR_STRIDE
MAX_CPUS_GICV2 = 8

FEATURES = ("pmu", "sve", "pauth", "el1_32bit")
GIC_CHOICES = ("v3", "v2", "auto", "none")


class BoardConfig(Record):
    """The ARMv8 options of ``MachineConfig.options``.

    ``gic``: ``v3`` (default), ``v2``, ``auto`` (v3, else v2) or ``none`` (no in-kernel
    irqchip; interrupts go to the vCPU's IRQ line). ``arm_features``: any of ``pmu``,
    ``sve``, ``pauth``, ``el1_32bit`` (list or comma-separated string). ``psci``: PSCI 0.2
    (default True).
    """

    def __init__(self, gic: str = "v3", features: frozenset[str] = frozenset(),
                 psci: bool = True) -> None:
        self.gic = gic
        self.features = features
        self.psci = psci

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> BoardConfig:
        gic = str(options.get("gic", "v3")).lower()
        if gic not in GIC_CHOICES:
            raise ConfigError(f"gic={gic!r}: choose one of {', '.join(GIC_CHOICES)}")
        raw = options.get("arm_features", ())
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        feats = frozenset(f.strip().lower() for f in items if f.strip())
        bad = feats - set(FEATURES)
        if bad:
            raise ConfigError(f"unknown arm_features {sorted(bad)} (known: {', '.join(FEATURES)})")
        return cls(gic=gic, features=feats, psci=bool(options.get("psci", True)))


class DeviceTreeSpec(Record):
    """Everything the generated device tree describes. ``virtio``: virtio-mmio slot
    numbers to describe; ``devices``: what the machine's devices declare
    (:func:`firmware_nodes`): each ``mmio`` node with a ``compatible`` becomes a node; the
    first ``pl011`` is the console (``stdout-path``). ``kaslr_seed``: the ``/chosen``
    ``kaslr-seed`` the kernel randomizes its address with (nonzero; None: none, and the
    kernel runs where it is loaded), as QEMU's ``virt`` board gives one."""

    def __init__(self, ram_base: int, ram_size: int, mpidrs: list[int], gic: str = "v3",
                 cmdline: str = "", initrd: tuple[int, int] | None = None, uart: bool = True,
                 pmu: bool = False, virtio: list[int] | None = None,
                 devices: list[FirmwareNode] | None = None, psci_method: str = "hvc",
                 kaslr_seed: int | None = None) -> None:
        self.ram_base = ram_base
        self.ram_size = ram_size
        self.mpidrs = mpidrs
        self.gic = gic
        self.cmdline = cmdline
        self.initrd = initrd
        self.uart = uart
        self.pmu = pmu
        self.virtio: list[int] = [] if virtio is None else virtio
        self.devices: list[FirmwareNode] = [] if devices is None else devices
        self.psci_method = psci_method
        self.kaslr_seed = kaslr_seed


PHANDLE_GIC = 1
PHANDLE_CLK = 2
_IRQ_TYPE_LEVEL_HI = 4
_IRQ_TYPE_EDGE_RISING = 1
_PPI_FLAGS = 0xF04  # all CPUs, level-high (the gicv3 binding ignores the CPU mask)


def _cells64(*values: int) -> list[int]:
    out = []
    for v in values:
        out += [(v >> 32) & 0xFFFFFFFF, v & 0xFFFFFFFF]
    return out


def build_fdt(spec: DeviceTreeSpec) -> fdt.FDT:
    """The device tree of the board as an :class:`fdt.FDT` object."""
    root = fdt.Node("/")
    root.append(fdt.PropStrings("compatible", "linux,dummy-virt"))
    root.append(fdt.PropStrings("model", "kvmfw-armv8"))
    root.append(fdt.PropWords("#address-cells", 2))
    root.append(fdt.PropWords("#size-cells", 2))
    if spec.gic != "none":
        root.append(fdt.PropWords("interrupt-parent", PHANDLE_GIC))

    nodes = [n for n in spec.devices if n.space == "mmio" and n.compatible]
    pl011s = [n for n in nodes if n.kind == "pl011"]
    chosen = fdt.Node("chosen")
    if spec.cmdline:
        chosen.append(fdt.PropStrings("bootargs", spec.cmdline))
    if pl011s:
        chosen.append(fdt.PropStrings("stdout-path", f"/{_node_name(pl011s[0])}"))
    elif spec.uart:
        chosen.append(fdt.PropStrings("stdout-path", f"/pl011@{UART_BASE:x}"))
    if spec.initrd is not None:
        chosen.append(fdt.PropWords("linux,initrd-start", *_cells64(spec.initrd[0])))
        chosen.append(fdt.PropWords("linux,initrd-end", *_cells64(spec.initrd[1])))
    if spec.kaslr_seed:
        chosen.append(fdt.PropWords("kaslr-seed", *_cells64(spec.kaslr_seed)))
    root.append(chosen)

    mem = fdt.Node(f"memory@{spec.ram_base:x}")
    mem.append(fdt.PropStrings("device_type", "memory"))
    mem.append(fdt.PropWords("reg", *_cells64(spec.ram_base, spec.ram_size)))
    root.append(mem)

    cpus = fdt.Node("cpus")
    cpus.append(fdt.PropWords("#address-cells", 1))
    cpus.append(fdt.PropWords("#size-cells", 0))
    for mpidr in spec.mpidrs:
        aff = mpidr & 0xFFFFFF
        cpu = fdt.Node(f"cpu@{aff:x}")
        cpu.append(fdt.PropStrings("device_type", "cpu"))
        cpu.append(fdt.PropStrings("compatible", "arm,armv8"))
        cpu.append(fdt.PropWords("reg", aff))
        cpu.append(fdt.PropStrings("enable-method", "psci"))
        cpus.append(cpu)
    root.append(cpus)

    psci = fdt.Node("psci")
    psci.append(fdt.PropStrings("compatible", "arm,psci-0.2", "arm,psci"))
    psci.append(fdt.PropStrings("method", spec.psci_method))
    root.append(psci)

    if spec.gic in ("v3", "v2"):
        intc = fdt.Node(f"intc@{GICD_BASE:x}")
        if spec.gic == "v3":
            intc.append(fdt.PropStrings("compatible", "arm,gic-v3"))
            intc.append(fdt.PropWords("#redistributor-regions", 1))
            intc.append(fdt.PropWords("reg", *_cells64(GICD_BASE, GICD_SIZE, GICR_BASE,
                                                       GICR_STRIDE * len(spec.mpidrs))))
        else:
            intc.append(fdt.PropStrings("compatible", "arm,cortex-a15-gic"))
            intc.append(fdt.PropWords("reg", *_cells64(GICD_BASE, GICD_SIZE, GICC_BASE,
                                                       GICC_SIZE)))
        intc.append(fdt.PropWords("#interrupt-cells", 3))
        intc.append(fdt.PropWords("#address-cells", 2))
        intc.append(fdt.PropWords("#size-cells", 2))
        intc.append(fdt.Property("ranges"))
        intc.append(fdt.Property("interrupt-controller"))
        intc.append(fdt.PropWords("phandle", PHANDLE_GIC))
        root.append(intc)

    timer = fdt.Node("timer")
    timer.append(fdt.PropStrings("compatible", "arm,armv8-timer"))
    ppis = [abi.TIMER_PPI_SEC_PHYS, abi.TIMER_PPI_PHYS, abi.TIMER_PPI_VIRT, abi.TIMER_PPI_HYP]
    cells: list[int] = []
    for intid in ppis:
        cells += [1, intid - abi.GIC_PPI_BASE, _PPI_FLAGS]
    timer.append(fdt.PropWords("interrupts", *cells))
    timer.append(fdt.Property("always-on"))
    root.append(timer)

    if spec.pmu:
        pmu = fdt.Node("pmu")
        pmu.append(fdt.PropStrings("compatible", "arm,armv8-pmuv3"))
        pmu.append(fdt.PropWords("interrupts", 1, abi.PMU_PPI - abi.GIC_PPI_BASE, _PPI_FLAGS))
        root.append(pmu)

    if spec.uart or pl011s:
        clk = fdt.Node("apb-pclk")
        clk.append(fdt.PropStrings("compatible", "fixed-clock"))
        clk.append(fdt.PropWords("#clock-cells", 0))
        clk.append(fdt.PropWords("clock-frequency", 24_000_000))
        clk.append(fdt.PropStrings("clock-output-names", "clk24mhz"))
        clk.append(fdt.PropWords("phandle", PHANDLE_CLK))
        root.append(clk)
    if spec.uart and not pl011s:
        uart = fdt.Node(f"pl011@{UART_BASE:x}")
        uart.append(fdt.PropStrings("compatible", "arm,pl011", "arm,primecell"))
        uart.append(fdt.PropWords("reg", *_cells64(UART_BASE, UART_SIZE)))
        uart.append(fdt.PropWords("interrupts", 0, UART_SPI, _IRQ_TYPE_LEVEL_HI))
        uart.append(fdt.PropWords("clocks", PHANDLE_CLK, PHANDLE_CLK))
        uart.append(fdt.PropStrings("clock-names", "uartclk", "apb_pclk"))
        root.append(uart)

    for slot in spec.virtio:
        base = VIRTIO_BASE + slot * VIRTIO_STRIDE
        vio = fdt.Node(f"virtio_mmio@{base:x}")
        vio.append(fdt.PropStrings("compatible", "virtio,mmio"))
        vio.append(fdt.PropWords("reg", *_cells64(base, VIRTIO_STRIDE)))
        vio.append(fdt.PropWords("interrupts", 0, VIRTIO_SPI0 + slot, _IRQ_TYPE_EDGE_RISING))
        vio.append(fdt.Property("dma-coherent"))
        root.append(vio)

    for node in nodes:
        root.append(_device_node(node))

    return _make(root, spec)


def _node_name(node: FirmwareNode) -> str:
    return f"{node.node_name or node.kind}@{node.base:x}"


def _device_node(node: FirmwareNode) -> fdt.Node:
    """A declared device: compatible, reg, the SPI and, for a PL011, its clocks."""
    out = fdt.Node(_node_name(node))
    out.append(fdt.PropStrings("compatible", *node.compatible))
    out.append(fdt.PropWords("reg", *_cells64(node.base, node.size)))
    if node.irq >= 0:
        trigger = _IRQ_TYPE_LEVEL_HI if node.irq_trigger == "level" else _IRQ_TYPE_EDGE_RISING
        out.append(fdt.PropWords("interrupts", 0, node.irq, trigger))
    if node.kind == "pl011":
        out.append(fdt.PropWords("clocks", PHANDLE_CLK, PHANDLE_CLK))
        out.append(fdt.PropStrings("clock-names", "uartclk", "apb_pclk"))
    if node.dma_coherent:
        out.append(fdt.Property("dma-coherent"))
    for key, value in node.properties:
        out.append(fdt.PropWords(key, value) if isinstance(value, int)
                   else fdt.PropStrings(key, value))
    return out


def firmware_nodes(devices: list[Any]) -> list[FirmwareNode]:
    """What ``devices`` declare (:func:`kvmfw.device.firmware_nodes`), without the nodes
    the SPI range cannot carry."""
    return [node for node in declared_nodes(devices) if node.irq < NR_IRQS - 32]


def _make(root: fdt.Node, spec: DeviceTreeSpec) -> fdt.FDT:
    tree = fdt.FDT()
    tree.root = root
    tree.header.boot_cpuid_phys = spec.mpidrs[0] & 0xFFFFFF if spec.mpidrs else 0
    return tree


def build_dtb(spec: DeviceTreeSpec) -> bytes:
    """The flattened device tree blob (version 17) of the board."""
    return bytes(build_fdt(spec).to_dtb(version=17))
