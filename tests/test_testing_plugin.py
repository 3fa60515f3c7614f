"""kvmfw.testing: the pytest plugin's fixtures, the device harness, traces, assembling."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from kvmtest import MMIO, PIO, needs_kvm

from kvmfw.device import ConfigKey, Device, DeviceContext, Range, parse_int
from kvmfw.eventq import Event
from kvmfw.testing import DeviceHarness, assemble, trace

pytest_plugins = ("pytester",)


class Blinker(Device):
    """A small device: register 0 holds a value; writing 1 to register 1 raises its IRQ
    after ``delay`` ticks and prints ``!``."""

    name = "blinker"
    config = {"irq": ConfigKey(parse_int, 3, "interrupt line"),
              "delay": ConfigKey(parse_int, 100, "ticks before the interrupt")}

    def __init__(self, ctx: DeviceContext, **params: Any) -> None:
        super().__init__(ctx, **params)
        self.value = 0
        self.line = ctx.irq(self.params["irq"])
        self.ev = Event(self._fire, "blink")

    def ranges(self) -> list[Range]:
        return [Range("pio", 0x70, 2)]

    def read(self, offset: int, size: int) -> bytes:
        return self.value.to_bytes(size, "little") if offset == 0 else bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0:
            self.value = int.from_bytes(data, "little")
        elif data[0] == 1:
            self.ctx.eventq.schedule(self.ev, self.ctx.eventq.cur_tick + self.params["delay"])

    def _fire(self) -> None:
        self.line.raise_()
        self.ctx.console_output.write(b"!")


def test_device_harness_drives_registers_events_irqs_and_console() -> None:
    with DeviceHarness(Blinker, delay="0x10", irq=5) as h:
        h.write(0, 0xBEEF, 2)
        assert h.read(0, 2) == 0xBEEF
        h.write(1, 1)
        assert h.advance(0xF) == 0 and h.irq(5).level == 0
        assert h.advance(1) == 1
        assert h.irq(5).history == [1] and h.output == b"!"


def test_device_harness_takes_an_installed_device_by_spec() -> None:
    pytest.importorskip("kvmfw_devices", reason="kvmfw-devices is not installed here")
    with DeviceHarness("debug-exit,port=0xf4") as h:
        h.write(0, 3, 1)
        assert h.exits == [(7, h.exits[0][1])]


def test_the_fixtures_work_in_a_plugin_authors_test_file(pytester: pytest.Pytester) -> None:
    # the plugin is found through its pytest11 entry point (kvmfw installed), not imported
    pytester.makepyfile("""
        from kvmfw.device import Device, Range

        class Dev(Device):
            name = "dev"
            def ranges(self):
                return [Range("pio", 0x10, 1)]
            def read(self, offset, size):
                return bytes([0x2a]) * size

        def test_device(kvmfw_device):
            assert kvmfw_device(Dev).read(0) == 0x2a

        def test_kvm_fixture(kvmfw_kvm):
            pass
    """)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-rs")
    if needs_kvm.args[0]:  # no usable /dev/kvm: the fixture skips, saying why
        result.assert_outcomes(passed=1, skipped=1)
        result.stdout.fnmatch_lines(["*/dev/kvm*"])
    else:
        result.assert_outcomes(passed=2)


@pytest.mark.skipif(shutil.which("as") is None, reason="needs GNU as (binutils)")
def test_assemble_builds_elf_and_flat_guests(tmp_path: Path) -> None:
    elf = assemble(".globl _start\n_start: hlt\n", out_dir=tmp_path, bits=32)
    assert elf.read_bytes()[:5] == b"\x7fELF\x01"
    flat = assemble(".globl _start\n_start: hlt\n", out_dir=tmp_path, bits=16, name="f")
    assert flat.read_bytes() == b"\xf4"
    with pytest.raises(RuntimeError, match="as failed"):
        assemble("not an instruction\n", out_dir=tmp_path)


@needs_kvm
def test_trace_records_port_and_mmio_accesses(make_machine) -> None:  # type: ignore[no-untyped-def]
    m, _, rec = make_machine(PIO)
    t = trace(m)
    m.run(timeout=20)
    pio = [(a.addr, a.write, a.value) for a in t.pio]
    assert pio[:4] == [(0x10, True, ord("O")), (0x10, True, ord("K")), (0x11, False, 0x41),
                       (0x10, True, ord("B"))]
    assert t.writes("pio", 0x12)[0].value == 0xBEEF and t.writes("pio", 0x12)[0].size == 2
    assert rec.writes[:2] == [(0, b"O"), (0, b"K")]  # the device still saw every access

    m2, _, _ = make_machine(MMIO)
    t2 = trace(m2)
    m2.run(timeout=20)
    assert [(a.addr, a.write) for a in t2.mmio] == [(0x20010, True), (0x20020, False),
                                                     (0x20030, True)]
    assert t2.mmio[0].device == "recorder-mmio"


@needs_kvm
def test_trace_records_unclaimed_accesses(make_machine) -> None:  # type: ignore[no-untyped-def]
    m, _, _ = make_machine(PIO)
    m.bus.pio.unregister(0x10)
    t = trace(m)
    assert m.run(timeout=20).end.value == "halted"  # nobody took the exit port
    assert t.accesses and all(a.device is None for a in t.accesses)
    assert t.accesses[0].addr == 0x10 and t.accesses[0].data == b"O"
