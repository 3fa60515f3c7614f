"""PL011: reset values, ID registers, FIFOs, interrupts, loopback, bad accesses."""

from __future__ import annotations

import pytest
from conftest import Harness, RecordingRing

from kvmfw_devices import pl011 as p
from kvmfw_devices.pl011 import Pl011


def rd(dev: Pl011, off: int) -> int:
    return int.from_bytes(dev.read(off, 4), "little")


def wr(dev: Pl011, off: int, value: int) -> None:
    dev.write(off, value.to_bytes(4, "little"))


@pytest.fixture
def uart(h: Harness) -> Pl011:
    return Pl011(h.ctx)


def test_window_and_reset_values(uart: Pl011) -> None:
    (r,) = uart.ranges()
    assert (r.space, r.base, r.size) == ("mmio", 0x09000000, 0x1000)
    assert rd(uart, p.FR) == p.FR_TXFE | p.FR_RXFE
    assert rd(uart, p.CR) == 0x300
    assert rd(uart, p.IFLS) == 0x12
    for off in (p.RSR, p.ILPR, p.IBRD, p.FBRD, p.LCR_H, p.IMSC, p.RIS, p.MIS, p.DMACR):
        assert rd(uart, off) == 0, hex(off)


def test_amba_id_registers(uart: Pl011) -> None:
    assert [rd(uart, 0xFE0 + 4 * i) for i in range(8)] == list(p.ID_BYTES)


def test_transmit_reaches_output_and_raises_tx(uart: Pl011, h: Harness) -> None:
    wr(uart, p.IMSC, p.INT_TX)
    assert h.irqs.get(1) is None or h.irq(1).level == 0
    for ch in b"ok\n":
        uart.write(p.DR, bytes((ch,)))  # byte writes work too (earlycon)
    assert h.output.getvalue() == b"ok\n"
    assert h.irq(1).level == 1 and rd(uart, p.MIS) == p.INT_TX
    wr(uart, p.ICR, p.INT_TX)
    assert h.irq(1).level == 0


def test_receive_without_fifo(uart: Pl011, h: Harness) -> None:
    wr(uart, p.IMSC, p.INT_RX)
    uart.enqueue(b"ab")
    assert h.irq(1).level == 1
    assert not rd(uart, p.FR) & p.FR_RXFE and rd(uart, p.FR) & p.FR_RXFF
    assert rd(uart, p.DR) == ord("a")
    assert rd(uart, p.DR) == ord("b")
    assert h.irq(1).level == 0 and rd(uart, p.FR) & p.FR_RXFE


def test_fifo_trigger_level_and_timeout(uart: Pl011, h: Harness) -> None:
    wr(uart, p.LCR_H, p.LCR_H_FEN)
    wr(uart, p.IMSC, p.INT_RX | p.INT_RT)
    uart.enqueue(b"123")  # below the half-full trigger (8)
    assert h.irq(1).level == 0
    h.ctx.eventq.service_one()
    assert rd(uart, p.MIS) == p.INT_RT and h.irq(1).level == 1
    uart.enqueue(b"45678")
    assert rd(uart, p.RIS) & p.INT_RX
    got = bytes(rd(uart, p.DR) for _ in range(8))
    assert got == b"12345678" and h.irq(1).level == 0


def test_host_input_never_lost_beyond_fifo(uart: Pl011) -> None:
    wr(uart, p.LCR_H, p.LCR_H_FEN)
    uart.enqueue(bytes(range(40)))
    assert len(uart.rx_fifo) == p.FIFO_DEPTH
    assert bytes(rd(uart, p.DR) for _ in range(40)) == bytes(range(40))


def test_loopback_and_overrun(uart: Pl011, h: Harness) -> None:
    wr(uart, p.CR, 0x301 | p.CR_LBE)
    wr(uart, p.IMSC, p.INT_OE)
    wr(uart, p.DR, 0x41)
    wr(uart, p.DR, 0x42)  # FIFO off: one entry, overrun
    assert h.output.getvalue() == b""
    assert rd(uart, p.RIS) & p.INT_OE and h.irq(1).level == 1
    assert rd(uart, p.DR) == 0x41
    assert rd(uart, p.RSR) & p.RSR_OE
    wr(uart, p.RSR, 0)
    assert rd(uart, p.RSR) == 0


def test_baud_registers(uart: Pl011) -> None:
    wr(uart, p.IBRD, 13)
    wr(uart, p.FBRD, 0xFF)
    assert (rd(uart, p.IBRD), rd(uart, p.FBRD)) == (13, 0x3F)


def test_bad_accesses(uart: Pl011) -> None:
    assert uart.read(0x002, 1) == b"\xff"  # unaligned
    assert uart.read(0x100, 4) == b"\xff" * 4  # reserved
    assert uart.read(0, 8) == b"\xff" * 8
    wr(uart, p.FR, 0)  # read-only
    wr(uart, p.MIS, 0)
    assert uart.stats["bad_accesses"] == 5


def test_the_compiled_path_reads_what_the_device_would_while_a_read_is_harmless(
        uart: Pl011) -> None:
    (fr,) = uart.fast_ranges()
    assert (fr.space, fr.base, fr.size, fr.width) == ("mmio", 0x09000000, 0x1000, 4)
    live = fr.constant

    def agree() -> set[int]:
        """Every open register reads in C what the device's read returns; the open set."""
        opened = set()
        for off in range(0, p.WINDOW_SIZE, 4):
            got = [live.get(off + k) for k in range(4)]
            if None in got:
                assert got == [None] * 4, hex(off)  # a register is open or closed whole
                continue
            opened.add(off)
            assert bytes(got) == uart.read(off, 4), hex(off)
        return opened

    always = {p.RSR, p.FR, p.ILPR, p.IBRD, p.FBRD, p.LCR_H, p.CR, p.IFLS, p.IMSC, p.DMACR}
    ids = {p.ID_BASE + 4 * i for i in range(8)}
    assert agree() == always | ids  # DR, RIS, MIS and the rest: the device's
    for off, value in ((p.IBRD, 13), (p.FBRD, 1), (p.LCR_H, p.LCR_H_FEN | 0x60),
                       (p.IFLS, 0x09), (p.IMSC, p.INT_RX), (p.DMACR, 1), (p.ILPR, 5)):
        wr(uart, off, value)
        agree()
    uart.enqueue(b"ab")  # FR: RXFE clear
    assert live.get(p.FR) == p.FR_TXFE
    agree()
    rd(uart, p.DR)
    rd(uart, p.DR)
    assert live.get(p.FR) == p.FR_TXFE | p.FR_RXFE
    wr(uart, p.LCR_H, 0)  # one-byte FIFO
    wr(uart, p.CR, p.CR_RESET | p.CR_LBE)
    wr(uart, p.DR, 1)
    wr(uart, p.DR, 2)  # looped back into a full FIFO: OE in RSR, RXFF in FR
    assert live.get(p.RSR) == p.RSR_OE and live.get(p.FR) & p.FR_RXFF
    agree()
    uart.restore({**uart.save(), "ibrd": 7, "rx_fifo": []})
    assert live.get(p.IBRD) == 7
    agree()
    uart.reset()
    assert agree() == always | ids


@pytest.mark.parametrize(("reg", "value"), [(p.IMSC, p.INT_TX), (p.CR, 0x300 | p.CR_LBE)])
def test_dr_writes_are_posted_only_while_they_raise_no_interrupt(
        h: Harness, reg: int, value: int) -> None:
    ring = RecordingRing(h, (0x09000000, 4, False))
    uart = Pl011(h.ctx)
    wr(uart, p.IMSC, p.INT_RX | p.INT_RT)  # receive interrupts do not matter
    wr(uart, p.DR, ord("a"))  # the first write reaches Python: it opens the zone
    assert ring.calls == [("open", True)] and uart.posted.active
    wr(uart, reg, value)  # a TX interrupt or loopback: the zone ends, after what waits
    assert ring.calls[1:] == [("replay", True), ("close", True)] and not uart.posted.active
    wr(uart, p.DR, ord("b"))
    assert len(ring.calls) == 3
    wr(uart, reg, 0x300 if reg == p.CR else 0)
    wr(uart, p.DR, ord("c"))
    assert ring.calls[3:] == [("open", True)]
    wr(uart, p.DR, ord("\n"))
    assert h.output.getvalue() == (b"ac\n" if reg == p.CR else b"abc\n")  # (LBE: b looped)


def test_a_restored_state_with_tx_interrupts_ends_the_dr_zone(h: Harness) -> None:
    ring = RecordingRing(h, (0x09000000, 4, False))
    uart = Pl011(h.ctx)
    wr(uart, p.DR, ord("a"))
    state = uart.save()
    state["imsc"] = p.INT_TX
    uart.restore(state)
    assert not uart.posted.active and ring.calls[-1] == ("close", True)
