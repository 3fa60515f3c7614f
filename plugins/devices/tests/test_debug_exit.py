"""isa-debug-exit: QEMU's exit status convention, port and width keys."""

from __future__ import annotations

from conftest import Harness

from kvmfw_devices.debug_exit import DebugExit


def test_defaults_are_qemu_common_usage(h: Harness) -> None:
    (r,) = DebugExit(h.ctx).ranges()
    assert (r.space, r.base, r.size) == ("pio", 0xF4, 4)


def test_write_requests_exit_with_qemu_status(h: Harness) -> None:
    dev = DebugExit(h.ctx)
    dev.write(0, (0x10).to_bytes(4, "little"))
    assert h.exits[0][0] == (0x10 << 1) | 1
    dev.write(0, b"\x00")
    assert h.exits[1][0] == 1


def test_qemu_key_names(h: Harness) -> None:
    dev = DebugExit(h.ctx, iobase="0x501", iosize="2")
    (r,) = dev.ranges()
    assert (r.base, r.size) == (0x501, 2)


def test_write_beyond_width_is_counted_not_an_exit(h: Harness) -> None:
    dev = DebugExit(h.ctx, width="1")
    dev.write(0, b"\x01\x00")
    assert h.exits == [] and dev.stats["bad_accesses"] == 1
    assert dev.read(0, 1) == b"\x00"
