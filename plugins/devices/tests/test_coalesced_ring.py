"""KVM's coalesced ring (issue 13): the RTC's index port, the 16550's THR writes (PIO) and
the PL011's DR writes (MMIO) go through it, and the guest sees the same either way."""

from __future__ import annotations

import pytest
from test_guests_kvm import build as build  # noqa: F401  (the fixture)
from test_guests_kvm import pytestmark as pytestmark  # noqa: F401
from test_guests_kvm import run


@pytest.mark.parametrize("coalesce", ["on", "off"])
def test_rtc_guest_reads_the_same_with_coalesced_index_writes(build, coalesce: str) -> None:  # type: ignore[no-untyped-def]
    result, out, m = run(build("rtc"), [
        "uart16550,coalesce=off", "debug-exit",  # (the RTC's writes alone in the ring)
        f"cmos-rtc,clock=fixed,time=2024-02-29T23:59:58,coalesce={coalesce}"])
    assert result.status == 1
    assert out == bytes([0x58, 0x59, 0x23, 0x29, 0x02, 0x24, 0x20, 0x26, 0x02, 0x80])
    rtc = m.devices[2]
    assert rtc.coalesced is (coalesce == "on")
    replayed = m.cpus[0].stats.coalesced_mmio
    if coalesce == "on":
        # every index write came through the ring, none as an exit of its own
        assert replayed >= 10 and replayed == rtc.stats["writes"]
    else:
        assert replayed == 0


@pytest.mark.parametrize(("guest", "device", "line", "status"), [
    ("uart_poll", "uart16550", b"kvmfw 16550\n", 0x21),  # polls LSR, ETBEI clear: posted
    ("uart_irq", "uart16550", b"irq-driven\n", None),  # ETBEI set: each write interrupts
    ("pl011_poll", "pl011", b"kvmfw pl011\n", 0x11),  # polls FR, IMSC.TX clear: posted
])
def test_console_output_waits_in_the_ring_and_the_guest_sees_the_same(  # type: ignore[no-untyped-def]
        build, guest: str, device: str, line: bytes, status: int | None) -> None:
    seen = {}
    for coalesce in ("on", "off"):
        result, out, m = run(build(guest, flat=guest == "uart_irq"),
                             [f"{device},coalesce={coalesce}", "debug-exit"],
                             load={"load_addr": 0x7C00} if guest == "uart_irq" else None)
        uart, replayed = m.devices[0], m.cpus[0].stats.coalesced_mmio
        seen[coalesce] = (out, result.status, uart.stats["tx_bytes"], uart.stats["interrupts"])
        if coalesce == "on" and status is not None:
            # every byte but the first (it opens the zone) came through the ring
            assert replayed == len(line) - 1 and uart.posted.active
        else:
            assert replayed == 0 and not uart.posted.active
    assert seen["on"] == seen["off"]
    assert seen["on"][0] == line and seen["on"][2] == len(line)
    if status is not None:
        assert seen["on"][1] == (status << 1) | 1


def test_16550_output_of_a_guest_that_stops_exiting_is_flushed(build) -> None:  # type: ignore[no-untyped-def]
    text = b"line one\nline two\nprompt> "  # then it spins: no exit would deliver the rest
    result, out, m = run(build("console_prompt"), ["uart16550"], until=text)
    assert out == text and result.status == 0  # the run ended because the text arrived
    assert m.cpus[0].stats.coalesced_mmio == len(text) - 1  # (the first opened the zone)
