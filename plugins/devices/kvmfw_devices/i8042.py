"""Intel 8042 keyboard controller: enough of the PC's i8042 for Linux to probe it and reset.

Register map (IBM PC/AT Technical Reference, "Keyboard controller"; ports 0x60 and 0x64)::

    0x60  read: output buffer (keyboard or aux data)   write: data for the keyboard or for
          the controller command in progress
    0x64  read: status  OBF(0) IBF(1) SYS(2) A2(3, last write was a command) INH(4, 1 = not
          inhibited) AUXB(5, output buffer holds aux data) TIMEOUT(6) PARITY(7)
          write: controller command

Controller commands: 0x20 read / 0x60 write command byte (KBD_INT(0) AUX_INT(1) SYS(2)
KBD_DIS(4) AUX_DIS(5) XLATE(6)); 0xa7/0xa8 disable/enable aux; 0xa9 test aux (-> 0x00);
0xaa self test (-> 0x55); 0xab test keyboard (-> 0x00); 0xad/0xae disable/enable keyboard;
0xd0 read / 0xd1 write output port (bit 0 = 0 resets the CPU, bit 1 = A20); 0xd2/0xd3 write
keyboard/aux output buffer; 0xd4 write to aux device (none attached); 0xf0-0xff pulse output
lines (bit 0 clear pulses the CPU reset line: 0xfe is the reset Linux uses with reboot=k).

The command byte starts as firmware leaves it (SeaBIOS under QEMU -M pc: keyboard interrupt
and XLATE on), since kvmfw boots kernels without firmware: with XLATE clear Linux takes the
controller for a non-translating one and drives the keyboard raw ("AT Raw Set 2" instead of
"AT Translated Set 2", the PC's usual mode). While XLATE is set the controller translates
what the keyboard sends to scan code set 1, as the 8042 does: the identify reply is 0xab
0x41 and the current scan code set reads 0x41 (set 2), as on QEMU.

A CPU reset goes to the machine's ``reset`` service: it reboots the machine, or with the
machine option ``reboot=off`` ends the run with ``reset_status`` (without the service:
``request_exit(reset_status, "reset ...")``). The keyboard
answers the commands Linux's atkbd sends (reset 0xff -> 0xfa 0xaa, identify 0xf2 -> 0xfa 0xab
0x83, echo 0xee, LEDs/typematic/scancode set with their argument byte, others -> 0xfa). The
device claims ports 0x60-0x64 as one range; 0x61-0x63 are not the 8042's and answer all
ones (with the in-kernel PIT, KVM handles port 0x61 before it reaches userspace).
"""

from __future__ import annotations

from collections import deque
from typing import Any, ClassVar

from kvmfw.device import ConfigKey, Device, DeviceContext, Range, parse_int
from kvmfw.errors import CheckpointError, ConfigError

from kvmfw_devices import KVMFW_PLUGIN_API as KVMFW_PLUGIN_API  # checked by the core
from kvmfw_devices._state import SavedState
from kvmfw_devices._util import ones

DATA = 0
STATUS = COMMAND = 4
RANGE_SIZE = 5

STAT_OBF = 0x01
STAT_SYS = 0x04
STAT_A2 = 0x08
STAT_UNLOCKED = 0x10
STAT_AUXB = 0x20

CB_KBD_INT = 0x01
CB_AUX_INT = 0x02
CB_SYS = 0x04
CB_KBD_DIS = 0x10
CB_AUX_DIS = 0x20
CB_XLATE = 0x40
CB_RESET_VALUE = CB_KBD_INT | CB_AUX_INT | CB_XLATE  # as firmware leaves it (see above)

OUT_RESET = 0x01  # active low: 0 holds the CPU in reset
OUT_A20 = 0x02
OUT_RESET_VALUE = 0xCF  # QEMU's: reset line high, A20 on, output buffers full bits

CMD_READ_CB = 0x20
CMD_WRITE_CB = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_INPUT = 0xC0
CMD_READ_OUTPORT = 0xD0
CMD_WRITE_OUTPORT = 0xD1
CMD_WRITE_KBD_OBUF = 0xD2
CMD_WRITE_AUX_OBUF = 0xD3
CMD_WRITE_AUX = 0xD4
CMD_DISABLE_A20 = 0xDD
CMD_ENABLE_A20 = 0xDF
CMD_PULSE_FIRST = 0xF0
CMD_RESET = 0xFE

KBD_ACK = 0xFA
KBD_SELF_TEST_OK = 0xAA
KBD_ECHO = 0xEE
KBD_CMD_SET_LEDS = 0xED
KBD_CMD_SCANCODE = 0xF0
KBD_CMD_IDENTIFY = 0xF2
KBD_CMD_TYPEMATIC = 0xF3
KBD_CMD_ENABLE = 0xF4
KBD_CMD_DISABLE = 0xF5
KBD_CMD_RESET = 0xFF
KBD_ID = (0xAB, 0x83)
# set 2 -> set 1 translation of the bytes this keyboard sends besides its fixed replies (the
# 8042's table, as QEMU's translate_table: the ID's 0x83 and the scan code set numbers)
XLATE_TABLE = {0x83: 0x41, 0x01: 0x43, 0x02: 0x41, 0x03: 0x3F}
OBUF_LIMIT = 16

WITH_ARGUMENT = (CMD_WRITE_CB, CMD_WRITE_OUTPORT, CMD_WRITE_KBD_OBUF, CMD_WRITE_AUX_OBUF,
                 CMD_WRITE_AUX)


class I8042(Device):
    """PS/2 controller with an AT keyboard; the CPU reset line ends the run."""

    name: ClassVar[str] = "i8042"
    config: ClassVar[dict[str, ConfigKey]] = {
        "port": ConfigKey(parse_int, 0x60, "data port (status/command is port + 4)"),
        "irq": ConfigKey(parse_int, 1, "keyboard interrupt line (-1: none)"),
        "aux_irq": ConfigKey(parse_int, 12, "aux (mouse) interrupt line (-1: none)"),
        "reset_status": ConfigKey(parse_int, 0, "exit status when the guest resets the CPU"),
    }

    def __init__(self, ctx: DeviceContext, **params: Any) -> None:
        super().__init__(ctx, **params)
        if not 0 <= self.params["reset_status"] <= 255:
            raise ConfigError(f"i8042: reset_status must be an exit status 0..255, not "
                              f"{self.params['reset_status']}")
        self.stats.update(resets=0, commands=0, unknown_commands=0, aux_bytes_dropped=0,
                          foreign_port=0)
        p = self.params
        self.kbd_irq = self.optional_irq(p["irq"])
        self.aux_irq = self.optional_irq(p["aux_irq"])
        self._levels = [False, False]
        self.reset()

    def ranges(self) -> list[Range]:
        return [Range("pio", self.params["port"], RANGE_SIZE, self.name)]

    def reset(self) -> None:
        self.command_byte = CB_RESET_VALUE
        self.status = STAT_A2 | STAT_UNLOCKED
        self.outport = OUT_RESET_VALUE
        self.obuf: deque[tuple[int, bool]] = deque()  # (byte, from aux)
        self.last_data = 0
        self.pending_command = 0  # controller command waiting for its data byte
        self.kbd_pending = 0  # keyboard command waiting for its argument
        self.kbd_enabled = True
        self._update_irq()

    # --- output buffer and interrupts --------------------------------------------------------

    def _queue(self, *data: int, aux: bool = False) -> None:
        for b in data:
            if len(self.obuf) < OBUF_LIMIT:
                self.obuf.append((b & 0xFF, aux))
        self._update_irq()

    def _update_irq(self) -> None:
        head = self.obuf[0] if self.obuf else None
        kbd = head is not None and not head[1] and bool(self.command_byte & CB_KBD_INT)
        aux = head is not None and head[1] and bool(self.command_byte & CB_AUX_INT)
        for i, (line, level) in enumerate(((self.kbd_irq, kbd), (self.aux_irq, aux))):
            if level and not self._levels[i]:
                line.raise_()
            elif not level and self._levels[i]:
                line.lower()
            self._levels[i] = level

    def _lower_all(self) -> None:
        for i, line in enumerate((self.kbd_irq, self.aux_irq)):
            if self._levels[i]:
                line.lower()
                self._levels[i] = False

    def status_byte(self) -> int:
        s = self.status & ~(STAT_OBF | STAT_AUXB)
        if self.obuf:
            s |= STAT_OBF | (STAT_AUXB if self.obuf[0][1] else 0)
        return s

    # --- guest accesses -----------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        self.stats["reads"] += 1
        if size != 1 or offset not in (DATA, STATUS):
            if size == 1 and 0 < offset < STATUS:
                self.stats["foreign_port"] += 1
            else:
                self.stats["bad_accesses"] += 1
            return ones(size)
        if offset == STATUS:
            return bytes((self.status_byte(),))
        if self.obuf:
            self.last_data = self.obuf.popleft()[0]
            # Reading deasserts the line; a byte still queued raises it anew (a fresh edge,
            # as the 8042 loads its next byte and as QEMU's ps2_read_data does). Left high,
            # the edge-triggered ISA pin would never fire for the second byte of a reply
            # (0xfa 0xab 0x83 to GETID, 0xfa 0xaa to RESET): Linux's atkbd then waits out
            # its 200-500 ms command timeouts, at boot and in its shutdown at reboot.
            self._lower_all()
            self._update_irq()
        return bytes((self.last_data,))

    def write(self, offset: int, data: bytes) -> None:
        self.stats["writes"] += 1
        if len(data) != 1 or offset not in (DATA, COMMAND):
            if len(data) == 1 and 0 < offset < COMMAND:
                self.stats["foreign_port"] += 1
            else:
                self.stats["bad_accesses"] += 1
            return
        if offset == COMMAND:
            self.status |= STAT_A2
            self._command(data[0])
        else:
            self.status &= ~STAT_A2
            self._data(data[0])
        self._update_irq()

    def _command(self, cmd: int) -> None:
        self.stats["commands"] += 1
        self.pending_command = 0
        if cmd == CMD_READ_CB:
            self._queue(self.command_byte)
        elif cmd in WITH_ARGUMENT:
            self.pending_command = cmd
        elif cmd == CMD_AUX_DISABLE:
            self.command_byte |= CB_AUX_DIS
        elif cmd == CMD_AUX_ENABLE:
            self.command_byte &= ~CB_AUX_DIS
        elif cmd in (CMD_AUX_TEST, CMD_KBD_TEST):
            self._queue(0x00)
        elif cmd == CMD_SELF_TEST:
            self.status |= STAT_SYS
            self._queue(0x55)
        elif cmd == CMD_KBD_DISABLE:
            self.command_byte |= CB_KBD_DIS
        elif cmd == CMD_KBD_ENABLE:
            self.command_byte &= ~CB_KBD_DIS
        elif cmd == CMD_READ_INPUT:
            self._queue(0x80)  # keyboard not inhibited
        elif cmd == CMD_READ_OUTPORT:
            self._queue(self.outport)
        elif cmd == CMD_DISABLE_A20:
            self.outport &= ~OUT_A20
        elif cmd == CMD_ENABLE_A20:
            self.outport |= OUT_A20
        elif cmd >= CMD_PULSE_FIRST:
            if not cmd & OUT_RESET:
                self._cpu_reset(f"i8042 command {cmd:#04x}")
        else:
            self.stats["unknown_commands"] += 1

    def _data(self, value: int) -> None:
        cmd, self.pending_command = self.pending_command, 0
        if cmd == CMD_WRITE_CB:
            self.command_byte = value
            self.status = (self.status & ~STAT_SYS) | (STAT_SYS if value & CB_SYS else 0)
        elif cmd == CMD_WRITE_OUTPORT:
            self.outport = value
            if not value & OUT_RESET:
                self._cpu_reset("i8042 output port reset bit cleared")
        elif cmd == CMD_WRITE_KBD_OBUF:
            self._queue(value)
        elif cmd == CMD_WRITE_AUX_OBUF:
            self._queue(value, aux=True)
        elif cmd == CMD_WRITE_AUX:
            self.stats["aux_bytes_dropped"] += 1  # no mouse: Linux's probe times out
        else:
            self._keyboard(value)

    def _keyboard(self, value: int) -> None:
        """A byte for the AT keyboard itself."""
        if self.kbd_pending:
            self.kbd_pending, arg_of = 0, self.kbd_pending
            self._queue(KBD_ACK)
            if arg_of == KBD_CMD_SCANCODE and value == 0:
                self._queue(self._translated(0x02))  # current scancode set
            return
        if value == KBD_CMD_RESET:
            self.kbd_enabled = True
            self._queue(KBD_ACK, KBD_SELF_TEST_OK)
        elif value == KBD_CMD_IDENTIFY:
            self._queue(KBD_ACK, KBD_ID[0], self._translated(KBD_ID[1]))
        elif value == KBD_ECHO:
            self._queue(KBD_ECHO)
        elif value in (KBD_CMD_SET_LEDS, KBD_CMD_SCANCODE, KBD_CMD_TYPEMATIC):
            self.kbd_pending = value
            self._queue(KBD_ACK)
        else:
            if value == KBD_CMD_ENABLE:
                self.kbd_enabled = True
            elif value == KBD_CMD_DISABLE:
                self.kbd_enabled = False
            self._queue(KBD_ACK)

    def _translated(self, value: int) -> int:
        """``value`` as the controller passes it on: translated to set 1 while XLATE is on."""
        if self.command_byte & CB_XLATE:
            return XLATE_TABLE.get(value, value)
        return value

    def _cpu_reset(self, why: str) -> None:
        self.stats["resets"] += 1
        reset = self.ctx.services.get("reset")
        if reset is not None:  # the machine reboots, or ends the run with reboot=off
            reset(f"reset ({why})", status=self.params["reset_status"])
        else:
            self.ctx.request_exit(self.params["reset_status"], f"reset ({why})")

    # --- state ------------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        return {"command_byte": self.command_byte, "status": self.status,
                "outport": self.outport, "obuf": [[b, aux] for b, aux in self.obuf],
                "last_data": self.last_data, "pending_command": self.pending_command,
                "kbd_pending": self.kbd_pending, "kbd_enabled": self.kbd_enabled}

    def restore(self, state: dict[str, Any]) -> None:
        s = SavedState(self.name, state)
        regs = {key: s.integer(key, 0, 0xFF) for key in (
            "command_byte", "status", "outport", "last_data", "pending_command", "kbd_pending")}
        raw = state.get("obuf")
        if not isinstance(raw, list) or len(raw) > OBUF_LIMIT or not all(
                isinstance(e, list) and len(e) == 2 and type(e[0]) is int and 0 <= e[0] <= 0xFF
                and isinstance(e[1], bool) for e in raw):
            raise CheckpointError(f"{self.name}: saved state obuf must be at most {OBUF_LIMIT} "
                                  "[byte, aux] pairs (a corrupt or foreign checkpoint)")
        enabled = s.flag("kbd_enabled")
        for key, value in regs.items():
            setattr(self, key, value)
        self.obuf = deque((b, aux) for b, aux in raw)
        self.kbd_enabled = enabled
        self._update_irq()
