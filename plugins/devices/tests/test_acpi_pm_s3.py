"""ACPI PM block, S3: SLP_TYP=S3 with SLP_EN asks the machine to suspend and wake up."""

from __future__ import annotations

from typing import Any

from conftest import make_harness

from kvmfw_devices.acpi_pm import CNT_SLP_EN, STS_WAK, AcpiPm

REG_STS, REG_EN, REG_CNT = 0, 2, 4


def _pm(**params: Any) -> tuple[AcpiPm, list[tuple[str, dict[str, Any]]]]:
    h = make_harness()
    wakes: list[tuple[str, dict[str, Any]]] = []
    h.ctx.services["reset"] = lambda reason, **kw: wakes.append((reason, kw))
    return AcpiPm(h.ctx, **params), wakes


def test_s3_asks_the_machine_to_wake_and_sets_wak_sts() -> None:
    dev, wakes = _pm()
    dev.write(REG_EN, (0x100).to_bytes(2, "little"))
    dev.write(REG_CNT, ((1 << 10) | CNT_SLP_EN).to_bytes(2, "little"))
    assert wakes == [("guest suspended to RAM (ACPI S3)", {"wakeup": True})]
    assert dev.stats["s3_suspends"] == 1 and dev.stats["sleeps_ignored"] == 0
    assert int.from_bytes(dev.read(REG_STS, 2), "little") & STS_WAK
    assert int.from_bytes(dev.read(REG_EN, 2), "little") == 0x100  # state kept
    dev.write(REG_STS, STS_WAK.to_bytes(2, "little"))  # write 1 to clear
    assert not int.from_bytes(dev.read(REG_STS, 2), "little") & STS_WAK


def test_other_sleep_types_and_s3_disabled_are_counted_not_entered() -> None:
    dev, wakes = _pm(s3_typ="-1")
    for typ in (1, 2, 5):
        dev.write(REG_CNT, ((typ << 10) | CNT_SLP_EN).to_bytes(2, "little"))
    assert wakes == [] and dev.stats["sleeps_ignored"] == 3
    dev2, wakes2 = _pm(s3_typ="3")
    dev2.write(REG_CNT, ((3 << 10) | CNT_SLP_EN).to_bytes(2, "little"))
    assert len(wakes2) == 1


def test_s3_without_a_reset_service_is_ignored_as_before() -> None:
    h = make_harness()
    dev = AcpiPm(h.ctx)
    dev.write(REG_CNT, ((1 << 10) | CNT_SLP_EN).to_bytes(2, "little"))
    assert dev.stats["sleeps_ignored"] == 1 and h.exits == []
