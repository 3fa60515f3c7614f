"""ACPI PM block: PM1 status/enable with the SCI, PM1 control and S5 power-off, PM timer."""

from __future__ import annotations

import time

import pytest
from conftest import Harness
from kvmfw.errors import ConfigError
from kvmfw.eventq import TICKS_PER_SECOND

from kvmfw_devices import boards
from kvmfw_devices.acpi_pm import (
    CNT_SCI_EN,
    CNT_SLP_EN,
    PM_TIMER_HZ,
    STS_PWRBTN,
    STS_TMR,
    AcpiPm,
)


def r16(dev: AcpiPm, off: int) -> int:
    return int.from_bytes(dev.read(off, 2), "little")


def w16(dev: AcpiPm, off: int, value: int) -> None:
    dev.write(off, value.to_bytes(2, "little"))


def test_piix4_layout_and_acpi_mode_at_power_on(h: Harness) -> None:
    dev = AcpiPm(h.ctx)
    (r,) = dev.ranges()
    assert (r.space, r.base, r.size) == ("pio", 0x600, 12)
    assert r16(dev, 4) & CNT_SCI_EN, "no SMI port: the machine must start in ACPI mode"
    assert r16(dev, 0) == 0 and r16(dev, 2) == 0


def test_s5_sleep_ends_the_run_with_status_0(h: Harness) -> None:
    dev = AcpiPm(h.ctx)
    w16(dev, 4, CNT_SCI_EN | (0 << 10))  # Linux writes SLP_TYP first ...
    assert h.exits == []
    w16(dev, 4, CNT_SCI_EN | (0 << 10) | CNT_SLP_EN)  # ... then SLP_TYP | SLP_EN
    assert h.exits and h.exits[0][0] == 0 and "S5" in h.exits[0][1]
    assert not r16(dev, 4) & CNT_SLP_EN, "SLP_EN is write-only"


def test_other_sleep_types_are_not_a_power_off(h: Harness) -> None:
    dev = AcpiPm(h.ctx)
    w16(dev, 4, CNT_SCI_EN | (1 << 10) | CNT_SLP_EN)  # S3 in QEMU's numbering
    assert h.exits == [] and dev.stats["sleeps_ignored"] == 1
    assert (r16(dev, 4) >> 10) & 7 == 1


def test_s5_type_is_configurable(h: Harness) -> None:
    dev = AcpiPm(h.ctx, s5_typ="5")
    w16(dev, 4, (5 << 10) | CNT_SLP_EN)
    assert h.exits[0][0] == 0


def test_sci_follows_status_and_enable_and_status_is_write_1_to_clear(h: Harness) -> None:
    dev = AcpiPm(h.ctx)
    dev.power_button()
    assert r16(dev, 0) & STS_PWRBTN and h.irq(9).level == 0, "not enabled: no SCI"
    w16(dev, 2, STS_PWRBTN)
    assert h.irq(9).level == 1
    w16(dev, 0, 0)  # writing 0 clears nothing
    assert h.irq(9).level == 1
    w16(dev, 0, STS_PWRBTN)
    assert r16(dev, 0) == 0 and h.irq(9).level == 0


def test_byte_accesses_reach_the_right_register(h: Harness) -> None:
    dev = AcpiPm(h.ctx)
    dev.write(3, b"\x01")  # PWRBTN_EN is bit 8 of PM1_EN: its high byte
    assert r16(dev, 2) == STS_PWRBTN
    dev.write(5, bytes([CNT_SLP_EN >> 8]))  # SLP_EN through the control's high byte
    assert h.exits and h.exits[0][0] == 0


def test_pm_timer_counts_at_3_579545_mhz_in_24_bits(h: Harness) -> None:
    dev = AcpiPm(h.ctx, clock="fixed")
    t0 = int.from_bytes(dev.read(8, 4), "little")
    h.ctx.eventq.cur_tick += TICKS_PER_SECOND // 1000  # 1 ms
    t1 = int.from_bytes(dev.read(8, 4), "little")
    assert t1 - t0 == PM_TIMER_HZ // 1000
    h.ctx.eventq.cur_tick += 5 * TICKS_PER_SECOND  # 17.9 M ticks: wraps at 2^24
    t2 = int.from_bytes(dev.read(8, 4), "little")
    assert t2 < 1 << 24 and t2 == (t1 + 5 * PM_TIMER_HZ) & 0xFFFFFF


def test_timer_carry_sets_tmr_sts_and_raises_sci_when_enabled(h: Harness) -> None:
    dev = AcpiPm(h.ctx, clock="fixed")
    w16(dev, 2, STS_TMR)
    h.ctx.eventq.cur_tick += TICKS_PER_SECOND * (1 << 23) // PM_TIMER_HZ + TICKS_PER_SECOND
    assert r16(dev, 0) & STS_TMR and h.irq(9).level == 1


def test_host_clock_timer_advances(h: Harness) -> None:
    dev = AcpiPm(h.ctx)
    a = int.from_bytes(dev.read(8, 4), "little")
    time.sleep(0.01)
    b = int.from_bytes(dev.read(8, 4), "little")
    assert (b - a) & 0xFFFFFF >= PM_TIMER_HZ // 200  # >= 5 ms worth


def test_bad_clock_is_rejected(h: Harness) -> None:
    with pytest.raises(ConfigError, match="clock"):
        AcpiPm(h.ctx, clock="tsc")


def test_default_x86_board_has_the_pm_block_the_fadt_names() -> None:
    assert "acpi-pm,port=0x600,irq=9" in boards.x86_default()
