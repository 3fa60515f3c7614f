"""Register-level tests of the 16550: reset values, FIFOs, interrupts, loopback, bad accesses."""

from __future__ import annotations

import pytest
from conftest import Harness, RecordingRing
from kvmfw.errors import ConfigError
from kvmfw.eventq import TICKS_PER_MS

from kvmfw_devices import uart16550 as u
from kvmfw_devices.console import FLUSH_MS
from kvmfw_devices.uart16550 import Uart16550


def rd(dev: Uart16550, off: int) -> int:
    return dev.read(off, 1)[0]


def wr(dev: Uart16550, off: int, value: int) -> None:
    dev.write(off, bytes((value,)))


@pytest.fixture
def uart(h: Harness) -> Uart16550:
    return Uart16550(h.ctx)


def test_reset_values_match_hardware(uart: Uart16550) -> None:
    assert rd(uart, u.IER) == 0
    assert rd(uart, u.IIR) == u.IIR_NONE
    assert rd(uart, u.LCR) == 0
    assert rd(uart, u.MCR) == 0
    # a polling guest waits for THRE: it must be set at reset, with TEMT
    assert rd(uart, u.LSR) == u.LSR_THRE | u.LSR_TEMT
    assert rd(uart, u.MSR) == u.MSR_DCD | u.MSR_DSR | u.MSR_CTS
    assert rd(uart, u.SCR) == 0
    assert rd(uart, u.RBR) == 0
    wr(uart, u.LCR, u.LCR_DLAB)
    assert (rd(uart, u.DLL), rd(uart, u.DLM)) == (12, 0)


def test_default_ranges_are_com1(uart: Uart16550) -> None:
    (r,) = uart.ranges()
    assert (r.space, r.base, r.size) == ("pio", 0x3F8, 8)
    assert uart.params["irq"] == 4


def test_config_keys_parse_and_reject_unknown(h: Harness) -> None:
    dev = Uart16550(h.ctx, port="0x2f8", irq="3")
    assert dev.ranges()[0].base == 0x2F8 and dev.params["irq"] == 3
    with pytest.raises(ConfigError, match="unknown key"):
        Uart16550(h.ctx, baud="9600")


def test_thr_writes_reach_the_output(uart: Uart16550, h: Harness) -> None:
    for ch in b"hello\n":
        assert rd(uart, u.LSR) & u.LSR_THRE
        wr(uart, u.THR, ch)
    assert h.output.getvalue() == b"hello\n"
    assert uart.stats["tx_bytes"] == 6


def test_output_to_file(h: Harness, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "serial.log"
    dev = Uart16550(h.ctx, output=f"file:{path}")
    wr(dev, u.THR, ord("A"))
    dev.close()
    assert path.read_bytes() == b"A"


def test_divisor_latch_and_scratch(uart: Uart16550) -> None:
    wr(uart, u.LCR, 0x83)
    wr(uart, u.DLL, 0x01)
    wr(uart, u.DLM, 0x02)
    assert (rd(uart, u.DLL), rd(uart, u.DLM)) == (1, 2)
    wr(uart, u.LCR, 0x03)
    assert rd(uart, u.IER) == 0  # DLM and IER are different registers
    wr(uart, u.SCR, 0x5A)
    assert rd(uart, u.SCR) == 0x5A
    assert rd(uart, u.LCR) == 0x03


def test_ier_keeps_only_the_four_enable_bits(uart: Uart16550) -> None:
    wr(uart, u.IER, 0xFF)
    assert rd(uart, u.IER) == 0x0F


def test_thre_interrupt_raised_on_enable_and_cleared_by_iir_read(
        uart: Uart16550, h: Harness) -> None:
    irq = h.irq(4)
    wr(uart, u.IER, u.IER_THRE)
    assert irq.level == 1
    assert rd(uart, u.IIR) == u.IIR_THRI
    assert irq.level == 0
    assert rd(uart, u.IIR) == u.IIR_NONE
    wr(uart, u.THR, ord("x"))  # THR empties at once: THRE interrupts again
    assert irq.level == 1
    wr(uart, u.IER, 0)
    assert irq.level == 0


def test_received_data_interrupt_without_fifo(uart: Uart16550, h: Harness) -> None:
    irq = h.irq(4)
    wr(uart, u.IER, u.IER_RDA)
    uart.enqueue(b"ab")
    assert irq.level == 1
    assert rd(uart, u.LSR) & u.LSR_DR
    assert rd(uart, u.IIR) == u.IIR_RDI
    assert rd(uart, u.RBR) == ord("a")
    assert irq.level == 1  # "b" moved up from the host queue
    assert rd(uart, u.RBR) == ord("b")
    assert irq.level == 0
    assert not rd(uart, u.LSR) & u.LSR_DR


def test_fifo_holds_sixteen_and_host_input_is_never_lost(uart: Uart16550) -> None:
    wr(uart, u.FCR, u.FCR_ENABLE)
    uart.enqueue(bytes(range(40)))
    assert len(uart.rx_fifo) == u.FIFO_SIZE
    got = bytes(rd(uart, u.RBR) for _ in range(40))
    assert got == bytes(range(40))
    assert not rd(uart, u.LSR) & u.LSR_OE


def test_fifo_enabled_shows_in_iir_and_clear_rx(uart: Uart16550) -> None:
    wr(uart, u.FCR, u.FCR_ENABLE | 0xC0)
    assert rd(uart, u.IIR) & 0xC0 == 0xC0
    uart.enqueue(b"xyz")
    wr(uart, u.FCR, u.FCR_ENABLE | u.FCR_CLEAR_RX)
    assert not rd(uart, u.LSR) & u.LSR_DR
    wr(uart, u.FCR, 0)
    assert rd(uart, u.IIR) & 0xC0 == 0


def test_trigger_level_and_character_timeout(uart: Uart16550, h: Harness) -> None:
    irq = h.irq(4)
    wr(uart, u.FCR, u.FCR_ENABLE | 0x80)  # trigger at 8 bytes
    wr(uart, u.IER, u.IER_RDA)
    uart.enqueue(b"1234")
    assert irq.level == 0  # below the trigger level
    ev = h.ctx.eventq.service_one()  # four character times later
    assert ev is not None and h.ctx.eventq.cur_tick > 0
    assert irq.level == 1
    assert rd(uart, u.IIR) == u.IIR_CTI | 0xC0
    uart.enqueue(b"5678")
    assert rd(uart, u.IIR) == u.IIR_RDI | 0xC0
    for _ in range(8):
        rd(uart, u.RBR)
    assert irq.level == 0


def test_loopback_echoes_and_overruns(uart: Uart16550, h: Harness) -> None:
    wr(uart, u.MCR, u.MCR_LOOP | u.MCR_RTS | u.MCR_DTR)
    msr = rd(uart, u.MSR)
    assert msr & 0xF0 == u.MSR_CTS | u.MSR_DSR
    wr(uart, u.THR, 0x41)
    assert h.output.getvalue() == b""
    assert rd(uart, u.LSR) & u.LSR_DR
    assert rd(uart, u.RBR) == 0x41
    wr(uart, u.THR, 1)
    wr(uart, u.THR, 2)  # non-FIFO mode holds one byte: overrun
    lsr = rd(uart, u.LSR)
    assert lsr & u.LSR_OE
    assert not rd(uart, u.LSR) & u.LSR_OE  # cleared by reading LSR
    assert uart.stats["overruns"] == 1
    uart.enqueue(b"later")  # the serial input is disconnected in loopback: bytes wait
    assert rd(uart, u.RBR) == 1
    assert not rd(uart, u.LSR) & u.LSR_DR
    wr(uart, u.MCR, 0)
    assert bytes(rd(uart, u.RBR) for _ in range(5)) == b"later"


def test_the_compiled_path_reads_a_register_only_while_a_read_has_no_side_effect(
        uart: Uart16550) -> None:
    (fr,) = uart.fast_ranges()
    assert (fr.space, fr.base, fr.size) == ("pio", 0x3F8, 8)
    live = fr.constant

    def c_view() -> list[int | None]:
        return [live.get(i) for i in range(8)]

    def python_view() -> list[int]:  # what reads through the device return (DLAB as set)
        return [uart._read_reg(i) for i in range(8)]

    empty = u.LSR_THRE | u.LSR_TEMT
    assert c_view() == [None, 0, None, 0, 0, empty, u.DEFAULT_MSR, 0]
    wr(uart, u.IER, 0x05)
    wr(uart, u.LCR, 0x03)
    wr(uart, u.MCR, 0x0B)
    wr(uart, u.SCR, 0x5A)
    assert c_view() == [None, 0x05, None, 0x03, 0x0B, empty, u.DEFAULT_MSR, 0x5A]
    wr(uart, u.LCR, 0x83)  # DLAB: offsets 0 and 1 are the divisor latch
    wr(uart, u.DLL, 0x01)
    wr(uart, u.DLM, 0x02)
    got = c_view()
    assert got[:2] == [0x01, 0x02]
    assert [g for g in got if g is not None] == [v for v, g in zip(python_view(), got, strict=True)
                                                  if g is not None]
    wr(uart, u.LCR, 0x03)
    uart.enqueue(b"x")  # data ready: C answers LSR with DR set
    assert live.get(u.LSR) == empty | u.LSR_DR
    rd(uart, u.RBR)
    assert live.get(u.LSR) == empty
    wr(uart, u.MCR, u.MCR_LOOP)
    assert live.get(u.MSR) is None  # the loopback lines changed: deltas, cleared by a read
    assert rd(uart, u.MSR) & u.MSR_DELTAS
    assert live.get(u.MSR) == rd(uart, u.MSR)
    wr(uart, u.THR, 1)
    wr(uart, u.THR, 2)  # overrun: reading LSR now clears OE, so the read is the device's
    assert live.get(u.LSR) is None
    assert rd(uart, u.LSR) & u.LSR_OE
    assert live.get(u.LSR) == empty | u.LSR_DR
    uart.restore({**uart.save(), "lsr": u.LSR_THRE | u.LSR_BI, "scr": 7})  # restored state
    assert (live.get(u.LSR), live.get(u.SCR)) == (None, 7)
    uart.reset()
    assert c_view() == [None, 0, None, 0, 0, empty, u.DEFAULT_MSR, 0]


def test_loopback_fifo_overrun_after_sixteen(uart: Uart16550) -> None:
    wr(uart, u.FCR, u.FCR_ENABLE)
    wr(uart, u.MCR, u.MCR_LOOP)
    for i in range(17):
        wr(uart, u.THR, i)
    assert len(uart.rx_fifo) == 16
    assert rd(uart, u.LSR) & u.LSR_OE


def test_line_status_interrupt(uart: Uart16550, h: Harness) -> None:
    wr(uart, u.IER, u.IER_RLS)
    wr(uart, u.MCR, u.MCR_LOOP)
    wr(uart, u.THR, 1)
    wr(uart, u.THR, 2)
    assert h.irq(4).level == 1
    assert rd(uart, u.IIR) == u.IIR_RLSI
    rd(uart, u.LSR)
    assert h.irq(4).level == 0


def test_modem_status_interrupt_from_loopback_lines(uart: Uart16550, h: Harness) -> None:
    wr(uart, u.IER, u.IER_MS)
    wr(uart, u.MCR, u.MCR_LOOP)
    rd(uart, u.MSR)
    wr(uart, u.MCR, u.MCR_LOOP | u.MCR_RTS)
    assert h.irq(4).level == 1
    assert rd(uart, u.IIR) == u.IIR_MSI
    assert rd(uart, u.MSR) & u.MSR_DCTS
    assert h.irq(4).level == 0


def test_bad_accesses_counted_and_answered_with_ones(uart: Uart16550, h: Harness) -> None:
    assert uart.read(0, 2) == b"\xff\xff"
    uart.write(0, b"\x41\x42")
    assert uart.read(9, 1) == b"\xff"
    assert uart.stats["bad_accesses"] == 3
    assert h.output.getvalue() == b""


def test_no_irq_configured(h: Harness) -> None:
    dev = Uart16550(h.ctx, irq=-1)
    wr(dev, u.IER, u.IER_THRE)
    assert rd(dev, u.IIR) == u.IIR_THRI
    assert h.irqs == {}


def test_console_input_bytes_from_context(h: Harness) -> None:
    h.ctx.console_input = b"hi"
    dev = Uart16550(h.ctx)
    h.ctx.eventq.service_due()
    assert rd(dev, u.RBR) == ord("h") and rd(dev, u.RBR) == ord("i")


def test_input_from_a_pipe(h: Harness, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import time

    fifo = tmp_path / "in"
    os.mkfifo(fifo)
    dev = Uart16550(h.ctx, input=f"file:{fifo}")
    with open(fifo, "wb") as w:
        w.write(b"ok")
    deadline = time.monotonic() + 5
    while not dev.rx_fifo and time.monotonic() < deadline:
        h.ctx.eventq.service_due()
        time.sleep(0.01)
    assert bytes(rd(dev, u.RBR) for _ in range(2)) == b"ok"
    dev.close()


def test_reset_returns_to_power_on_state(uart: Uart16550) -> None:
    fresh = uart.save()
    wr(uart, u.LCR, 0x9B)
    wr(uart, u.FCR, 1)
    uart.enqueue(b"abc")
    uart.reset()
    assert uart.save() == fresh


def test_input_from_a_unix_socket(h: Harness, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket
    import time

    path = str(tmp_path / "console.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    dev = Uart16550(h.ctx, input=f"unix:{path}")
    conn, _ = server.accept()
    conn.sendall(b"sock")
    deadline = time.monotonic() + 5
    while len(dev.rx_fifo) + len(dev.host_queue) < 4 and time.monotonic() < deadline:
        h.ctx.eventq.service_due()
        time.sleep(0.01)
    assert bytes(rd(dev, u.RBR) for _ in range(4)) == b"sock"
    dev.close()
    conn.close()
    server.close()


def test_unreachable_socket_is_a_config_error(h: Harness, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="cannot connect"):
        Uart16550(h.ctx, input=f"unix:{tmp_path / 'nobody'}")


@pytest.mark.parametrize(("reg", "value"), [(u.IER, u.IER_THRE), (u.MCR, u.MCR_LOOP),
                                            (u.LCR, u.LCR_DLAB)])
def test_thr_writes_are_posted_only_while_they_change_nothing_a_read_sees(
        h: Harness, reg: int, value: int) -> None:
    ring = RecordingRing(h, (0x3F8, 1, True))
    uart = Uart16550(h.ctx)
    wr(uart, u.IER, u.IER_RDA)  # receive interrupts do not matter
    assert ring.calls == [] and not uart.posted.active
    wr(uart, u.THR, ord("a"))  # the first write reaches Python: it opens the zone
    assert ring.calls == [("open", True)] and uart.posted.active
    wr(uart, reg, value)  # an interrupt, loopback or the divisor latch: the zone ends,
    assert ring.calls[1:] == [("replay", True), ("close", True)]  # after what waits in it
    assert not uart.posted.active and not uart.posted._event.scheduled
    wr(uart, u.THR, ord("b"))  # (DLAB: this is DLL)
    assert len(ring.calls) == 3 and not uart.posted.active
    wr(uart, reg, 0)
    wr(uart, u.THR, ord("c"))
    assert ring.calls[3:] == [("open", True)]


def test_the_thr_zone_is_flushed_while_written_and_ends_when_not(h: Harness) -> None:
    ring = RecordingRing(h, (0x3F8, 1, True))
    uart = Uart16550(h.ctx)
    eq = h.ctx.eventq
    wr(uart, u.THR, ord("x"))
    flush = FLUSH_MS * TICKS_PER_MS
    assert uart.posted._event.when == flush
    wr(uart, u.THR, ord("y"))  # (a replayed write, as far as the device can tell)
    eq.cur_tick = flush
    eq.service_due()  # a flush that found writes: again in FLUSH_MS
    assert ring.calls == [("open", True), ("replay", True)] and uart.posted._event.when == 2 * flush
    eq.cur_tick = 2 * flush
    eq.service_due()  # none since: the zone ends
    assert ring.calls[2:] == [("replay", True), ("replay", True), ("close", True)]
    assert not uart.posted.active and not uart.posted._event.scheduled
    assert h.output.getvalue() == b"xy"


@pytest.mark.parametrize("why", ["coalesce=off", "no ring"])
def test_thr_writes_exit_when_posting_is_off_or_kvm_has_no_ring(h: Harness, why: str) -> None:
    ring = RecordingRing(h, (0x3F8, 1, True), ok=why != "no ring")
    uart = Uart16550(h.ctx, **({"coalesce": "off"} if why == "coalesce=off" else {}))
    for ch in b"ab\n":
        wr(uart, u.THR, ch)
    assert ring.calls == ([] if why == "coalesce=off" else [("open", False)])  # asked once
    assert not uart.posted.active and h.output.getvalue() == b"ab\n"


def test_a_restored_state_that_forbids_posting_ends_the_zone(h: Harness) -> None:
    ring = RecordingRing(h, (0x3F8, 1, True))
    uart = Uart16550(h.ctx)
    wr(uart, u.THR, ord("a"))
    state = uart.save()
    state["ier"] = u.IER_THRE
    uart.restore(state)
    assert not uart.posted.active and ring.calls[-1] == ("close", True)
