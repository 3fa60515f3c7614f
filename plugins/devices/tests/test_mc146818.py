"""CMOS RTC: reset values, BCD/binary/12h time, SET, NMI mask, interrupts, CMOS RAM."""

from __future__ import annotations

import time

import pytest
from conftest import Harness
from kvmfw.errors import ConfigError
from kvmfw.eventq import TICKS_PER_SECOND

from kvmfw_devices import mc146818 as m
from kvmfw_devices.mc146818 import Mc146818

START = "2024-02-29T23:59:58"


def rd(dev: Mc146818, reg: int) -> int:
    dev.write(0, bytes((reg,)))
    return dev.read(1, 1)[0]


def wr(dev: Mc146818, reg: int, value: int) -> None:
    dev.write(0, bytes((reg,)))
    dev.write(1, bytes((value,)))


@pytest.fixture
def rtc(h: Harness) -> Mc146818:
    return Mc146818(h.ctx, clock="fixed", time=START)


def test_ports_and_reset_values(rtc: Mc146818) -> None:
    (r,) = rtc.ranges()
    assert (r.space, r.base, r.size) == ("pio", 0x70, 2)
    assert rd(rtc, m.REG_A) == 0x26
    assert rd(rtc, m.REG_B) == 0x02
    assert rd(rtc, m.REG_C) == 0
    assert rd(rtc, m.REG_D) == 0x80


def test_bcd_time_from_fixed_clock(rtc: Mc146818) -> None:
    got = [rd(rtc, r) for r in (m.REG_SECONDS, m.REG_MINUTES, m.REG_HOURS, m.REG_DAY,
                                m.REG_MONTH, m.REG_YEAR, m.REG_CENTURY, m.REG_WEEKDAY)]
    assert got == [0x58, 0x59, 0x23, 0x29, 0x02, 0x24, 0x20, 0x05]  # a Thursday


def test_fixed_clock_advances_with_simulated_time(rtc: Mc146818, h: Harness) -> None:
    h.ctx.eventq.cur_tick = 3 * TICKS_PER_SECOND
    assert [rd(rtc, r) for r in (m.REG_SECONDS, m.REG_DAY, m.REG_MONTH)] == [0x01, 0x01, 0x03]


def test_host_clock_is_close_to_now(h: Harness) -> None:
    dev = Mc146818(h.ctx)
    assert abs(dev.now() - time.time()) < 5
    year = time.gmtime().tm_year
    assert rd(dev, m.REG_CENTURY) == (year // 1000) << 4 | (year // 100) % 10


def test_binary_and_12_hour_modes(rtc: Mc146818) -> None:
    wr(rtc, m.REG_B, m.B_DM_BINARY)  # binary, 12-hour
    assert rd(rtc, m.REG_HOURS) == 11 | m.HOUR_PM
    assert rd(rtc, m.REG_SECONDS) == 58


def test_set_freezes_and_loads_the_clock(rtc: Mc146818, h: Harness) -> None:
    wr(rtc, m.REG_B, m.B_SET | m.B_24H)
    h.ctx.eventq.cur_tick = 10 * TICKS_PER_SECOND
    assert rd(rtc, m.REG_SECONDS) == 0x58  # frozen while SET
    for reg, value in ((m.REG_YEAR, 0x99), (m.REG_CENTURY, 0x19), (m.REG_MONTH, 0x12),
                       (m.REG_DAY, 0x31), (m.REG_HOURS, 0x12), (m.REG_MINUTES, 0x34),
                       (m.REG_SECONDS, 0x56)):
        wr(rtc, reg, value)
    wr(rtc, m.REG_B, m.B_24H)
    assert time.gmtime(int(rtc.now()))[:6] == (1999, 12, 31, 12, 34, 56)
    assert rd(rtc, m.REG_YEAR) == 0x99


def test_write_while_running_sets_that_field(rtc: Mc146818) -> None:
    wr(rtc, m.REG_MINUTES, 0x10)
    assert rd(rtc, m.REG_MINUTES) == 0x10 and rd(rtc, m.REG_HOURS) == 0x23


def test_invalid_time_is_counted_and_ignored(rtc: Mc146818) -> None:
    wr(rtc, m.REG_MONTH, 0x13)
    assert rtc.stats["bad_time"] == 1
    assert rd(rtc, m.REG_MONTH) == 0x02


def test_nmi_mask_bit_on_the_index_port(rtc: Mc146818) -> None:
    rtc.write(0, bytes((0x80 | m.REG_D,)))
    assert rtc.nmi_disabled
    assert rtc.read(1, 1)[0] == 0x80  # index bits 6..0 still select
    rtc.write(0, bytes((m.REG_D,)))
    assert not rtc.nmi_disabled
    assert rtc.read(0, 1) == b"\xff"


def test_uip_in_last_244us_of_a_second(rtc: Mc146818, h: Harness) -> None:
    h.ctx.eventq.cur_tick = TICKS_PER_SECOND - 100 * 10**6  # 100 us before the second
    assert rd(rtc, m.REG_A) & m.A_UIP
    h.ctx.eventq.cur_tick = TICKS_PER_SECOND // 2
    assert not rd(rtc, m.REG_A) & m.A_UIP


def test_periodic_interrupt_raised_and_cleared_by_reading_c(rtc: Mc146818, h: Harness) -> None:
    assert rtc.periodic_hz() == 1024
    wr(rtc, m.REG_B, m.B_PIE | m.B_24H)
    ev = h.ctx.eventq.service_one()
    assert ev is not None and h.ctx.eventq.cur_tick == TICKS_PER_SECOND // 1024
    assert h.irq(8).level == 1
    assert rd(rtc, m.REG_C) == m.C_IRQF | m.C_PF
    assert h.irq(8).level == 0
    assert rd(rtc, m.REG_C) == 0
    wr(rtc, m.REG_B, m.B_24H)
    assert h.ctx.eventq.empty()


def test_update_and_alarm_interrupts(rtc: Mc146818, h: Harness) -> None:
    wr(rtc, m.REG_SECONDS_ALARM, 0x59)
    wr(rtc, m.REG_MINUTES_ALARM, 0xC0)  # don't care
    wr(rtc, m.REG_HOURS_ALARM, 0xFF)
    wr(rtc, m.REG_B, m.B_UIE | m.B_AIE | m.B_24H)
    h.ctx.eventq.service_one()
    assert h.ctx.eventq.cur_tick == TICKS_PER_SECOND
    assert rd(rtc, m.REG_C) == m.C_IRQF | m.C_UF | m.C_AF
    h.ctx.eventq.service_one()
    assert rd(rtc, m.REG_C) == m.C_IRQF | m.C_UF  # 00 seconds: no alarm


def test_flags_without_enable_do_not_interrupt(rtc: Mc146818, h: Harness) -> None:
    wr(rtc, m.REG_B, m.B_AIE | m.B_24H)
    wr(rtc, m.REG_SECONDS_ALARM, 0x00)
    h.ctx.eventq.service_one()
    assert h.irqs.get(8) is None or h.irq(8).level == 0
    assert rd(rtc, m.REG_C) & m.C_UF  # UF is set though UIE is off


def test_rate_table(rtc: Mc146818) -> None:
    for rate, hz in ((0, 0), (1, 256), (2, 128), (3, 8192), (15, 2)):
        wr(rtc, m.REG_A, 0x20 | rate)
        assert rtc.periodic_hz() == hz
    wr(rtc, m.REG_A, 0x76)  # divider in reset: no periodic interrupt, no UIP
    assert rtc.periodic_hz() == 0


def test_cmos_ram_and_memory_size(rtc: Mc146818) -> None:
    assert rd(rtc, 0x15) | rd(rtc, 0x16) << 8 == 640
    assert rd(rtc, 0x17) | rd(rtc, 0x18) << 8 == 0  # 1 MiB of test RAM: none extended
    wr(rtc, 0x40, 0xAB)
    assert rd(rtc, 0x40) == 0xAB
    wr(rtc, m.REG_C, 0xFF)
    wr(rtc, m.REG_D, 0)
    assert (rd(rtc, m.REG_C), rd(rtc, m.REG_D)) == (0, 0x80)


def test_bad_accesses(rtc: Mc146818) -> None:
    assert rtc.read(1, 2) == b"\xff\xff"
    rtc.write(0, b"\x00\x00")
    assert rtc.stats["bad_accesses"] == 2


def test_bad_config(h: Harness) -> None:
    with pytest.raises(ConfigError):
        Mc146818(h.ctx, clock="moon")
    with pytest.raises(ConfigError):
        Mc146818(h.ctx, time="yesterday")
