"""ACPI fixed-hardware power management registers (PM1 event, PM1 control, PM timer), laid
out as QEMU's PIIX4 PM at port 0x600, so the x86 plugin's FADT can point Linux at them.

Register map (ACPI 6.4, 4.8.3 "PM1 Event/Control Registers", 4.8.3.3 "Power Management
Timer"; offsets from ``port``)::

    0x0  PM1a_STS (16 bit, write 1 to clear)  TMR_STS(0) BM_STS(4) GBL_STS(5) PWRBTN_STS(8)
         SLPBTN_STS(9) RTC_STS(10) WAK_STS(15)
    0x2  PM1a_EN  (16 bit)  TMR_EN(0) GBL_EN(5) PWRBTN_EN(8) SLPBTN_EN(9) RTC_EN(10)
    0x4  PM1a_CNT (16 bit)  SCI_EN(0) BM_RLD(1) GBL_RLS(2, write-only) SLP_TYP(10-12)
         SLP_EN(13, write-only)
    0x6  reserved (reads 0)
    0x8  PM_TMR   (32 bit, read-only) a 24-bit counter at 3.579545 MHz

SCI_EN is set at power-on: the FADT has no SMI command port, so the machine is always in
ACPI mode. The SCI (``irq``, default 9, level) is asserted while a status bit with its
enable bit set is pending (timer, global lock, power button, RTC, as QEMU). A write of
SLP_EN with ``SLP_TYP`` equal to the S5 type (``s5_typ``, default 0: QEMU's DSDT ``_S5``)
ends the run with status 0 (a soft power-off). One with the S3 type (``s3_typ``, default 1:
QEMU's DSDT ``_S3``) suspends to RAM through the machine's ``reset`` service with
``wakeup=True``: the vCPUs stop and resume at once in real mode at the FACS firmware waking
vector, RAM and device state kept, WAK_STS set (kvmfw has no wake sources to wait for, so
the wake event comes immediately; QEMU waits for an RTC alarm or a wake-up command). Other
sleep types, and S3 without the service, are counted, not entered.

Hardware-reduced ACPI (``reduced=on``, the ``microvm`` board's, as QEMU's ``microvm``): the
machine has none of the fixed hardware above; the device is then the two ACPI 5.0 sleep
registers the FADT points at instead (4.8.3.7 "Sleep Control and Status Registers")::

    0x0  SLEEP_CONTROL_REG (8 bit, write-only)  SLP_TYP(2-4) SLP_EN(5)
    0x1  SLEEP_STATUS_REG  (8 bit, write 1 to clear)  WAK_STS(7)

with the same sleep types and the same S5/S3 behaviour, and no SCI. The OS then has no
legacy 8259s, no PIT interrupt and no PM1 registers to set up (Linux skips its 8254 timer
check and the ACPI mode switch), so the board describes its ISA devices in the DSDT.

The timer runs from the host's monotonic clock (``clock=host``) or from simulated time
(``clock=fixed``: reproducible runs). TMR_STS is set when the timer's bit 23 has changed
since the status was last read (the carry is noticed at the next status read, so a guest
that enables TMR_EN sees its SCI late; Linux uses the timer only as a counter).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from kvmfw.device import ConfigKey, Device, DeviceContext, Range, parse_bool, parse_int
from kvmfw.errors import ConfigError
from kvmfw.eventq import TICKS_PER_SECOND

from kvmfw_devices import KVMFW_PLUGIN_API as KVMFW_PLUGIN_API  # checked by the core
from kvmfw_devices._state import SavedState

PM_TIMER_HZ = 3_579_545
RANGE_SIZE = 12
REDUCED_SIZE = 2
"""The sleep control and status registers of a hardware-reduced machine."""
REG_STS, REG_EN, REG_CNT, REG_TMR = 0x0, 0x2, 0x4, 0x8

STS_TMR = 1 << 0
STS_BM = 1 << 4
STS_GBL = 1 << 5
STS_PWRBTN = 1 << 8
STS_SLPBTN = 1 << 9
STS_RTC = 1 << 10
STS_WAK = 1 << 15
STS_MASK = STS_TMR | STS_BM | STS_GBL | STS_PWRBTN | STS_SLPBTN | STS_RTC | STS_WAK
EN_MASK = STS_TMR | STS_GBL | STS_PWRBTN | STS_SLPBTN | STS_RTC
SCI_SOURCES = STS_TMR | STS_GBL | STS_PWRBTN | STS_RTC  # what raises the SCI (as QEMU)

CNT_SCI_EN = 1 << 0
CNT_BM_RLD = 1 << 1
CNT_GBL_RLS = 1 << 2
CNT_SLP_TYP_SHIFT = 10
CNT_SLP_TYP = 7 << CNT_SLP_TYP_SHIFT
CNT_SLP_EN = 1 << 13
CNT_KEEP = CNT_SCI_EN | CNT_BM_RLD | CNT_SLP_TYP  # bits that read back

SLEEP_TYP_SHIFT = 2
SLEEP_TYP = 7 << SLEEP_TYP_SHIFT
SLEEP_EN = 1 << 5
SLEEP_WAK_STS = 1 << 7


class AcpiPm(Device):
    """ACPI PM1 event/control registers and the PM timer (PIIX4 PM layout)."""

    name: ClassVar[str] = "acpi-pm"
    config: ClassVar[dict[str, ConfigKey]] = {
        "port": ConfigKey(parse_int, 0x600, "IO port base of the 12-byte block"),
        "irq": ConfigKey(parse_int, 9, "SCI interrupt line (-1: none)"),
        "s5_typ": ConfigKey(parse_int, 0, "SLP_TYP value of S5 (the DSDT's _S5 package)"),
        "s3_typ": ConfigKey(parse_int, 1, "SLP_TYP value of S3 (the DSDT's _S3; -1: no S3)"),
        "clock": ConfigKey(str, "host", "PM timer source: host (monotonic) or fixed (simulated)"),
        "timer": ConfigKey(parse_bool, True, "offer the PM timer in the FADT (off: as QEMU's "
                           "microvm, Linux then registers and verifies no acpi_pm clocksource "
                           "at boot; the register still reads)"),
        "reduced": ConfigKey(parse_bool, False, "hardware-reduced ACPI: only the ACPI 5.0 "
                             "sleep control (port) and status (port + 1) registers, no PM1 "
                             "block, timer or SCI (as QEMU's microvm)"),
    }

    def __init__(self, ctx: DeviceContext, **params: Any) -> None:
        super().__init__(ctx, **params)
        if self.params["clock"] not in ("host", "fixed"):
            raise ConfigError(f"acpi-pm: clock must be host or fixed, not {self.params['clock']!r}")
        if not 0 <= self.params["s5_typ"] <= 7:
            raise ConfigError(f"acpi-pm: s5_typ is a 3-bit SLP_TYP value 0..7, not "
                              f"{self.params['s5_typ']}")
        self.reduced = bool(self.params["reduced"])
        self.sci = self.optional_irq(-1 if self.reduced else self.params["irq"])
        self.stats.update(poweroffs=0, sleeps_ignored=0, s3_suspends=0)
        self._sci_level = False
        self.sts = 0
        self.en = 0
        self.cnt = CNT_SCI_EN
        self._tmr_base = 0  # counter value at _clock_base
        self._clock_base = self._now_ticks()
        self._tmr_msb = 0

    # --- the timer ------------------------------------------------------------------------

    def _now_ticks(self) -> int:
        """PM timer ticks (unwrapped) since an arbitrary origin of the chosen clock."""
        if self.params["clock"] == "fixed":
            return self.ctx.eventq.cur_tick * PM_TIMER_HZ // TICKS_PER_SECOND
        return time.monotonic_ns() * PM_TIMER_HZ // 1_000_000_000

    def timer(self) -> int:
        """The 24-bit PM timer value now."""
        return (self._tmr_base + self._now_ticks() - self._clock_base) & 0xFFFFFF

    def _set_timer(self, value: int) -> None:
        self._tmr_base = value & 0xFFFFFF
        self._clock_base = self._now_ticks()
        self._tmr_msb = self._tmr_base >> 23

    def _poll_timer_carry(self) -> None:
        msb = self.timer() >> 23
        if msb != self._tmr_msb:
            self._tmr_msb = msb
            self.sts |= STS_TMR

    # --- SCI ------------------------------------------------------------------------------

    def _update_sci(self) -> None:
        level = bool(self.sts & self.en & SCI_SOURCES)
        if level != self._sci_level:
            self._sci_level = level
            if level:
                self.sci.raise_()
            else:
                self.sci.lower()

    def power_button(self) -> None:
        """Press the power button (PWRBTN_STS; an SCI if the guest enabled PWRBTN_EN)."""
        self.sts |= STS_PWRBTN
        self._update_sci()

    # --- bus interface ----------------------------------------------------------------------

    def ranges(self) -> list[Range]:
        size = REDUCED_SIZE if self.reduced else RANGE_SIZE
        return [Range("pio", self.params["port"], size, self.name)]

    def _image(self, with_timer: bool) -> bytes:
        tmr = self.timer() if with_timer else 0
        return (self.sts.to_bytes(2, "little") + self.en.to_bytes(2, "little")
                + self.cnt.to_bytes(2, "little") + bytes(2) + tmr.to_bytes(4, "little"))

    def read(self, offset: int, size: int) -> bytes:
        self.stats["reads"] += 1
        if self.reduced:
            if offset < 0 or size <= 0 or offset + size > REDUCED_SIZE:
                self.stats["bad_accesses"] += 1
                return b"\xff" * max(size, 0)
            status = SLEEP_WAK_STS if self.sts & STS_WAK else 0
            return bytes((0, status))[offset:offset + size]
        if offset < 0 or size <= 0 or offset + size > RANGE_SIZE:
            self.stats["bad_accesses"] += 1
            return b"\xff" * max(size, 0)
        if offset < REG_EN:
            self._poll_timer_carry()
            self._update_sci()
        return self._image(offset + size > REG_TMR)[offset:offset + size]

    def write(self, offset: int, data: bytes) -> None:
        self.stats["writes"] += 1
        if self.reduced:
            self._write_reduced(offset, data)
            return
        if offset < 0 or not data or offset + len(data) > RANGE_SIZE:
            self.stats["bad_accesses"] += 1
            return
        sts_clear = en_val = cnt_val = 0
        en_mask = cnt_mask = 0
        for i, byte in enumerate(data):
            pos = offset + i
            if pos < REG_EN:
                sts_clear |= byte << (8 * pos)
            elif pos < REG_CNT:
                en_val |= byte << (8 * (pos - REG_EN))
                en_mask |= 0xFF << (8 * (pos - REG_EN))
            elif pos < REG_CNT + 2:
                cnt_val |= byte << (8 * (pos - REG_CNT))
                cnt_mask |= 0xFF << (8 * (pos - REG_CNT))
            # 0x6-0x7 reserved, 0x8-0xb the read-only timer: ignored
        if sts_clear:
            self.sts &= ~(sts_clear & STS_MASK)
        if en_mask:
            self.en = ((self.en & ~en_mask) | en_val) & EN_MASK
        if cnt_mask:
            value = (self.cnt & ~cnt_mask) | cnt_val
            self.cnt = value & CNT_KEEP
            if value & CNT_SLP_EN:
                self._sleep((value & CNT_SLP_TYP) >> CNT_SLP_TYP_SHIFT)
        self._update_sci()

    def _write_reduced(self, offset: int, data: bytes) -> None:
        if offset < 0 or not data or offset + len(data) > REDUCED_SIZE:
            self.stats["bad_accesses"] += 1
            return
        for pos, byte in enumerate(data, offset):
            if pos == 1 and byte & SLEEP_WAK_STS:
                self.sts &= ~STS_WAK
            elif pos == 0 and byte & SLEEP_EN:
                self._sleep((byte & SLEEP_TYP) >> SLEEP_TYP_SHIFT)

    def _sleep(self, typ: int) -> None:
        if typ == self.params["s5_typ"]:
            self.stats["poweroffs"] += 1
            self.ctx.request_exit(0, "guest powered off (ACPI S5)")
            return
        wake = self.ctx.services.get("reset")
        if typ == self.params["s3_typ"] and wake is not None:
            self.stats["s3_suspends"] += 1
            self.sts |= STS_WAK  # read by the OS's resume path, cleared by writing 1
            wake("guest suspended to RAM (ACPI S3)", wakeup=True)
        else:
            self.stats["sleeps_ignored"] += 1

    # --- lifecycle --------------------------------------------------------------------------

    def reset(self) -> None:
        self.sts = 0
        self.en = 0
        self.cnt = CNT_SCI_EN
        self._set_timer(0)
        self._update_sci()

    def save(self) -> dict[str, Any]:
        return {"sts": self.sts, "en": self.en, "cnt": self.cnt, "timer": self.timer(),
                "tmr_msb": self._tmr_msb}

    def restore(self, state: dict[str, Any]) -> None:
        s = SavedState(self.name, state)
        sts = s.integer("sts", 0, 0xFFFF, 0) & STS_MASK
        en = s.integer("en", 0, 0xFFFF, 0) & EN_MASK
        cnt = s.integer("cnt", 0, 0xFFFF, CNT_SCI_EN) & CNT_KEEP
        timer = s.integer("timer", 0, 0xFFFFFF, 0)
        msb = s.integer("tmr_msb", 0, 1, timer >> 23)
        self.sts, self.en, self.cnt = sts, en, cnt
        self._set_timer(timer)
        self._tmr_msb = msb
        self._update_sci()
