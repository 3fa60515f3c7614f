"""The RTC's index port through KVM's coalesced PIO ring (issue 13): taken, and the guest
reads the same registers either way."""

from __future__ import annotations

import pytest
from test_guests_kvm import build as build  # noqa: F401  (the fixture)
from test_guests_kvm import pytestmark as pytestmark  # noqa: F401
from test_guests_kvm import run


@pytest.mark.parametrize("coalesce", ["on", "off"])
def test_rtc_guest_reads_the_same_with_coalesced_index_writes(build, coalesce: str) -> None:  # type: ignore[no-untyped-def]
    result, out, m = run(build("rtc"), [
        "uart16550", "debug-exit",
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
