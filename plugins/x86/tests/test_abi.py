"""The x86 ABI module: ioctl numbers computed from our compiled sizes equal the headers'."""

from kvmfw_x86.abi import X, ffi, lib


def test_every_ioctl_number_matches_the_kernel_headers() -> None:
    names = [n for n in dir(X) if n.startswith("KVM_")]
    assert len(names) > 30
    for n in names:
        assert getattr(X, n) == getattr(lib, "HDR_" + n), n


def test_struct_sizes() -> None:
    assert ffi.sizeof("struct kvm_regs") == 144
    assert ffi.sizeof("struct kvm_sregs") == 312
    assert ffi.sizeof("struct kvm_vcpu_events") == 64
    assert ffi.sizeof("struct boot_params") == 4096
    assert ffi.offsetof("struct boot_params", "hdr") == 0x1F1


def test_rdtsc_counts_up() -> None:
    a = lib.kvmfw_x86_rdtsc()
    assert lib.kvmfw_x86_rdtsc() > a
