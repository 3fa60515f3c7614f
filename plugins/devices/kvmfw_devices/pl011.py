"""ARM PrimeCell UART (PL011), the console of ARM ``virt``-style boards.

Register map (ARM DDI 0183, "PrimeCell UART (PL011) Technical Reference Manual", 3.2)::

    0x000 DR     data; reads carry error bits FE(8) PE(9) BE(10) OE(11)
    0x004 RSR    receive status (read) / ECR error clear (write)
    0x018 FR     flags: CTS(0) DSR(1) DCD(2) BUSY(3) RXFE(4) TXFF(5) RXFF(6) TXFE(7) RI(8)
    0x020 ILPR   0x024 IBRD   0x028 FBRD   0x02c LCR_H (FEN(4): FIFOs on)
    0x030 CR     UARTEN(0) LBE(7, loopback) TXE(8) RXE(9) DTR(10) RTS(11); reset 0x300
    0x034 IFLS   FIFO trigger levels (RX bits 5..3, TX bits 2..0; reset 0x12, 1/2 full)
    0x038 IMSC   interrupt mask   0x03c RIS raw status   0x040 MIS masked status
    0x044 ICR    interrupt clear  0x048 DMACR
    0xfe0-0xffc  PeriphID 0x11 0x10 0x14 0x00, PCellID 0x0d 0xf0 0x05 0xb1

Interrupts (IMSC/RIS/MIS/ICR bits): RX(4), TX(5), RT(6, receive timeout), FE(7), PE(8),
BE(9), OE(10); the IRQ line is high while RIS & IMSC is non-zero. Transmission is
instantaneous (TXFE always set, TX interrupt re-armed after each write, as QEMU does); the
receive FIFO holds 16 characters (1 with FEN clear), RX fires at the trigger level, RT
fires 32 bit periods after data arrives below it. Host input waits in a host queue and is
never lost; looped-back bytes (CR.LBE) overrun a full FIFO (OE). Console plumbing is shared
with the 16550 (:mod:`kvmfw_devices.console`).

Reads without side effects never reach Python: the window is a live constant of the
compiled exit path (:class:`kvmfw.fastpath.LiveConstant`, registers 4 bytes wide) that
this device rewrites whenever a register changes. Open: RSR, FR, ILPR, IBRD, FBRD, LCR_H,
CR, IFLS, IMSC, DMACR and the ID registers; closed: DR (a read takes a byte), RIS and MIS
(they change with every interrupt source), everything else (the device answers). Linux's
console polls FR before every byte it writes, so this halves the exits that reach Python
for console output; reads answered in C are counted in the vCPU's ``fast_exits``, not in
this device's ``reads``. Writes to DR need no exit either while they raise no interrupt
(IMSC.TX clear, no loopback: Linux's console writes so, polling FR): they wait in KVM's
coalesced MMIO ring (``coalesce=on``, the default; :class:`~kvmfw_devices.console.PostedOutput`),
replayed in order before the next exit is serviced (RIS and MIS reads, which show the TX
bit a write sets, are such exits) and within 20 ms for a guest that stops exiting.
"""

from __future__ import annotations

from collections import deque
from typing import Any, ClassVar

from kvmfw.device import ConfigKey, Device, DeviceContext, FirmwareNode, Range, parse_int
from kvmfw.eventq import TICKS_PER_SECOND, Event
from kvmfw.fastpath import FastRange, LiveConstant

from kvmfw_devices import KVMFW_PLUGIN_API as KVMFW_PLUGIN_API  # checked by the core
from kvmfw_devices._state import SavedState
from kvmfw_devices._util import cancel, ones, schedule_at, to_bytes, to_int
from kvmfw_devices.console import (
    COALESCE_KEY,
    OUTPUT_KEY,
    ConsoleInput,
    ConsoleOutput,
    PostedOutput,
    input_key,
)
from kvmfw_devices.irq import drive_irq

DR = 0x000
RSR = 0x004
FR = 0x018
ILPR = 0x020
IBRD = 0x024
FBRD = 0x028
LCR_H = 0x02C
CR = 0x030
IFLS = 0x034
IMSC = 0x038
RIS = 0x03C
MIS = 0x040
ICR = 0x044
DMACR = 0x048
ID_BASE = 0xFE0
ID_BYTES = (0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1)
WINDOW_SIZE = 0x1000

DR_OE = 0x800
FR_RXFE = 0x010
FR_TXFF = 0x020
FR_RXFF = 0x040
FR_TXFE = 0x080
LCR_H_FEN = 0x10
CR_LBE = 0x080
CR_RESET = 0x300
IFLS_RESET = 0x12

INT_RX = 0x010
INT_TX = 0x020
INT_RT = 0x040
INT_OE = 0x400
INT_MASK = 0x7FF
RSR_OE = 0x08

FIFO_DEPTH = 16
TRIGGER_EIGHTHS = (1, 2, 4, 6, 7)  # 1/8, 1/4, 1/2, 3/4, 7/8 full
UART_CLOCK_HZ = 24_000_000
HOST_QUEUE_LIMIT = 4096  # host bytes held beside the FIFO; the console input keeps the rest
MAX_DELAY_TICKS = 1 << 62  # a pending timeout further away than this is a corrupt state
REG_MASKS = {"rsr": 0xF, "ilpr": 0xFF, "ibrd": 0xFFFF, "fbrd": 0x3F, "lcr_h": 0xFF,
             "cr": 0xFFFF, "ifls": 0x3F, "imsc": INT_MASK, "ris": INT_MASK, "dmacr": 0x7}
"""Each register's writable bits (what restore accepts)."""
LIVE_REGS = {RSR: "rsr", ILPR: "ilpr", IBRD: "ibrd", FBRD: "fbrd", LCR_H: "lcr_h", CR: "cr",
             IFLS: "ifls", IMSC: "imsc", DMACR: "dmacr"}
"""The registers read as they are kept, by offset: what the device's read returns and the
compiled path keeps a copy of (besides FR and the IDs)."""


class Pl011(Device):
    """PL011 UART on a 4 KiB MMIO window."""

    name: ClassVar[str] = "pl011"
    config: ClassVar[dict[str, ConfigKey]] = {
        "base": ConfigKey(parse_int, 0x09000000, "MMIO base of the 4 KiB window"),
        "irq": ConfigKey(parse_int, 1, "interrupt line (ARM: SPI number; -1: none)"),
        "output": OUTPUT_KEY,
        "input": input_key(),
        "coalesce": COALESCE_KEY,
    }

    def __init__(self, ctx: DeviceContext, **params: Any) -> None:
        super().__init__(ctx, **params)
        self.stats.update(tx_bytes=0, rx_bytes=0, overruns=0, interrupts=0)
        self.irq_line = self.optional_irq(self.params["irq"])
        self._irq_level = False
        self._timeout_event = Event(self._rx_timeout, name="pl011.timeout")
        self._live = LiveConstant(WINDOW_SIZE)
        for i, b in enumerate(ID_BYTES):
            self._live.set_int(ID_BASE + 4 * i, b, 4)
        self.output = ConsoleOutput(ctx, self.params["output"])
        self.posted = PostedOutput(ctx, "mmio", self.params["base"] + DR, 4, self.name,
                                   self.params["coalesce"])
        """DR writes wait in KVM's coalesced ring while they may (module doc)."""
        self.reset()
        self.input = ConsoleInput(ctx, self.params["input"], self.enqueue, name=self.name)

    def ranges(self) -> list[Range]:
        return [Range("mmio", self.params["base"], WINDOW_SIZE, self.name)]

    def fast_ranges(self) -> list[FastRange]:
        """The window, read in C while reading a register has no side effect (module doc)."""
        return [FastRange("mmio", self.params["base"], WINDOW_SIZE, constant=self._live,
                          width=4)]

    def _fr(self) -> int:
        n = len(self.rx_fifo)
        return FR_TXFE | (FR_RXFE if not n else 0) | (FR_RXFF if n >= self.rx_capacity else 0)

    def _publish(self) -> None:
        """Rewrite the compiled path's copy of the open registers (after anything that may
        have changed one: a guest write, a DR read, host input, reset, restore)."""
        live = self._live
        live.set_int(FR, self._fr(), 4)
        for offset, attr in LIVE_REGS.items():
            live.set_int(offset, getattr(self, attr), 4)

    def firmware(self) -> list[FirmwareNode]:
        """An ARM PrimeCell UART in a device tree (the console: ``stdout-path``)."""
        return [FirmwareNode("pl011", "mmio", self.params["base"], WINDOW_SIZE,
                             irq=self.params["irq"], compatible=("arm,pl011", "arm,primecell"))]

    def reset(self) -> None:
        self.rx_fifo: deque[int] = deque()  # 12-bit entries: data and error bits
        self.host_queue: deque[int] = deque()
        self.rsr = 0
        self.ilpr = self.ibrd = self.fbrd = self.lcr_h = self.dmacr = 0
        self.cr = CR_RESET
        self.ifls = IFLS_RESET
        self.imsc = 0
        self.ris = 0
        cancel(self.ctx.eventq, self._timeout_event)
        self._publish()
        self._update_irq()

    # --- FIFOs ------------------------------------------------------------------------------

    @property
    def rx_capacity(self) -> int:
        return FIFO_DEPTH if self.lcr_h & LCR_H_FEN else 1

    @property
    def rx_trigger(self) -> int:
        if not self.lcr_h & LCR_H_FEN:
            return 1
        sel = min((self.ifls >> 3) & 7, len(TRIGGER_EIGHTHS) - 1)
        return FIFO_DEPTH * TRIGGER_EIGHTHS[sel] // 8

    def enqueue(self, data: bytes) -> int:
        """Host bytes: queued and moved into the receive FIFO as room allows; returns how many
        were taken (the console input holds the rest until the FIFO drains)."""
        take = data[:max(HOST_QUEUE_LIMIT - len(self.host_queue), 0)]
        self.host_queue.extend(take)
        self._refill()
        self._publish()
        self._update_irq()
        return len(take)

    def _refill(self) -> None:
        if self.cr & CR_LBE:
            return  # in loopback the serial input is disconnected: host bytes wait
        moved = False
        while self.host_queue and len(self.rx_fifo) < self.rx_capacity:
            self._push_rx(self.host_queue.popleft())
            moved = True
        if moved and len(self.host_queue) <= HOST_QUEUE_LIMIT // 2 and hasattr(self, "input"):
            self.input.resume()  # room for more host input (low-water mark: few, big refills)

    def _push_rx(self, value: int) -> None:
        if len(self.rx_fifo) >= self.rx_capacity:
            self.rsr |= RSR_OE
            self.ris |= INT_OE
            self.stats["overruns"] += 1
            return
        self.rx_fifo.append(value)
        self.stats["rx_bytes"] += 1
        self._rx_levels()

    def _rx_levels(self) -> None:
        n = len(self.rx_fifo)
        if n >= self.rx_trigger:
            self.ris |= INT_RX
        else:
            self.ris &= ~INT_RX
        if n:
            eq = self.ctx.eventq
            schedule_at(eq, self._timeout_event, eq.cur_tick + self._bit_ticks() * 32)
        else:
            self.ris &= ~INT_RT
            cancel(self.ctx.eventq, self._timeout_event)

    def _bit_ticks(self) -> int:
        divisor = self.ibrd + self.fbrd / 64
        baud = UART_CLOCK_HZ / (16 * divisor) if divisor else 115200
        return int(TICKS_PER_SECOND / baud)

    def _rx_timeout(self) -> None:
        if self.rx_fifo:
            self.ris |= INT_RT
            self._update_irq()

    def _update_irq(self) -> None:
        level = bool(self.ris & self.imsc)
        self._irq_level = drive_irq(self.irq_line, level, self._irq_level, self.stats)

    # --- guest accesses -----------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        self.stats["reads"] += 1
        if size not in (1, 2, 4) or offset % 4 or offset >= WINDOW_SIZE:
            self.stats["bad_accesses"] += 1
            return ones(size)
        value = self._read_reg(offset)
        if value is None:
            self.stats["bad_accesses"] += 1
            return ones(size)
        return to_bytes(value, size)

    def _read_reg(self, offset: int) -> int | None:
        if offset == DR:
            value = self.rx_fifo.popleft() if self.rx_fifo else 0
            self.rsr = (self.rsr & RSR_OE) | ((value >> 8) & 0x7)  # OE is sticky
            self._refill()
            self._rx_levels()
            self.ris &= ~INT_RT if self.rx_fifo else ~(INT_RT | INT_RX)
            self._publish()
            self._update_irq()
            return value
        if offset == FR:
            return self._fr()
        if offset >= ID_BASE:
            return ID_BYTES[(offset - ID_BASE) // 4]
        if offset == RIS:
            return self.ris
        if offset == MIS:
            return self.ris & self.imsc
        attr = LIVE_REGS.get(offset)
        return None if attr is None else int(getattr(self, attr))

    def write(self, offset: int, data: bytes) -> None:
        self.stats["writes"] += 1
        if len(data) not in (1, 2, 4) or offset % 4 or offset >= WINDOW_SIZE:
            self.stats["bad_accesses"] += 1
            return
        value = to_int(data)
        if offset == DR:
            self._transmit(value & 0xFF)
            if self.cr & CR_LBE:  # looped back: the byte changed FR (and RSR on overrun)
                self._publish()
            self.posted.wrote(self._may_post())
            self._update_irq()
            return
        elif offset == RSR:
            self.rsr = 0
        elif offset == ILPR:
            self.ilpr = value & 0xFF
        elif offset == IBRD:
            self.ibrd = value & 0xFFFF
        elif offset == FBRD:
            self.fbrd = value & 0x3F
        elif offset == LCR_H:
            if (value ^ self.lcr_h) & LCR_H_FEN:
                self.rx_fifo.clear()
            self.lcr_h = value & 0xFF
            self._refill()
            self._rx_levels()
        elif offset == CR:
            was_loop = self.cr & CR_LBE
            self.cr = value & 0xFFFF
            if was_loop and not self.cr & CR_LBE:
                self._refill()
        elif offset == IFLS:
            self.ifls = value & 0x3F
            self._rx_levels()
        elif offset == IMSC:
            self.imsc = value & INT_MASK
        elif offset == ICR:
            self.ris &= ~value
        elif offset == DMACR:
            self.dmacr = value & 0x7
        else:
            self.stats["bad_accesses"] += 1  # read-only or unknown
            return
        live = self._live  # for C: the register written, and FR (the FIFO may have changed)
        attr = LIVE_REGS.get(offset)
        if attr is not None:
            live.set_int(offset, getattr(self, attr), 4)
        live.set_int(FR, self._fr(), 4)
        self.posted.check(self._may_post())
        self._update_irq()

    def _may_post(self) -> bool:
        """Whether a DR write may wait in the ring: it raises no interrupt (IMSC.TX clear)
        and loops nothing back, so nothing a read sees before RIS or MIS (Python's reads,
        after the ring) depends on when it is delivered."""
        return not (self.imsc & INT_TX or self.cr & CR_LBE)

    def _transmit(self, value: int) -> None:
        if self.cr & CR_LBE:
            self._push_rx(value)
        else:
            self.output.write(bytes((value,)))
        self.stats["tx_bytes"] += 1
        self.ris |= INT_TX  # the TX FIFO is empty again at once

    # --- state ------------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        self.output.flush()  # before a checkpoint or fork: written once, by this process
        when = self._timeout_event.when
        return {"rx_fifo": list(self.rx_fifo), "host_queue": list(self.host_queue),
                "rsr": self.rsr, "ilpr": self.ilpr, "ibrd": self.ibrd, "fbrd": self.fbrd,
                "lcr_h": self.lcr_h, "cr": self.cr, "ifls": self.ifls, "imsc": self.imsc,
                "ris": self.ris, "dmacr": self.dmacr,
                "timeout_in": None if when is None else max(0, when - self.ctx.eventq.cur_tick)}

    def restore(self, state: dict[str, Any]) -> None:
        self.output.flush()  # what the guest printed before it is restored
        s = SavedState(self.name, state)
        rx = s.integers("rx_fifo", 0, 0xFFF, FIFO_DEPTH)
        host = s.integers("host_queue", 0, 0xFF, HOST_QUEUE_LIMIT)
        regs = {key: s.integer(key, 0, mask) for key, mask in REG_MASKS.items()}
        timeout_in = s.opt_int("timeout_in", 0, MAX_DELAY_TICKS)
        self.rx_fifo, self.host_queue = deque(rx), deque(host)
        for key, value in regs.items():
            setattr(self, key, value)
        cancel(self.ctx.eventq, self._timeout_event)
        if timeout_in is not None:
            eq = self.ctx.eventq
            schedule_at(eq, self._timeout_event, eq.cur_tick + timeout_in)
        self._irq_level = not (self.ris & self.imsc)  # force the line to match
        self.posted.check(self._may_post())
        self._publish()
        self._update_irq()

    def flush(self) -> None:
        self.output.flush()

    def after_fork(self, child: int) -> None:
        """Output to a file goes to ``<path>.<pid>``; input stays with the parent
        (:mod:`kvmfw_devices.console`)."""
        self.output.after_fork(child)
        self.input.after_fork()

    def close(self) -> None:
        self.input.close()
        self.output.close()
        self.posted.close()
        cancel(self.ctx.eventq, self._timeout_event)
