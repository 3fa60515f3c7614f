"""x86 KVM ioctls, numbered from this package's compiled struct sizes."""

from __future__ import annotations

from typing import Any

from kvmfw.abi import IOC_READ, IOC_WRITE, address_of, define_ioctl

from kvmfw_x86._x86 import ffi, lib

__all__ = ["ffi", "lib", "addr", "X"]

_R, _W, _RW = IOC_READ, IOC_WRITE, IOC_READ | IOC_WRITE


def addr(cdata: Any) -> int:
    """Address of a cffi buffer of this module (for ``VCpu.ioctl``)."""
    return address_of(cdata, ffi)


class X:
    """The x86 ioctl numbers (``X.KVM_GET_REGS``)."""

    KVM_GET_MSR_INDEX_LIST = define_ioctl("KVM_GET_MSR_INDEX_LIST", _RW, 0x02,
                                          "struct kvm_msr_list", ffi)
    KVM_GET_SUPPORTED_CPUID = define_ioctl("KVM_GET_SUPPORTED_CPUID", _RW, 0x05,
                                           "struct kvm_cpuid2", ffi)
    KVM_GET_SUPPORTED_HV_CPUID = define_ioctl("KVM_GET_SUPPORTED_HV_CPUID", _RW, 0xC1,
                                              "struct kvm_cpuid2", ffi)
    KVM_GET_MSR_FEATURE_INDEX_LIST = define_ioctl("KVM_GET_MSR_FEATURE_INDEX_LIST", _RW, 0x0A,
                                                  "struct kvm_msr_list", ffi)
    KVM_CREATE_PIT2 = define_ioctl("KVM_CREATE_PIT2", _W, 0x77, "struct kvm_pit_config", ffi)
    KVM_GET_REGS = define_ioctl("KVM_GET_REGS", _R, 0x81, "struct kvm_regs", ffi)
    KVM_SET_REGS = define_ioctl("KVM_SET_REGS", _W, 0x82, "struct kvm_regs", ffi)
    KVM_GET_SREGS = define_ioctl("KVM_GET_SREGS", _R, 0x83, "struct kvm_sregs", ffi)
    KVM_SET_SREGS = define_ioctl("KVM_SET_SREGS", _W, 0x84, "struct kvm_sregs", ffi)
    KVM_TRANSLATE = define_ioctl("KVM_TRANSLATE", _RW, 0x85, "struct kvm_translation", ffi)
    KVM_INTERRUPT = define_ioctl("KVM_INTERRUPT", _W, 0x86, "struct kvm_interrupt", ffi)
    KVM_GET_MSRS = define_ioctl("KVM_GET_MSRS", _RW, 0x88, "struct kvm_msrs", ffi)
    KVM_SET_MSRS = define_ioctl("KVM_SET_MSRS", _W, 0x89, "struct kvm_msrs", ffi)
    KVM_GET_FPU = define_ioctl("KVM_GET_FPU", _R, 0x8C, "struct kvm_fpu", ffi)
    KVM_SET_FPU = define_ioctl("KVM_SET_FPU", _W, 0x8D, "struct kvm_fpu", ffi)
    KVM_GET_LAPIC = define_ioctl("KVM_GET_LAPIC", _R, 0x8E, "struct kvm_lapic_state", ffi)
    KVM_SET_LAPIC = define_ioctl("KVM_SET_LAPIC", _W, 0x8F, "struct kvm_lapic_state", ffi)
    KVM_SET_CPUID2 = define_ioctl("KVM_SET_CPUID2", _W, 0x90, "struct kvm_cpuid2", ffi)
    KVM_GET_CPUID2 = define_ioctl("KVM_GET_CPUID2", _RW, 0x91, "struct kvm_cpuid2", ffi)
    KVM_GET_MP_STATE = define_ioctl("KVM_GET_MP_STATE", _R, 0x98, "struct kvm_mp_state", ffi)
    KVM_SET_MP_STATE = define_ioctl("KVM_SET_MP_STATE", _W, 0x99, "struct kvm_mp_state", ffi)
    KVM_GET_VCPU_EVENTS = define_ioctl("KVM_GET_VCPU_EVENTS", _R, 0x9F,
                                       "struct kvm_vcpu_events", ffi)
    KVM_SET_VCPU_EVENTS = define_ioctl("KVM_SET_VCPU_EVENTS", _W, 0xA0,
                                       "struct kvm_vcpu_events", ffi)
    KVM_GET_DEBUGREGS = define_ioctl("KVM_GET_DEBUGREGS", _R, 0xA1, "struct kvm_debugregs", ffi)
    KVM_SET_DEBUGREGS = define_ioctl("KVM_SET_DEBUGREGS", _W, 0xA2, "struct kvm_debugregs", ffi)
    KVM_GET_XSAVE = define_ioctl("KVM_GET_XSAVE", _R, 0xA4, "struct kvm_xsave", ffi)
    KVM_SET_XSAVE = define_ioctl("KVM_SET_XSAVE", _W, 0xA5, "struct kvm_xsave", ffi)
    KVM_GET_XCRS = define_ioctl("KVM_GET_XCRS", _R, 0xA6, "struct kvm_xcrs", ffi)
    KVM_SET_XCRS = define_ioctl("KVM_SET_XCRS", _W, 0xA7, "struct kvm_xcrs", ffi)
    KVM_SET_TSC_KHZ = define_ioctl("KVM_SET_TSC_KHZ", 0, 0xA2)
    KVM_GET_TSC_KHZ = define_ioctl("KVM_GET_TSC_KHZ", 0, 0xA3)
    KVM_GET_XSAVE2 = define_ioctl("KVM_GET_XSAVE2", _R, 0xCF, "struct kvm_xsave", ffi)
    KVM_GET_SREGS2 = define_ioctl("KVM_GET_SREGS2", _R, 0xCC, "struct kvm_sregs2", ffi)
    KVM_SET_SREGS2 = define_ioctl("KVM_SET_SREGS2", _W, 0xCD, "struct kvm_sregs2", ffi)
