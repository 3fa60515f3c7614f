"""i8042: reset values, controller and keyboard commands, interrupts, the CPU reset."""

from __future__ import annotations

import pytest
from conftest import Harness

from kvmfw_devices import i8042 as k
from kvmfw_devices.i8042 import I8042


def cmd(dev: I8042, value: int) -> None:
    dev.write(k.COMMAND, bytes((value,)))


def data_out(dev: I8042, value: int) -> None:
    dev.write(k.DATA, bytes((value,)))


def drain(dev: I8042) -> list[int]:
    out = []
    while dev.read(k.STATUS, 1)[0] & k.STAT_OBF:
        out.append(dev.read(k.DATA, 1)[0])
    return out


@pytest.fixture
def kbc(h: Harness) -> I8042:
    return I8042(h.ctx)


def test_ports_and_reset_status(kbc: I8042) -> None:
    (r,) = kbc.ranges()
    assert (r.space, r.base, r.size) == ("pio", 0x60, 5)
    assert kbc.read(k.STATUS, 1)[0] == k.STAT_A2 | k.STAT_UNLOCKED
    cmd(kbc, k.CMD_READ_CB)
    assert drain(kbc) == [k.CB_KBD_INT | k.CB_AUX_INT | k.CB_XLATE]


def test_starts_translating_as_firmware_leaves_it(kbc: I8042) -> None:
    """Regression: the command byte started without XLATE (no firmware sets it under kvmfw),
    so Linux drove the keyboard raw ("AT Raw Set 2 keyboard"; QEMU's SeaBIOS leaves XLATE on:
    "AT Translated Set 2 keyboard"). Translating, the keyboard's ID and scan code set
    number reach the guest in set 1, as from an 8042 and from QEMU's."""
    cmd(kbc, k.CMD_READ_CB)
    assert drain(kbc)[0] & k.CB_XLATE
    data_out(kbc, k.KBD_CMD_IDENTIFY)
    assert drain(kbc) == [0xFA, 0xAB, 0x41]
    data_out(kbc, k.KBD_CMD_SCANCODE)
    data_out(kbc, 0)
    assert drain(kbc) == [0xFA, 0xFA, 0x41]
    kbc.reset()
    cmd(kbc, k.CMD_READ_CB)
    assert drain(kbc)[0] & k.CB_XLATE


def test_untranslated_replies_once_xlate_is_cleared(kbc: I8042) -> None:
    cmd(kbc, k.CMD_WRITE_CB)
    data_out(kbc, k.CB_KBD_INT)
    data_out(kbc, k.KBD_CMD_IDENTIFY)
    assert drain(kbc) == [0xFA, 0xAB, 0x83]
    data_out(kbc, k.KBD_CMD_SCANCODE)
    data_out(kbc, 0)
    assert drain(kbc) == [0xFA, 0xFA, 0x02]


def test_reset_command_ends_the_run_cleanly(kbc: I8042, h: Harness) -> None:
    cmd(kbc, k.CMD_RESET)
    assert h.exits == [(0, "reset (i8042 command 0xfe)")]
    assert kbc.stats["resets"] == 1


def test_pulse_without_reset_bit_does_nothing(kbc: I8042, h: Harness) -> None:
    cmd(kbc, 0xFF)
    assert h.exits == []


def test_output_port_reset_bit(h: Harness) -> None:
    dev = I8042(h.ctx, reset_status="3")
    cmd(dev, k.CMD_WRITE_OUTPORT)
    data_out(dev, 0x02)
    assert h.exits[0][0] == 3


def test_self_tests(kbc: I8042) -> None:
    cmd(kbc, k.CMD_SELF_TEST)
    assert drain(kbc) == [0x55]
    assert kbc.read(k.STATUS, 1)[0] & k.STAT_SYS
    cmd(kbc, k.CMD_KBD_TEST)
    cmd(kbc, k.CMD_AUX_TEST)
    assert drain(kbc) == [0, 0]


def test_write_and_read_command_byte(kbc: I8042) -> None:
    cmd(kbc, k.CMD_WRITE_CB)
    data_out(kbc, 0x65)
    cmd(kbc, k.CMD_READ_CB)
    assert drain(kbc) == [0x65]
    cmd(kbc, k.CMD_AUX_ENABLE)
    cmd(kbc, k.CMD_KBD_DISABLE)
    cmd(kbc, k.CMD_READ_CB)
    assert drain(kbc) == [0x65 & ~k.CB_AUX_DIS | k.CB_KBD_DIS]


def test_keyboard_commands(kbc: I8042) -> None:
    data_out(kbc, k.KBD_CMD_RESET)
    assert drain(kbc) == [0xFA, 0xAA]
    data_out(kbc, k.KBD_CMD_IDENTIFY)
    assert drain(kbc) == [0xFA, 0xAB, 0x41]  # translated (XLATE on from reset)
    data_out(kbc, k.KBD_CMD_SET_LEDS)
    data_out(kbc, 0x07)
    assert drain(kbc) == [0xFA, 0xFA]
    data_out(kbc, k.KBD_CMD_SCANCODE)
    data_out(kbc, 0)
    assert drain(kbc) == [0xFA, 0xFA, 0x41]
    data_out(kbc, k.KBD_ECHO)
    assert drain(kbc) == [0xEE]
    data_out(kbc, k.KBD_CMD_DISABLE)
    assert drain(kbc) == [0xFA] and not kbc.kbd_enabled


def test_keyboard_interrupt_raised_and_cleared(kbc: I8042, h: Harness) -> None:
    data_out(kbc, k.KBD_CMD_ENABLE)
    assert h.irq(1).level == 1
    kbc.read(k.DATA, 1)
    assert h.irq(1).level == 0


def test_aux_output_buffer_uses_irq12(kbc: I8042, h: Harness) -> None:
    cmd(kbc, k.CMD_WRITE_AUX_OBUF)
    data_out(kbc, 0x5A)
    assert kbc.read(k.STATUS, 1)[0] & k.STAT_AUXB
    assert h.irq(12).level == 1 and h.irq(1).level == 0
    assert drain(kbc) == [0x5A]
    assert h.irq(12).level == 0


def test_interrupts_masked_by_command_byte(kbc: I8042, h: Harness) -> None:
    cmd(kbc, k.CMD_WRITE_CB)
    data_out(kbc, 0)
    cmd(kbc, k.CMD_WRITE_KBD_OBUF)
    data_out(kbc, 0x1C)
    assert h.irq(1).level == 0
    assert drain(kbc) == [0x1C]


def test_empty_buffer_rereads_last_byte(kbc: I8042) -> None:
    cmd(kbc, k.CMD_SELF_TEST)
    assert kbc.read(k.DATA, 1) == b"\x55"
    assert kbc.read(k.DATA, 1) == b"\x55"


def test_aux_writes_dropped_and_unknown_commands_counted(kbc: I8042) -> None:
    cmd(kbc, k.CMD_WRITE_AUX)
    data_out(kbc, 0xF2)
    assert drain(kbc) == [] and kbc.stats["aux_bytes_dropped"] == 1
    cmd(kbc, 0x01)
    assert kbc.stats["unknown_commands"] == 1


def test_bad_and_foreign_accesses(kbc: I8042) -> None:
    assert kbc.read(1, 1) == b"\xff"
    kbc.write(2, b"\0")
    assert kbc.stats["foreign_port"] == 2
    assert kbc.read(0, 2) == b"\xff\xff"
    kbc.write(4, b"\xfe\x00")
    assert kbc.stats["bad_accesses"] == 2


def test_output_buffer_is_bounded(kbc: I8042) -> None:
    for _ in range(40):
        data_out(kbc, k.KBD_CMD_ENABLE)
    assert len(drain(kbc)) == k.OBUF_LIMIT


@pytest.mark.parametrize("command, reply", [(k.KBD_CMD_RESET, [0xFA, 0xAA]),
                                            (k.KBD_CMD_IDENTIFY, [0xFA, 0xAB, 0x41])])
def test_every_reply_byte_gets_its_own_interrupt_edge(kbc: I8042, h: Harness, command: int,
                                                      reply: list[int]) -> None:
    """Regression: a multi-byte reply kept IRQ 1 high from its first byte to its last, so the
    edge-triggered IO-APIC pin fired once and Linux's atkbd (one byte per interrupt) waited
    out its command timeouts for the rest, at boot and in its shutdown before a reboot."""
    data_out(kbc, command)
    line = h.irq(1)
    assert line.history == [1]
    got = []
    for i in range(len(reply)):
        got.append(kbc.read(k.DATA, 1)[0])
        # every read lowers the line; a byte left behind raises it again: one edge per byte
        assert line.history[-1] == (1 if i < len(reply) - 1 else 0)
    assert got == reply
    assert line.history == [1, 0] * len(reply)
