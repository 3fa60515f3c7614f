"""National Semiconductor PC16550D UART (8250-compatible), the PC's COM ports.

Register map (PC16550D datasheet, table II; eight byte-wide registers, DLAB = LCR bit 7)::

    off  DLAB=0 read   DLAB=0 write   DLAB=1
    0    RBR receive   THR transmit   DLL divisor latch low
    1    IER interrupt enable         DLM divisor latch high
    2    IIR interrupt identification (read) / FCR FIFO control (write)
    3    LCR line control             4  MCR modem control
    5    LSR line status              6  MSR modem status
    7    SCR scratch

Interrupt priority (IIR bits 3..1): line status 0b011 > received data 0b010 > character
timeout 0b110 > THR empty 0b001 > modem status 0b000; IIR bit 0 set = none pending; IIR
bits 7..6 = 0b11 when the FIFOs are enabled.

Transmission is instantaneous: a byte written to THR goes to the output (batched by line
towards the host: :class:`~kvmfw_devices.console.ConsoleOutput`) and THR is empty again,
so THRE (and its interrupt, if enabled) is re-armed immediately, as in kvmtool and
vm-superio. Host input waits in a host queue and enters the 16-byte receive
FIFO as room frees up (a console never loses keystrokes); bytes looped back with MCR.LOOP
overrun the FIFO like the real part (LSR.OE). The character-timeout interrupt fires four
character times after the last FIFO activity when data sits below the trigger level.

Reads without side effects never reach Python: the eight registers are a live constant of
the compiled exit path (:class:`kvmfw.fastpath.LiveConstant`) that this device rewrites
whenever one changes. Open: IER (DLM), LCR, MCR, SCR, the divisor latch low with DLAB set,
LSR while no error bit is set and MSR while no delta bit is (reading clears those).
Closed: RBR (a read takes a byte) and IIR (a read acknowledges THRE). A console driver
polls LSR before every byte it writes, so this halves the exits that reach Python for
console output. Reads answered in C are counted in the vCPU's ``fast_exits`` and by
``kvmfw run --profile``, not in this device's ``reads``.

Writes to THR need no exit either while they raise no interrupt and change no register
(IER.ETBEI, MCR.LOOP and LCR.DLAB clear: how Linux's console and early console write,
polling LSR): from the first such write that reaches Python, THR is a zone of KVM's
coalesced ring (``coalesce=on``, the default; :class:`~kvmfw_devices.console.PostedOutput`).
The ring is replayed, in order, before the next exit of any kind is serviced (so a write
to IER, LCR or MCR, which ends the zone when it would allow an interrupt, loopback or the
divisor latch, comes after every byte before it) and within 20 ms for a guest that stops
exiting. A console line then costs the exits around it, not one per byte.
"""

from __future__ import annotations

from collections import deque
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
from kvmfw.eventq import TICKS_PER_SECOND, Event
from kvmfw.fastpath import FastRange, LiveConstant

from kvmfw_devices import KVMFW_PLUGIN_API as KVMFW_PLUGIN_API  # checked by the core
from kvmfw_devices._state import SavedState
from kvmfw_devices._util import cancel, ones, schedule_at
from kvmfw_devices.console import (
    COALESCE_KEY,
    OUTPUT_KEY,
    ConsoleInput,
    ConsoleOutput,
    PostedOutput,
    input_key,
)
from kvmfw_devices.irq import drive_irq

# Register offsets
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01  # received data available
IER_THRE = 0x02  # transmitter holding register empty
IER_RLS = 0x04  # receiver line status
IER_MS = 0x08  # modem status
IER_MASK = 0x0F

IIR_NONE = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_CTI = 0x0C
IIR_FIFO = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_DMA = 0x08
FCR_TRIGGER = 0xC0
TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_WLS = 0x03
LCR_STB = 0x04
LCR_PEN = 0x08
LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_FIFO_ERR = 0x80
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_DELTAS = 0x0F
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

FIFO_SIZE = 16
UART_CLOCK_HZ = 1_843_200  # the PC crystal: divisor 1 = 115200 baud
DEFAULT_DIVISOR = 12  # 9600 baud, as firmware leaves it
DEFAULT_MSR = MSR_DCD | MSR_DSR | MSR_CTS  # a terminal is attached (QEMU, kvmtool)
HOST_QUEUE_LIMIT = 4096  # host bytes held beside the FIFO; the console input keeps the rest
MAX_DELAY_TICKS = 1 << 62  # a pending timeout further away than this is a corrupt state


class Uart16550(Device):
    """A 16550A UART on eight IO ports (or an MMIO window with ``space=mmio``)."""

    name: ClassVar[str] = "uart16550"
    config: ClassVar[dict[str, ConfigKey]] = {
        "port": ConfigKey(parse_int, 0x3F8, "base IO port (or MMIO address with space=mmio)"),
        "irq": ConfigKey(parse_int, 4, "interrupt line (-1: none)"),
        "space": ConfigKey(str, "pio", "address space: pio or mmio"),
        "output": OUTPUT_KEY,
        "input": input_key(),
        "coalesce": COALESCE_KEY,
        "pnp": ConfigKey(parse_bool, False, "describe the port in ACPI as PNP0501 (where the "
                         "OS finds ISA interrupts only through ACPI: hardware-reduced ACPI, "
                         "the microvm board, as QEMU's)"),
    }

    def __init__(self, ctx: DeviceContext, **params: Any) -> None:
        super().__init__(ctx, **params)
        self.stats.update(tx_bytes=0, rx_bytes=0, overruns=0, interrupts=0)
        self.irq_line = self.optional_irq(self.params["irq"])
        self._timeout_event = Event(self._char_timeout, name=f"{self.name}.timeout")
        self._irq_level = False
        self._live = LiveConstant(8)
        self.output = ConsoleOutput(ctx, self.params["output"])
        self.posted = PostedOutput(ctx, self.params["space"], self.params["port"], 1,
                                   self.name, self.params["coalesce"])
        """THR writes wait in KVM's coalesced ring while they may (module doc)."""
        self.reset()
        self.input = ConsoleInput(ctx, self.params["input"], self.enqueue, name=self.name)

    def ranges(self) -> list[Range]:
        return [Range(self.params["space"], self.params["port"], 8, self.name)]

    def fast_ranges(self) -> list[FastRange]:
        """The registers, read in C while reading one has no side effect (module doc)."""
        return [FastRange(self.params["space"], self.params["port"], 8, constant=self._live,
                          width=1)]

    @property
    def lsr(self) -> int:
        """The line status register (host input changes it too: the compiled path's copy
        follows every assignment)."""
        return self._lsr

    @lsr.setter
    def lsr(self, value: int) -> None:
        self._lsr = value
        if value & (LSR_ERRORS | LSR_FIFO_ERR):
            self._live.close(LSR)  # a read clears them: the device's read must see it
        else:
            self._live.set(LSR, value)

    def _publish(self) -> None:
        """Rewrite the compiled path's copy of the registers only guest writes (and reset,
        restore, an MSR read) change."""
        live = self._live
        if self.lcr & LCR_DLAB:
            live.set(DLL, self.dll)
            live.set(DLM, self.dlm)
        else:
            live.close(RBR)
            live.set(IER, self.ier)
        live.close(IIR)
        live.set(LCR, self.lcr)
        live.set(MCR, self.mcr)
        if self.msr & MSR_DELTAS:
            live.close(MSR)
        else:
            live.set(MSR, self.msr)
        live.set(SCR, self.scr)

    def firmware(self) -> list[FirmwareNode]:
        """``ns16550a`` for a device tree (an MMIO UART); ACPI ``PNP0501`` (an ISA COM port,
        edge-triggered) only with ``pnp=on``: otherwise Linux finds 0x3f8 by legacy probing
        and its IRQ through the legacy PIC's identity mapping."""
        return [FirmwareNode("uart-16550", self.params["space"], self.params["port"], 8,
                             irq=self.params["irq"], compatible=("ns16550a",),
                             node_name="serial", irq_trigger="edge" if self.params["pnp"]
                             else "level", acpi_hid="PNP0501" if self.params["pnp"] else "",
                             properties=(("clock-frequency", 1843200),))]

    def reset(self) -> None:
        self.dll, self.dlm = DEFAULT_DIVISOR, 0
        self.ier = self.lcr = self.mcr = self.scr = self.fcr = 0
        self.lsr = LSR_THRE | LSR_TEMT
        self.msr = DEFAULT_MSR
        self.rx_fifo: deque[int] = deque()
        self.host_queue: deque[int] = deque()
        self.thr_pending = False  # the THRE interrupt source (cleared by reading IIR)
        self.timeout_pending = False
        cancel(self.ctx.eventq, self._timeout_event)
        self._publish()
        self._update_irq()

    # --- host side ---------------------------------------------------------------------

    def enqueue(self, data: bytes) -> int:
        """Bytes typed on the host: queued and moved into the receive FIFO as room allows;
        returns how many were taken (the console input holds the rest until :meth:`_refill`
        makes room)."""
        take = data[:max(HOST_QUEUE_LIMIT - len(self.host_queue), 0)]
        self.host_queue.extend(take)
        self._refill()
        self._update_irq()
        return len(take)

    @property
    def fifo_enabled(self) -> bool:
        return bool(self.fcr & FCR_ENABLE)

    @property
    def rx_capacity(self) -> int:
        return FIFO_SIZE if self.fifo_enabled else 1

    @property
    def trigger_level(self) -> int:
        return TRIGGER_LEVELS[self.fcr >> 6] if self.fifo_enabled else 1

    def _refill(self) -> None:
        if self.mcr & MCR_LOOP:
            return  # in loopback the serial input is disconnected: host bytes wait
        moved = False
        while self.host_queue and len(self.rx_fifo) < self.rx_capacity:
            self.rx_fifo.append(self.host_queue.popleft())
            self.stats["rx_bytes"] += 1
            self._data_arrived()
            moved = True
        if moved and len(self.host_queue) <= HOST_QUEUE_LIMIT // 2 and hasattr(self, "input"):
            self.input.resume()  # room for more host input (low-water mark: few, big refills)

    def _receive_line_byte(self, value: int) -> None:
        """A byte from the (looped-back) serial line: overruns when the FIFO is full."""
        if len(self.rx_fifo) >= self.rx_capacity:
            self.lsr |= LSR_OE
            self.stats["overruns"] += 1
            return
        self.rx_fifo.append(value)
        self.stats["rx_bytes"] += 1
        self._data_arrived()

    def _data_arrived(self) -> None:
        self.lsr |= LSR_DR
        self.timeout_pending = False
        if self.fifo_enabled:
            self._arm_timeout()

    def _char_time_ticks(self) -> int:
        divisor = (self.dlm << 8 | self.dll) or 1
        bits = 1 + 5 + (self.lcr & LCR_WLS) + (1 if self.lcr & LCR_PEN else 0) \
            + (2 if self.lcr & LCR_STB else 1)
        return bits * divisor * 16 * TICKS_PER_SECOND // UART_CLOCK_HZ

    def _arm_timeout(self) -> None:
        eq = self.ctx.eventq
        schedule_at(eq, self._timeout_event, eq.cur_tick + 4 * self._char_time_ticks())

    def _char_timeout(self) -> None:
        if self.rx_fifo and self.fifo_enabled:
            self.timeout_pending = True
            self._update_irq()

    # --- transmit side -------------------------------------------------------------------

    def _transmit(self, value: int) -> None:
        if self.mcr & MCR_LOOP:
            self._receive_line_byte(value)
        else:
            self.output.write(bytes((value,)))
        self.stats["tx_bytes"] += 1
        # transmission is instantaneous: THR and the shift register are empty again
        if ~self._lsr & (LSR_THRE | LSR_TEMT):
            self.lsr |= LSR_THRE | LSR_TEMT
        self.thr_pending = True

    # --- interrupts -------------------------------------------------------------------------

    def _interrupt_id(self) -> int:
        ier = self.ier
        if ier & IER_RLS and self.lsr & LSR_ERRORS:
            return IIR_RLSI
        if ier & IER_RDA and self.rx_fifo and len(self.rx_fifo) >= self.trigger_level:
            return IIR_RDI
        if ier & IER_RDA and self.timeout_pending and self.rx_fifo:
            return IIR_CTI
        if ier & IER_THRE and self.thr_pending:
            return IIR_THRI
        if ier & IER_MS and self.msr & MSR_DELTAS:
            return IIR_MSI
        return IIR_NONE

    def _update_irq(self) -> None:
        level = self._interrupt_id() != IIR_NONE
        self._irq_level = drive_irq(self.irq_line, level, self._irq_level, self.stats)

    # --- modem lines --------------------------------------------------------------------------

    def _loop_msr(self) -> int:
        """MSR's status bits as loopback wires them: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD."""
        m = self.mcr
        return ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))

    def _set_msr_status(self, status: int) -> None:
        old = self.msr
        deltas = 0
        if (old ^ status) & MSR_CTS:
            deltas |= MSR_DCTS
        if (old ^ status) & MSR_DSR:
            deltas |= MSR_DDSR
        if (old ^ status) & MSR_DCD:
            deltas |= MSR_DDCD
        if old & MSR_RI and not status & MSR_RI:
            deltas |= MSR_TERI  # trailing edge of ring indicator
        self.msr = (old & MSR_DELTAS) | deltas | status

    # --- guest accesses -------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        self.stats["reads"] += 1
        if size != 1 or not 0 <= offset < 8:
            self.stats["bad_accesses"] += 1
            return ones(size)
        return bytes((self._read_reg(offset),))

    def _read_reg(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR:
            if dlab:
                return self.dll
            value = self.rx_fifo.popleft() if self.rx_fifo else 0
            self._refill()
            self.timeout_pending = False
            if self.rx_fifo:
                if self.fifo_enabled:
                    self._arm_timeout()
            else:
                self.lsr &= ~LSR_DR
                cancel(self.ctx.eventq, self._timeout_event)
            self._update_irq()
            return value
        if offset == IER:
            return self.dlm if dlab else self.ier
        if offset == IIR:
            iid = self._interrupt_id()
            if iid == IIR_THRI:
                self.thr_pending = False  # reading IIR acknowledges THRE
                self._update_irq()
            return iid | (IIR_FIFO if self.fifo_enabled else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            value = self.lsr
            self.lsr &= ~(LSR_ERRORS | LSR_FIFO_ERR)
            self._update_irq()
            return value
        if offset == MSR:
            value = self.msr
            self.msr &= ~MSR_DELTAS
            self._live.set(MSR, self.msr)
            self._update_irq()
            return value
        return self.scr

    def write(self, offset: int, data: bytes) -> None:
        self.stats["writes"] += 1
        if offset == THR and self.posted.active and len(data) == 1:
            # a posted byte (mostly replayed from the ring): while the zone stands, DLAB,
            # ETBEI and LOOP are clear, so it changes no register, interrupt or zone
            self._transmit(data[0])
            self.posted.wrote(True)
            return
        if len(data) != 1 or not 0 <= offset < 8:
            self.stats["bad_accesses"] += 1
            return
        value = data[0]
        live = self._live  # each branch rewrites the registers it changes, for C
        if offset == SCR:
            # the scratch register (drivers probe for a UART with it) changes nothing else:
            # no interrupt, no posting rule to re-judge
            self.scr = value
            live.set(SCR, value)
            return
        dlab = self.lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                self.dll = value
                live.set(DLL, value)
            else:
                self.thr_pending = False
                self._transmit(value)
                self.posted.wrote(self._may_post())
        elif offset == IER:
            if dlab:
                self.dlm = value
                live.set(DLM, value)
            else:
                old = self.ier
                self.ier = value & IER_MASK
                live.set(IER, self.ier)
                if not old & IER_THRE and self.ier & IER_THRE and self.lsr & LSR_THRE:
                    self.thr_pending = True  # enabling ETBEI with THR empty interrupts at once
        elif offset == FCR:
            self._write_fcr(value)  # (LSR follows through its setter)
        elif offset == LCR:
            self.lcr = value
            self._publish()  # DLAB decides what offsets 0 and 1 read
        elif offset == MCR:
            self._write_mcr(value)
            self._publish()  # loopback rewires MSR
        else:  # LSR, MSR: read-only on the 16550 (factory test registers), ignored as parts do
            return
        self.posted.check(self._may_post())
        self._update_irq()

    def _may_post(self) -> bool:
        """Whether a THR write may wait in the ring: it raises no interrupt (ETBEI clear),
        loops nothing back and writes no divisor latch, so nothing a read (in Python or
        in C) sees depends on when it is delivered."""
        return not (self.ier & IER_THRE or self.mcr & MCR_LOOP or self.lcr & LCR_DLAB)

    def _write_fcr(self, value: int) -> None:
        if (value ^ self.fcr) & FCR_ENABLE:
            self.rx_fifo.clear()  # changing the FIFO mode resets both FIFOs
            self.lsr &= ~LSR_DR
        if value & FCR_CLEAR_RX:
            self.rx_fifo.clear()
            self.lsr &= ~LSR_DR
            self.timeout_pending = False
            cancel(self.ctx.eventq, self._timeout_event)
        self.fcr = value & (FCR_ENABLE | FCR_DMA | FCR_TRIGGER) if value & FCR_ENABLE else 0
        self._refill()

    def _write_mcr(self, value: int) -> None:
        value &= MCR_MASK
        was_loop = self.mcr & MCR_LOOP
        self.mcr = value
        if value & MCR_LOOP:
            self._set_msr_status(self._loop_msr())
        elif was_loop:
            self._set_msr_status(DEFAULT_MSR)
            self._refill()

    # --- state -------------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        self.output.flush()  # before a checkpoint or fork: written once, by this process
        eq = self.ctx.eventq
        when = self._timeout_event.when
        return {
            "dll": self.dll, "dlm": self.dlm, "ier": self.ier, "fcr": self.fcr, "lcr": self.lcr,
            "mcr": self.mcr, "lsr": self.lsr, "msr": self.msr, "scr": self.scr,
            "rx_fifo": list(self.rx_fifo), "host_queue": list(self.host_queue),
            "thr_pending": self.thr_pending, "timeout_pending": self.timeout_pending,
            "timeout_in": None if when is None else max(0, when - eq.cur_tick),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.output.flush()  # what the guest printed before it is restored
        s = SavedState(self.name, state)
        regs = {k: s.integer(k, 0, 0xFF) for k in ("dll", "dlm", "ier", "fcr", "lcr", "mcr",
                                                  "lsr", "msr", "scr")}
        regs["ier"] &= IER_MASK
        regs["mcr"] &= MCR_MASK
        rx = s.integers("rx_fifo", 0, 0xFF, FIFO_SIZE)
        host = s.integers("host_queue", 0, 0xFF, HOST_QUEUE_LIMIT)
        thr, timeout = s.flag("thr_pending"), s.flag("timeout_pending")
        timeout_in = s.opt_int("timeout_in", 0, MAX_DELAY_TICKS)
        for key, value in regs.items():
            setattr(self, key, value)
        self.rx_fifo, self.host_queue = deque(rx), deque(host)
        self.thr_pending, self.timeout_pending = thr, timeout
        cancel(self.ctx.eventq, self._timeout_event)
        if timeout_in is not None:
            eq = self.ctx.eventq
            schedule_at(eq, self._timeout_event, eq.cur_tick + timeout_in)
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
        cancel(self.ctx.eventq, self._timeout_event)
        self.posted.close()
