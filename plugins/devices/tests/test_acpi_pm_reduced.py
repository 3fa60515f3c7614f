"""ACPI PM block, hardware-reduced (``reduced=on``, the microvm board): the ACPI 5.0 sleep
control and status registers, written the way Linux's ``acpi_hw_extended_sleep`` does."""

from __future__ import annotations

from typing import Any

from conftest import make_harness
from hypothesis import given
from hypothesis import strategies as st

from kvmfw_devices.acpi_pm import REDUCED_SIZE, SLEEP_EN, SLEEP_WAK_STS, AcpiPm

CONTROL, STATUS = 0, 1


def _sleep(typ: int) -> bytes:
    return bytes([(typ << 2) & 0x1C | SLEEP_EN])


def _pm(**params: Any) -> tuple[AcpiPm, Any, list[tuple[str, dict[str, Any]]]]:
    h = make_harness()
    wakes: list[tuple[str, dict[str, Any]]] = []
    h.ctx.services["reset"] = lambda reason, **kw: wakes.append((reason, kw))
    return AcpiPm(h.ctx, reduced="on", **params), h, wakes


def test_two_byte_registers_and_no_sci() -> None:
    dev, h, _ = _pm(irq="9")
    (r,) = dev.ranges()
    assert (r.space, r.base, r.size) == ("pio", 0x600, REDUCED_SIZE)
    assert dev.read(CONTROL, 2) == b"\0\0"
    dev.power_button()  # a PM1 event: nothing to signal it with on this machine
    assert h.irqs == {}, "a hardware-reduced machine has no SCI line"


def test_s5_through_the_sleep_control_register_powers_off() -> None:
    dev, h, _ = _pm()
    dev.write(STATUS, bytes([SLEEP_WAK_STS]))  # Linux clears WAK_STS first ...
    dev.write(CONTROL, bytes([0 << 2]))  # ... a type without SLP_EN does nothing ...
    assert h.exits == []
    dev.write(CONTROL, _sleep(0))  # ... then SLP_TYP | SLP_EN
    assert h.exits == [(0, "guest powered off (ACPI S5)")]
    assert dev.stats["poweroffs"] == 1


def test_s3_wakes_at_once_and_sets_wak_sts_until_cleared() -> None:
    dev, h, wakes = _pm()
    dev.write(CONTROL, _sleep(1))
    assert wakes == [("guest suspended to RAM (ACPI S3)", {"wakeup": True})] and not h.exits
    assert dev.read(STATUS, 1)[0] & SLEEP_WAK_STS  # what the OS polls for
    dev.write(STATUS, bytes([SLEEP_WAK_STS]))
    assert dev.read(STATUS, 1) == b"\0"
    dev.write(CONTROL, _sleep(5))  # a type the DSDT does not name
    assert dev.stats["sleeps_ignored"] == 1 and len(wakes) == 1


def test_bad_accesses_are_counted_and_read_ones() -> None:
    dev, h, _ = _pm()
    assert dev.read(1, 2) == b"\xff\xff" and dev.read(-1, 1) == b"\xff"
    dev.write(2, _sleep(0))
    dev.write(0, b"")
    assert dev.stats["bad_accesses"] == 4 and h.exits == []


@given(st.integers(0, 1), st.binary(min_size=1, max_size=2))
def test_any_write_leaves_the_block_consistent(offset: int, data: bytes) -> None:
    dev, h, wakes = _pm()
    dev.write(offset, data)
    status = dev.read(STATUS, 1)[0]
    assert status in (0, SLEEP_WAK_STS)
    assert len(h.exits) + len(wakes) + dev.stats["sleeps_ignored"] \
        + dev.stats["bad_accesses"] <= 2
    restored, _, _ = _pm()
    restored.restore(dev.save())
    assert restored.read(STATUS, 1)[0] == status
