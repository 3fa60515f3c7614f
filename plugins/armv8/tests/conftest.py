"""KVM tests of the ARMv8 plugin need a real arm64 /dev/kvm; elsewhere they skip with the reason."""

from __future__ import annotations

import pytest
from kvmfw_armv8.testing import arm64_kvm_unavailable_reason

_REASON = arm64_kvm_unavailable_reason()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``arm64_kvm`` when no arm64 /dev/kvm is present, saying why."""
    if _REASON is None:
        return
    skip = pytest.mark.skip(reason=_REASON)
    for item in items:
        if "arm64_kvm" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "arm64_kvm: needs a real arm64 /dev/kvm")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
