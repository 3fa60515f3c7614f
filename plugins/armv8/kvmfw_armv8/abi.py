"""arm64 KVM ABI: ioctls, vCPU features, vGIC attributes, IRQ-line encoding, PSCI.

Values are from the kernel's UAPI (``<linux/kvm.h>``, ``<asm/kvm.h>`` for arm64). The
structs this plugin needs are tiny and fixed (``struct kvm_vcpu_init`` is a u32 target and
7 u32 feature words; ``struct kvm_mp_state`` one u32), so they are packed with
:mod:`struct` and their ioctl numbers computed from those sizes through the core's
:func:`kvmfw.abi.define_ioctl`; nothing here needs a C compiler.
"""

from __future__ import annotations

import struct

from kvmfw.abi import IOC_NONE, IOC_READ, IOC_WRITE, define_ioctl

VCPU_INIT = struct.Struct("<I7I")
"""``struct kvm_vcpu_init { __u32 target; __u32 features[7]; }``"""
MP_STATE = struct.Struct("<I")
ARM_DEVICE_ADDR = struct.Struct("<QQ")
"""``struct kvm_arm_device_addr { __u64 id; __u64 addr; }``"""

KVM_ARM_VCPU_INIT = define_ioctl("KVM_ARM_VCPU_INIT", IOC_WRITE, 0xAE, VCPU_INIT.size)
KVM_ARM_PREFERRED_TARGET = define_ioctl("KVM_ARM_PREFERRED_TARGET", IOC_READ, 0xAF,
                                        VCPU_INIT.size)
KVM_ARM_VCPU_FINALIZE = define_ioctl("KVM_ARM_VCPU_FINALIZE", IOC_WRITE, 0xC2, 4)
KVM_GET_MP_STATE = define_ioctl("KVM_GET_MP_STATE", IOC_READ, 0x98, MP_STATE.size)
KVM_SET_MP_STATE = define_ioctl("KVM_SET_MP_STATE", IOC_WRITE, 0x99, MP_STATE.size)
KVM_ARM_SET_DEVICE_ADDR = define_ioctl("KVM_ARM_SET_DEVICE_ADDR", IOC_WRITE, 0xAB,
                                       ARM_DEVICE_ADDR.size)
KVM_ARM_VCPU_NONE = IOC_NONE  # re-exported for symmetry

# vCPU feature bits (features[0])
KVM_ARM_VCPU_POWER_OFF = 0
KVM_ARM_VCPU_EL1_32BIT = 1
KVM_ARM_VCPU_PSCI_0_2 = 2
KVM_ARM_VCPU_PMU_V3 = 3
KVM_ARM_VCPU_SVE = 4
KVM_ARM_VCPU_PTRAUTH_ADDRESS = 5
KVM_ARM_VCPU_PTRAUTH_GENERIC = 6

# capabilities (linux/kvm.h)
KVM_CAP_IRQCHIP = 0
KVM_CAP_ONE_REG = 70
KVM_CAP_ARM_PSCI = 87
KVM_CAP_ARM_EL1_32BIT = 93
KVM_CAP_ARM_PSCI_0_2 = 102
KVM_CAP_ARM_USER_IRQ = 147
KVM_CAP_ARM_PMU_V3 = 126
KVM_CAP_ARM_VM_IPA_SIZE = 165
KVM_CAP_ARM_SVE = 170
KVM_CAP_ARM_PTRAUTH_ADDRESS = 171
KVM_CAP_ARM_PTRAUTH_GENERIC = 172
KVM_CAP_ARM_IRQ_LINE_LAYOUT_2 = 174
KVM_CAP_MAX_VCPUS = 66

# in-kernel devices
KVM_DEV_TYPE_ARM_VGIC_V2 = 5
KVM_DEV_TYPE_ARM_VGIC_V3 = 7
KVM_DEV_ARM_VGIC_GRP_ADDR = 0
KVM_DEV_ARM_VGIC_GRP_DIST_REGS = 1
KVM_DEV_ARM_VGIC_GRP_CPU_REGS = 2
KVM_DEV_ARM_VGIC_GRP_NR_IRQS = 3
KVM_DEV_ARM_VGIC_GRP_CTRL = 4
KVM_DEV_ARM_VGIC_GRP_REDIST_REGS = 5
KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS = 6
KVM_DEV_ARM_VGIC_CTRL_INIT = 0
KVM_VGIC_V2_ADDR_TYPE_DIST = 0
KVM_VGIC_V2_ADDR_TYPE_CPU = 1
KVM_VGIC_V3_ADDR_TYPE_DIST = 2
KVM_VGIC_V3_ADDR_TYPE_REDIST = 3
KVM_VGIC_V3_ADDR_TYPE_REDIST_REGION = 5
KVM_ARM_VCPU_PMU_V3_CTRL = 0
KVM_ARM_VCPU_PMU_V3_IRQ = 0
KVM_ARM_VCPU_PMU_V3_INIT = 1

# MP states
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_STOPPED = 5

# KVM_IRQ_LINE encoding on arm64: irq = vcpu2 | type | vcpu | num
KVM_ARM_IRQ_VCPU2_SHIFT = 28
KVM_ARM_IRQ_VCPU2_MASK = 0xF
KVM_ARM_IRQ_TYPE_SHIFT = 24
KVM_ARM_IRQ_TYPE_MASK = 0xF
KVM_ARM_IRQ_VCPU_SHIFT = 16
KVM_ARM_IRQ_VCPU_MASK = 0xFF
KVM_ARM_IRQ_NUM_SHIFT = 0
KVM_ARM_IRQ_NUM_MASK = 0xFFFF
KVM_ARM_IRQ_TYPE_CPU = 0
KVM_ARM_IRQ_TYPE_SPI = 1
KVM_ARM_IRQ_TYPE_PPI = 2
KVM_ARM_IRQ_CPU_IRQ = 0
KVM_ARM_IRQ_CPU_FIQ = 1
GIC_SPI_BASE = 32
"""INTID of SPI 0."""
GIC_PPI_BASE = 16

# system events (kvm_run.system_event.type)
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2

# PSCI 0.2 function ids (SMC64/HVC64 where they take addresses)
PSCI_0_2_FN_PSCI_VERSION = 0x84000000
PSCI_0_2_FN_CPU_OFF = 0x84000002
PSCI_0_2_FN64_CPU_ON = 0xC4000003
PSCI_0_2_FN_SYSTEM_OFF = 0x84000008
PSCI_0_2_FN_SYSTEM_RESET = 0x84000009

# arch timer PPIs as wired by KVM's defaults (INTIDs)
TIMER_PPI_SEC_PHYS = 29
TIMER_PPI_PHYS = 30
TIMER_PPI_VIRT = 27
TIMER_PPI_HYP = 26
PMU_PPI = 23


class IrqLineLayoutError(ValueError):
    """A vCPU index does not fit the kernel's KVM_IRQ_LINE layout."""


def irq_line_number(kind: int, num: int, vcpu: int = 0, layout2: bool = False) -> int:
    """Encode a ``KVM_IRQ_LINE`` irq field (``kind`` is KVM_ARM_IRQ_TYPE_*).

    SPIs take the INTID (>= 32) and no vCPU; PPIs and CPU lines take a vCPU index, whose
    bits above 8 go to the ``vcpu2`` field when the kernel has ``IRQ_LINE_LAYOUT_2``.
    """
    if not 0 <= num <= KVM_ARM_IRQ_NUM_MASK:
        raise IrqLineLayoutError(f"interrupt number {num} out of range")
    if kind == KVM_ARM_IRQ_TYPE_SPI:
        if num < GIC_SPI_BASE:
            raise IrqLineLayoutError(f"SPI INTIDs start at 32, got {num}")
        vcpu = 0
    elif kind == KVM_ARM_IRQ_TYPE_PPI and not GIC_PPI_BASE <= num < GIC_SPI_BASE:
        raise IrqLineLayoutError(f"PPI INTIDs are 16..31, got {num}")
    limit = 1 << (12 if layout2 else 8)
    if not 0 <= vcpu < limit:
        hint = "" if layout2 else " (the kernel lacks KVM_CAP_ARM_IRQ_LINE_LAYOUT_2)"
        raise IrqLineLayoutError(f"vCPU index {vcpu} does not fit the IRQ line layout{hint}")
    return (((vcpu >> 8) & KVM_ARM_IRQ_VCPU2_MASK) << KVM_ARM_IRQ_VCPU2_SHIFT
            | (kind & KVM_ARM_IRQ_TYPE_MASK) << KVM_ARM_IRQ_TYPE_SHIFT
            | (vcpu & KVM_ARM_IRQ_VCPU_MASK) << KVM_ARM_IRQ_VCPU_SHIFT
            | num)


def decode_irq_line(irq: int) -> tuple[int, int, int]:
    """``(kind, vcpu, num)`` of an encoded ``KVM_IRQ_LINE`` irq field."""
    kind = (irq >> KVM_ARM_IRQ_TYPE_SHIFT) & KVM_ARM_IRQ_TYPE_MASK
    vcpu = ((irq >> KVM_ARM_IRQ_VCPU2_SHIFT) & KVM_ARM_IRQ_VCPU2_MASK) << 8 | (
        (irq >> KVM_ARM_IRQ_VCPU_SHIFT) & KVM_ARM_IRQ_VCPU_MASK)
    return kind, vcpu, irq & KVM_ARM_IRQ_NUM_MASK


def mpidr_of(index: int) -> int:
    """The MPIDR affinity KVM gives vCPU ``index`` (Aff0 = low 4 bits, Aff1 = the rest)."""
    return ((index & 0xF) | ((index >> 4) & 0xFF) << 8 | ((index >> 12) & 0xFF) << 16)


def vgic_v3_redist_attr(mpidr: int, offset: int) -> int:
    """``KVM_DEV_ARM_VGIC_GRP_REDIST_REGS`` attr: affinity (Aff3.Aff2.Aff1.Aff0) | offset."""
    aff = ((mpidr >> 32) & 0xFF) << 24 | (mpidr & 0xFFFFFF)
    return aff << 32 | offset
