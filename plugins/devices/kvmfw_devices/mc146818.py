"""Motorola MC146818 real-time clock and CMOS RAM (the PC's RTC on ports 0x70/0x71, IRQ 8).

Register map (MC146818A datasheet; index written to port 0x70, whose bit 7 masks NMI;
data at port 0x71)::

    0x00 seconds   0x01 seconds alarm   0x02 minutes   0x03 minutes alarm
    0x04 hours     0x05 hours alarm     0x06 day of week (1 = Sunday)
    0x07 day of month   0x08 month   0x09 year (two digits)   0x32 century (PC convention)
    0x0a A: UIP(7, read-only) divider(6..4) rate(3..0)            reset 0x26
    0x0b B: SET(7) PIE(6) AIE(5) UIE(4) SQWE(3) DM(2, 1 = binary) 24/12(1) DSE(0)   reset 0x02
    0x0c C: IRQF(7) PF(6) AF(5) UF(4); read-only, cleared by reading (lowers IRQ 8)
    0x0d D: VRT(7), valid RAM and time; read-only, always 0x80
    0x0e-0x7f CMOS RAM (PC layout: 0x15/0x16 base memory KiB, 0x17/0x18 and 0x30/0x31
              extended memory KiB, 0x34/0x35 memory above 16 MiB in 64 KiB units)

Time comes from the host clock (``clock=host``) or starts at ``time=`` and advances with
simulated time (``clock=fixed``: reproducible runs). While B.SET is set the clock registers
hold what the guest writes; clearing SET loads them. UIP is set during the last 244 us of
each second. The periodic interrupt runs at the rate in A (rates 1 and 2 mean 256 and
128 Hz, 3..15 mean 32768 >> (rate - 1) Hz) when PIE is set; the update-ended and alarm
interrupts are checked once a second when UIE or AIE is set (alarm bytes 0xc0-0xff match
any value).

Exits: the index-port writes wait in KVM's coalesced PIO ring (``coalesce=on``, the
default, where KVM has KVM_CAP_COALESCED_PIO; as QEMU's RTC registers them): an index write
only selects a register (and the NMI mask bit, which is state only), and the ring is
replayed before the next exit is serviced, so the data port always sees it. A guest
reading the clock makes one exit per register instead of two. (The run loop's C entry
tells it when the ring holds writes: exits pay nothing for the ring otherwise.)
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from kvmfw.device import (
    ConfigKey,
    Device,
    DeviceContext,
    FirmwareNode,
    Range,
    parse_bool,
    parse_int,
)
from kvmfw.errors import CheckpointError, ConfigError
from kvmfw.eventq import TICKS_PER_SECOND, Event

from kvmfw_devices import KVMFW_PLUGIN_API as KVMFW_PLUGIN_API  # checked by the core
from kvmfw_devices._state import SavedState
from kvmfw_devices._util import cancel, ones, schedule_at
from kvmfw_devices.irq import drive_irq

REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
REG_WEEKDAY = 0x06
REG_DAY = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32
TIME_REGS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR,
             REG_CENTURY)

A_UIP = 0x80
A_DIVIDER = 0x70
A_DIVIDER_NORMAL = 0x20
A_RATE = 0x0F
B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_DM_BINARY = 0x04
B_24H = 0x02
C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10
D_VRT = 0x80
HOUR_PM = 0x80

RESET_A = 0x26
RESET_B = 0x02
CMOS_SIZE = 128
UIP_SECONDS = 244e-6
INDEX_NMI_MASK = 0x80
MIN_TIME = -62135596800.0  # 0001-01-01T00:00:00Z: the RTC's clock stays within years 1..9999
MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z
RESTORE_SLACK = 1e9  # seconds a clock set to the end of 9999 may have run on before a save


_DEFAULT_TIME, _DEFAULT_STAMP = "2000-01-01T00:00:00", 946684800.0


def _parse_time(text: str) -> float:
    if text == _DEFAULT_TIME:
        return _DEFAULT_STAMP  # (datetime is imported only for another time or a set clock)
    import datetime as dt

    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"cmos-rtc: bad time {text!r} (use ISO 8601, e.g. "
                          "2024-01-01T00:00:00)") from exc
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


class Mc146818(Device):
    """CMOS RTC with alarm, periodic and update-ended interrupts."""

    name: ClassVar[str] = "cmos-rtc"
    config: ClassVar[dict[str, ConfigKey]] = {
        "port": ConfigKey(parse_int, 0x70, "index port (data port is port + 1)"),
        "irq": ConfigKey(parse_int, 8, "interrupt line (-1: none)"),
        "clock": ConfigKey(str, "host", "host (wall clock, UTC) or fixed (time= + simulated time)"),
        "time": ConfigKey(str, _DEFAULT_TIME, "start time for clock=fixed (UTC)"),
        "coalesce": ConfigKey(parse_bool, True, "index-port writes wait in KVM's coalesced "
                              "PIO ring (as QEMU's) instead of exiting"),
        "pnp": ConfigKey(parse_bool, False, "describe the RTC in ACPI as PNP0B00 (where the "
                         "OS finds ISA interrupts only through ACPI: hardware-reduced ACPI, "
                         "the microvm board, as QEMU's)"),
    }

    def __init__(self, ctx: DeviceContext, **params: Any) -> None:
        super().__init__(ctx, **params)
        if self.params["clock"] not in ("host", "fixed"):
            raise ConfigError(
                f"cmos-rtc: clock must be host or fixed, not {self.params['clock']!r}")
        self._start = _parse_time(self.params["time"])
        self.stats.update(interrupts=0, periodic=0, alarms=0, updates=0, bad_time=0)
        self.irq_line = self.optional_irq(self.params["irq"])
        self._irq_level = False
        self._periodic_event = Event(self._periodic, name="cmos-rtc.periodic")
        self._second_event = Event(self._second, name="cmos-rtc.second")
        self.offset = 0.0
        self.reset()
        self.coalesced = False
        """Index writes are posted (KVM_CAP_COALESCED_PIO): they select a register and
        change nothing else, and the ring is replayed before the next exit is serviced,
        so the data port always sees the latest index."""
        if self.params["coalesce"]:
            service = ctx.services.get("coalesced")
            self.coalesced = bool(service and service(self.params["port"], 1, pio=True))

    def ranges(self) -> list[Range]:
        return [Range("pio", self.params["port"], 2, self.name)]

    def firmware(self) -> list[FirmwareNode]:
        """ACPI ``PNP0B00`` (the index/data pair, edge-triggered IRQ) with ``pnp=on``;
        otherwise none: Linux registers the RTC at 0x70 by itself."""
        if not self.params["pnp"]:
            return []
        return [FirmwareNode("cmos-rtc", "pio", self.params["port"], 2,
                             irq=self.params["irq"], irq_trigger="edge", acpi_hid="PNP0B00")]

    def reset(self) -> None:
        self.index = 0
        self.nmi_disabled = False
        self.cmos = [0] * CMOS_SIZE
        self.cmos[REG_A] = RESET_A
        self.cmos[REG_B] = RESET_B
        self.cmos[REG_D] = D_VRT
        self._fill_memory_size()
        self._update_irq()
        self._reschedule()

    def _fill_memory_size(self) -> None:
        opts = self.ctx.options
        ram = int(opts.get("memory", opts.get("memory_size", self.ctx.memory.size)))
        ext_kib = min(max(ram - (1 << 20), 0) >> 10, 0xFFFF)
        above16 = min(max(ram - (16 << 20), 0) >> 16, 0xFFFF)
        c = self.cmos
        c[0x15], c[0x16] = 640 & 0xFF, 640 >> 8
        c[0x17], c[0x18] = ext_kib & 0xFF, ext_kib >> 8
        c[0x30], c[0x31] = ext_kib & 0xFF, ext_kib >> 8
        c[0x34], c[0x35] = above16 & 0xFF, above16 >> 8

    # --- time ----------------------------------------------------------------------------

    def _source(self) -> float:
        if self.params["clock"] == "fixed":
            return self._start + self.ctx.eventq.cur_tick / TICKS_PER_SECOND
        return time.time()

    def now(self) -> float:
        """The RTC's time in seconds since the epoch (UTC)."""
        return self._source() + self.offset

    def _enc(self, value: int) -> int:
        if self.cmos[REG_B] & B_DM_BINARY:
            return value
        return (value // 10) << 4 | value % 10

    def _dec(self, value: int) -> int:
        if self.cmos[REG_B] & B_DM_BINARY:
            return value
        hi, lo = value >> 4, value & 0xF
        if hi > 9 or lo > 9:
            raise ValueError(f"bad BCD {value:#x}")
        return hi * 10 + lo

    def _enc_hour(self, hour: int) -> int:
        if self.cmos[REG_B] & B_24H:
            return self._enc(hour)
        h12 = hour % 12 or 12
        return self._enc(h12) | (HOUR_PM if hour >= 12 else 0)

    def _dec_hour(self, value: int) -> int:
        if self.cmos[REG_B] & B_24H:
            return self._dec(value)
        h12 = self._dec(value & ~HOUR_PM)
        return h12 % 12 + (12 if value & HOUR_PM else 0)

    def _time_regs(self) -> dict[int, int]:
        t = time.gmtime(int(self.now()))
        return {REG_SECONDS: self._enc(t.tm_sec), REG_MINUTES: self._enc(t.tm_min),
                REG_HOURS: self._enc_hour(t.tm_hour),
                REG_WEEKDAY: self._enc((t.tm_wday + 1) % 7 + 1),
                REG_DAY: self._enc(t.tm_mday), REG_MONTH: self._enc(t.tm_mon),
                REG_YEAR: self._enc(t.tm_year % 100), REG_CENTURY: self._enc(t.tm_year // 100)}

    def _load_time(self, regs: dict[int, int]) -> None:
        """Set the clock from register values (what the guest wrote)."""
        import datetime as dt

        try:
            year = self._dec(regs[REG_CENTURY]) * 100 + self._dec(regs[REG_YEAR])
            when = dt.datetime(year, self._dec(regs[REG_MONTH]), self._dec(regs[REG_DAY]),
                               self._dec_hour(regs[REG_HOURS]), self._dec(regs[REG_MINUTES]),
                               self._dec(regs[REG_SECONDS]))
            # calendar.timegm's value; calendar would import locale at start-up
            stamp = (when - dt.datetime(1970, 1, 1)) // dt.timedelta(seconds=1)
        except (ValueError, OverflowError):
            self.stats["bad_time"] += 1
            return
        self.offset = stamp + (self.now() % 1.0) - self._source()

    # --- interrupts -----------------------------------------------------------------------

    def _irqf(self) -> bool:
        c, b = self.cmos[REG_C], self.cmos[REG_B]
        return bool(c & b & (C_PF | C_AF | C_UF))

    def _update_irq(self) -> None:
        if self._irqf():
            self.cmos[REG_C] |= C_IRQF
        level = bool(self.cmos[REG_C] & C_IRQF)
        self._irq_level = drive_irq(self.irq_line, level, self._irq_level, self.stats)

    def periodic_hz(self) -> float:
        """The periodic interrupt rate in Hz (0: off)."""
        a = self.cmos[REG_A]
        rate = a & A_RATE
        if rate == 0 or a & A_DIVIDER != A_DIVIDER_NORMAL:
            return 0.0
        if rate < 3:
            rate += 7
        return 32768 / (1 << (rate - 1))

    def _reschedule(self) -> None:
        eq = self.ctx.eventq
        b = self.cmos[REG_B]
        hz = self.periodic_hz()
        if b & B_PIE and hz:
            period = int(TICKS_PER_SECOND / hz)
            schedule_at(eq, self._periodic_event, (eq.cur_tick // period + 1) * period)
        else:
            cancel(eq, self._periodic_event)
        if b & (B_UIE | B_AIE) and not b & B_SET:
            frac = self.now() % 1.0
            schedule_at(eq, self._second_event,
                        eq.cur_tick + max(1, int((1.0 - frac) * TICKS_PER_SECOND)))
        else:
            cancel(eq, self._second_event)

    def _periodic(self) -> None:
        self.stats["periodic"] += 1
        self.cmos[REG_C] |= C_PF
        self._update_irq()
        self._reschedule()

    def _second(self) -> None:
        self.stats["updates"] += 1
        self.cmos[REG_C] |= C_UF
        regs = self._time_regs()
        c = self.cmos
        if all(c[alarm] >= 0xC0 or c[alarm] == regs[reg] for alarm, reg in (
                (REG_SECONDS_ALARM, REG_SECONDS), (REG_MINUTES_ALARM, REG_MINUTES),
                (REG_HOURS_ALARM, REG_HOURS))):
            self.cmos[REG_C] |= C_AF
            self.stats["alarms"] += 1
        self._update_irq()
        self._reschedule()

    # --- guest accesses -------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        self.stats["reads"] += 1
        if size != 1 or offset not in (0, 1):
            self.stats["bad_accesses"] += 1
            return ones(size)
        if offset == 0:
            return b"\xff"  # the index port is write-only
        return bytes((self._read_reg(self.index),))

    def _read_reg(self, reg: int) -> int:
        c = self.cmos
        if reg in TIME_REGS and not c[REG_B] & B_SET:
            return self._time_regs()[reg]
        if reg == REG_A:
            uip = A_UIP if c[REG_A] & A_DIVIDER == A_DIVIDER_NORMAL and \
                self.now() % 1.0 >= 1.0 - UIP_SECONDS and not c[REG_B] & B_SET else 0
            return (c[REG_A] & ~A_UIP) | uip
        if reg == REG_C:
            value = c[REG_C]
            c[REG_C] = 0
            self._update_irq()
            return value
        return c[reg]

    def write(self, offset: int, data: bytes) -> None:
        self.stats["writes"] += 1
        if len(data) != 1 or offset not in (0, 1):
            self.stats["bad_accesses"] += 1
            return
        value = data[0]
        if offset == 0:
            self.index = value & 0x7F
            self.nmi_disabled = bool(value & INDEX_NMI_MASK)
            return
        reg, c = self.index, self.cmos
        if reg in TIME_REGS:
            if c[REG_B] & B_SET:
                c[reg] = value
            else:
                regs = self._time_regs()
                regs[reg] = value
                self._load_time(regs)
        elif reg == REG_A:
            c[REG_A] = value & ~A_UIP
        elif reg == REG_B:
            old = c[REG_B]
            if value & B_SET and not old & B_SET:  # freeze the clock registers
                for r, v in self._time_regs().items():
                    c[r] = v
                value &= ~B_UIE
            c[REG_B] = value
            if old & B_SET and not value & B_SET:
                self._load_time({r: c[r] for r in TIME_REGS})
            self._update_irq()
        elif reg in (REG_C, REG_D):
            pass  # read-only
        else:
            c[reg] = value
        self._reschedule()

    # --- state ------------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        return {"index": self.index, "nmi_disabled": self.nmi_disabled,
                "cmos": list(self.cmos), "offset": self.offset}

    def restore(self, state: dict[str, Any]) -> None:
        s = SavedState(self.name, state)
        index = s.integer("index", 0, 0x7F)
        nmi_disabled = s.flag("nmi_disabled")
        cmos = s.integers("cmos", 0, 0xFF, CMOS_SIZE)
        if len(cmos) != CMOS_SIZE:
            raise CheckpointError(f"{self.name}: saved state cmos must hold {CMOS_SIZE} bytes "
                                  "(a corrupt or foreign checkpoint)")
        # the clock must stay within what the registers can show (years 1..9999)
        offset = s.number("offset", MIN_TIME - self._source(),
                          MAX_TIME + RESTORE_SLACK - self._source())
        self.index, self.nmi_disabled, self.cmos, self.offset = index, nmi_disabled, cmos, offset
        self._irq_level = not self.cmos[REG_C] & C_IRQF  # force the line to match
        self._update_irq()
        self._reschedule()

    def close(self) -> None:
        cancel(self.ctx.eventq, self._periodic_event)
        cancel(self.ctx.eventq, self._second_event)
