"""Smoke test of the arm64 environment: /dev/kvm opens and speaks API version 12."""

from __future__ import annotations

import fcntl
import os

import pytest

KVM_GET_API_VERSION = 0xAE00


@pytest.mark.arm64_kvm
def test_dev_kvm_opens() -> None:
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert fcntl.ioctl(fd, KVM_GET_API_VERSION, 0) == 12
    finally:
        os.close(fd)
