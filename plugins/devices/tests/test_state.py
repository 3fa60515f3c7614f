"""Generated tests every device gets: save/restore round trips and a random-access fuzz.

The device list comes from the installed ``kvmfw.devices`` entry points of this package, so
a device added to ``pyproject.toml`` is covered without touching this file; it only needs a
mutation recipe in ``MUTATIONS`` (a test fails until it has one).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
from conftest import make_harness
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvmfw.device import Device

ENTRY_POINTS = {ep.name: ep for ep in importlib.metadata.entry_points(group="kvmfw.devices")
                if ep.value.startswith("kvmfw_devices.")}
DEVICE_NAMES = sorted(ENTRY_POINTS)

Access = tuple[int, bytes]


def w(offset: int, *values: int) -> list[Access]:
    return [(offset, bytes((v,))) for v in values]


def w2(offset: int, value: int, size: int) -> Access:
    return (offset, value.to_bytes(size, "little"))


# Guest-visible state changes for each device: writes at offsets of its first range.
MUTATIONS: dict[str, list[Access]] = {
    "uart16550": w(3, 0x83) + w(0, 0x01) + w(3, 0x03) + w(2, 0xC1) + w(1, 0x03) + w(7, 0x5A)
    + w(4, 0x1B) + w(0, 0x41, 0x42),
    "debug-exit": [w2(0, 0x21, 4)],
    "isa-debug-exit": [w2(0, 0x21, 4)],
    "pseudo-op": [w2(0x08, 7, 8), w2(0x8010, 0x1234, 4)],
    "fw-cfg": [w2(0, 0x0001, 2)],
    "cmos-rtc": w(0, 0x40) + w(1, 0x99) + w(0, 0x8B) + w(1, 0x46),
    "i8042": w(4, 0x60) + w(0, 0x45) + w(4, 0xD2) + w(0, 0x99),
    "pci-host": [],  # configured through config space: see CONFIG_MUTATIONS
    "virtio-blk": [w2(0x70, 3, 4), w2(0x38, 16, 4), w2(0x80, 0x10000, 4)],
    "virtio-console": [w2(0x70, 1, 4), w2(0x30, 1, 4), w2(0x38, 32, 4)],
    "acpi-pm": [w2(2, 0x0121, 2), w2(4, 0x0C01, 2)],
    "latency-mmio": [w2(0x10, 0x1234, 4)],  # built with delay=0: its timing path has its
                                            # own tests (test_latency_mmio.py)
    "pl011": [w2(0x2C, 0x10, 4), w2(0x38, 0x70, 4), w2(0x30, 0x381, 4), w2(0, 0x41, 4),
              w2(0x24, 13, 4)],
}
# Devices whose state changes through another path than their bus range.
CONFIG_MUTATIONS: dict[str, Callable[[Any], None]] = {
    "pci-host": lambda d: (d.config_write(0, 0, 0, 0x04, 2, 0x0006),
                           d.config_write(0, 0, 0, 0x3C, 1, 10)),
}
# Reads that change state too (fw_cfg's data offset moves on reads).
MUTATING_READS: dict[str, list[tuple[int, int]]] = {"fw-cfg": [(1, 1), (1, 1)]}


def build(name: str) -> tuple[Device, Any]:
    h = make_harness()
    cls = ENTRY_POINTS[name].load()
    params: dict[str, Any] = {}
    if name == "pseudo-op":
        params["dir"] = tempfile.mkdtemp(prefix="kvmfw-pseudo-op-")
    if name in ("cmos-rtc", "acpi-pm"):
        params["clock"] = "fixed"
    if name == "latency-mmio":
        params["delay"] = 0
    if name == "virtio-blk":
        fd, path = tempfile.mkstemp(prefix="kvmfw-blk-", suffix=".img")
        os.write(fd, bytes(4096))
        os.close(fd)
        params["file"] = path
    return cls(h.ctx, **params), h


def mutate(name: str, dev: Device) -> None:
    for offset, data in MUTATIONS[name]:
        dev.write(offset, data)
    for offset, size in MUTATING_READS.get(name, []):
        dev.read(offset, size)
    if name in CONFIG_MUTATIONS:
        CONFIG_MUTATIONS[name](dev)


def probe(dev: Device) -> list[bytes]:
    """Read every byte register of the first range (side effects included)."""
    r = dev.ranges()[0]
    return [dev.read(off, 1) for off in range(min(r.size, 64))]


def test_every_entry_point_has_a_mutation_recipe() -> None:
    assert DEVICE_NAMES, "kvmfw-devices is not installed (pip install -e plugins/devices)"
    assert set(DEVICE_NAMES) <= set(MUTATIONS)


@pytest.mark.parametrize("name", DEVICE_NAMES)
def test_entry_point_names_the_class(name: str) -> None:
    cls = ENTRY_POINTS[name].load()
    assert issubclass(cls, Device)
    assert cls.config, "every device documents its config keys"
    for key, spec in cls.config.items():
        assert spec.help, f"{name}.{key} has no help text"


@pytest.mark.parametrize("name", DEVICE_NAMES)
def test_save_restore_round_trip(name: str) -> None:
    dev, _ = build(name)
    fresh = dev.save()
    mutate(name, dev)
    saved = dev.save()
    assert json.loads(json.dumps(saved)) == saved, "state must be plain JSON data"
    assert saved != fresh, "the mutation must be visible in the saved state"
    other, _ = build(name)
    other.restore(json.loads(json.dumps(saved)))
    assert other.save() == saved
    other.restore(saved)  # restoring twice changes nothing
    assert other.save() == saved
    assert probe(other) == probe(dev), "a restored device answers like the original"
    other.reset()
    assert other.save() == fresh, "reset returns to the power-on state"


@pytest.mark.parametrize("name", DEVICE_NAMES)
def test_stats_are_counters(name: str) -> None:
    dev, _ = build(name)
    mutate(name, dev)
    dev.write(0, b"\0")
    dev.read(0, 1)
    assert all(isinstance(v, int) for v in dev.stats.values())
    assert dev.stats["writes"] >= 1 and dev.stats["reads"] >= 1
    assert dev.is_drained()
    dev.close()


accesses = st.lists(st.tuples(
    st.booleans(), st.integers(0, 0xFFFF), st.sampled_from([1, 2, 4, 8]),
    st.integers(0, (1 << 64) - 1)), max_size=60)


@pytest.mark.parametrize("name", DEVICE_NAMES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=accesses, ram_seed=st.binary(min_size=64, max_size=64))
def test_random_accesses_never_raise(name: str, ops: list[tuple[bool, int, int, int]],
                                     ram_seed: bytes) -> None:
    dev, h = build(name)
    mem = h.ctx.memory
    for i in range(0, 0x10000, 64):  # random descriptors and pointers in low RAM
        mem.write(i, ram_seed)
    r = dev.ranges()[0]
    for is_write, off, size, value in ops:
        off %= r.size
        size = min(size, r.size - off) or 1
        if is_write:
            dev.write(off, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        else:
            assert len(dev.read(off, size)) == size
        h.ctx.eventq.service_due()
    saved = dev.save()
    assert json.loads(json.dumps(saved)) == saved
    other, _ = build(name)
    other.restore(saved)
    assert other.save() == saved
    dev.close()
    other.close()
