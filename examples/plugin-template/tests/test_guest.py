"""The plugins under a real guest on /dev/kvm (kvmfw.testing: kvmfw_run_guest assembles
the guest with GNU as, boots it on an x86 machine and traces every port access). The
fixtures skip, saying why, where /dev/kvm or binutils is missing."""

from __future__ import annotations

import pytest

pytest.importorskip("kvmfw_x86", reason="the guest tests boot x86 guests (pip install kvmfw-x86)")
pytest.importorskip("kvmfw_devices", reason="the board uses kvmfw-devices' UART and debug-exit")

GUEST = """
    .globl _start
_start:
    mov $0x520, %dx
    mov $0x41, %al
    out %al, %dx            /* DATA = 0x41 */
    inc %dx
    in %dx, %al             /* NOT: 0xbe */
    not %al                 /* 0x41 again */
    mov $0x3f8, %dx
    out %al, %dx            /* print it on the UART: "A" */
    mov $0x522, %dx
    in %dx, %al             /* COUNT: 1 */
    out %al, $0xf4          /* debug-exit: status (1 << 1) | 1 = 3 */
    hlt
"""


def test_scratch_under_a_guest_on_the_template_board(kvmfw_run_guest) -> None:
    run = kvmfw_run_guest(GUEST, arch="x86", default_devices=True,
                          options={"board": "template-pc"})
    assert run.status == 3 and run.console == "A"
    assert [a.value for a in run.trace.writes("pio", 0x520)] == [0x41]
    assert run.trace.reads("pio", 0x521)[0].value == 0xBE
    names = [d.name for d in run.machine.devices]
    assert names == ["uart16550", "debug-exit", "scratch", "exit-counter"]
    counter = run.machine.devices[-1]
    assert counter.stats["IO"] == run.exits["io"] > 0  # the hook saw every port exit
    assert "system.exit-counter_3.IO" in run.machine.stats.dump("text")


def test_devices_by_spec_without_the_board(kvmfw_run_guest) -> None:
    run = kvmfw_run_guest(GUEST, arch="x86", devices=["uart16550", "debug-exit",
                                                      "scratch,irq=-1"])
    assert run.status == 3 and run.console == "A"
