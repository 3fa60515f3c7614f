"""The scratch device at register level: no KVM needed (kvmfw.testing's kvmfw_device)."""

from __future__ import annotations

import pytest
from kvmfw.errors import StateError

from kvmfw_template.scratch import Scratch


def test_data_not_and_count(kvmfw_device) -> None:
    h = kvmfw_device(Scratch)
    h.write(0, 0x5A)
    h.write(0, 0xA5)
    assert h.read(0) == 0xA5 and h.read(1) == 0x5A and h.read(2) == 2


def test_a_wide_access_is_byte_by_byte(kvmfw_device) -> None:
    h = kvmfw_device("scratch,port=0x600")  # by name: found through its entry point
    h.write(0, 0x7F, 1)
    assert h.read(0, 4) == 0x00_01_80_7F  # DATA 0x7f, NOT 0x80, COUNT 1, IRQ reads 0


def test_irq_register_drives_the_line(kvmfw_device) -> None:
    h = kvmfw_device(Scratch, irq=7)
    h.write(3, 1)
    h.write(3, 0)
    assert h.irq(7).history == [1, 0]


def test_restore_refuses_bad_state_and_changes_nothing(kvmfw_device) -> None:
    h = kvmfw_device(Scratch)
    h.write(0, 9)
    saved = h.device.save()
    for bad in ({"data": 256, "count": 0, "level": 0}, {"data": 1}, {"data": "x", "count": 0,
                                                                    "level": 0}):
        with pytest.raises(StateError):
            h.device.restore(bad)
        assert h.device.save() == saved
    h.device.reset()
    h.device.restore(saved)
    assert h.read(0) == 9
