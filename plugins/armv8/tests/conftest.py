"""KVM tests of the ARMv8 plugin need a real arm64 /dev/kvm; elsewhere they skip with the reason."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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


@pytest.fixture
def build() -> Iterator[Any]:
    """``build(cpus=1, options=None, image=bin)`` -> (machine, test device)."""
    from kvmfw_armv8 import guests, plugin
    from kvmfw_armv8.testing import TestDevice

    from kvmfw.device import Range
    from kvmfw.machine import Machine, MachineConfig

    made: list[Any] = []

    def make(cpus: int = 1, options: dict[str, Any] | None = None,
             image: str | None = None) -> tuple[Any, TestDevice]:
        cfg = MachineConfig(arch="armv8", memory=64 << 20, cpus=cpus, default_devices=False,
                            use_perf=False, options=dict(options or {}))
        m = Machine(cfg, arch_plugin=plugin, arch_name="armv8")
        made.append(m)
        dev = TestDevice(m)
        m.map_device(Range("mmio", guests.TESTDEV_BASE, 0x1000, "testdev"), dev)
        m.hooks.call("load_guest", machine=m, image=image or str(guests.TESTGUEST_BIN),
                     options={})
        return m, dev

    yield make
    for m in made:
        m.close()
