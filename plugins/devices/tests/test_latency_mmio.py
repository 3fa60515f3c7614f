"""latency-mmio: timing-mode MMIO. Unit tests of the device on an event queue, and a real
guest on /dev/kvm with two vCPUs in parallel mode: vCPU 0's MMIO write and read each
complete after the configured simulated delay while it waits in RunningMMIOPending, and
vCPU 1 keeps running meanwhile."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kvmfw.bus import PendingAccess
from kvmfw.errors import CheckpointError, ConfigError, DeviceError
from kvmfw.eventq import TICKS_PER_MS

from kvmfw_devices.latency_mmio import DELAY_MAX, SIZE_MAX, LatencyMmio

GUESTS = Path(__file__).parent / "guests"


def test_an_access_completes_after_the_delay(h: Any) -> None:
    d = LatencyMmio(h.ctx, delay=500)
    eq = h.ctx.eventq
    w = d.write(8, b"\x01\x02\x03\x04")
    assert isinstance(w, PendingAccess) and not w.done and not d.is_drained()
    r = d.read(8, 4)
    assert isinstance(r, PendingAccess) and not r.done
    eq.service_one()
    assert w.done and not r.done and eq.cur_tick == 500
    eq.service_one()
    assert r.done and r.data == b"\x01\x02\x03\x04" and d.is_drained()
    assert [(a.is_write, a.completed - a.issued) for a in d.history] == [(True, 500),
                                                                         (False, 500)]
    assert d.stats["completed"] == 2 and d.stats["delay_ticks"] == 1000


def test_per_direction_delays_complete_each_access_at_its_own_time(h: Any) -> None:
    d = LatencyMmio(h.ctx, delay=100, read_delay=10)
    eq = h.ctx.eventq
    w = d.write(0, b"\xaa")
    r = d.read(0, 1)
    eq.service_one()
    assert r.done and not w.done and r.data == b"\x00" and eq.cur_tick == 10
    eq.service_one()
    assert w.done and d.mem[0] == 0xAA and eq.cur_tick == 100


def test_out_of_range_or_wide_accesses_complete_at_once(h: Any) -> None:
    d = LatencyMmio(h.ctx, size=16)
    assert d.read(12, 8) == bytes(8)
    assert d.read(0, 16) == bytes(16)
    assert d.write(15, b"\x01\x02") is None
    assert d.stats["bad_accesses"] == 3 and d.is_drained()


@pytest.mark.parametrize("params", [{"size": 0}, {"size": SIZE_MAX + 1}, {"delay": -2},
                                    {"delay": DELAY_MAX + 1}, {"read_delay": -5},
                                    {"base": (1 << 64) - 8}])
def test_configuration_is_bounded(h: Any, params: dict[str, int]) -> None:
    with pytest.raises(ConfigError, match="latency-mmio"):
        LatencyMmio(h.ctx, **params)


def test_completing_twice_is_a_device_error(h: Any) -> None:
    d = LatencyMmio(h.ctx, delay=1)
    r = d.read(0, 4)
    h.ctx.eventq.service_one()
    with pytest.raises(DeviceError, match="twice"):
        r.complete(bytes(4))


def test_state_is_the_memory_and_bad_state_is_refused(h: Any) -> None:
    d = LatencyMmio(h.ctx, size=8, delay=1)
    d.write(0, b"\x07")
    h.ctx.eventq.service_one()
    s = d.save()
    e = LatencyMmio(h.ctx, size=8)
    e.restore(s)
    assert e.mem == d.mem
    for bad in ({"mem": "00"}, {"mem": "zz" * 8}, {}):
        with pytest.raises(CheckpointError):
            e.restore(bad)


# --- a real guest ---------------------------------------------------------------------------

kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                         reason="needs a working /dev/kvm")
binutils = pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None,
                              reason="needs GNU as and ld to build the guest")


def _guest(tmp: Path) -> bytes:
    obj, out = tmp / "latency.o", tmp / "latency.bin"
    subprocess.run(["as", "--32", "-o", str(obj), str(GUESTS / "latency.S")], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0xf000", "--oformat", "binary", "-o",
                    str(out), str(obj)], check=True)
    return out.read_bytes()


def _real_mode_arch(guest: bytes) -> Any:
    """The core's plugin-free real-mode test arch: the repository's tests/ directory, or
    ``KVMFW_CORE_TESTS`` where these tests run from a copy (.ci/wheels)."""
    here = Path(__file__).resolve()
    core_tests = os.environ.get("KVMFW_CORE_TESTS") or here.parents[3] / "tests"
    sys.path.insert(0, str(core_tests))
    try:
        from realmode_arch import RealModeArch
    finally:
        sys.path.pop(0)
    return RealModeArch(1, guest)


class _Exit:
    def __init__(self, machine: Any) -> None:
        self.machine = machine

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.machine.request_exit(0, "guest done")


@kvm
@binutils
@pytest.mark.kvm
def test_one_vcpu_completes_exactly_after_the_delay(tmp_path: Path) -> None:
    from kvmfw.device import Range
    from kvmfw.machine import Machine, MachineConfig

    delay = 3 * TICKS_PER_MS
    m = Machine(MachineConfig(memory=0x80000), arch_plugin=_real_mode_arch(_guest(tmp_path)))
    try:
        # through its entry point, as --device on the command line
        dev = m.add_device_spec(f"latency-mmio,base=0xd0000,size=0x100,delay={delay}")
        assert isinstance(dev, LatencyMmio)
        m.map_device(Range("pio", 0x13, 1, "exit"), _Exit(m))
        r = m.run(timeout=60)
        assert r.reason == "guest done", r
        assert m.cpus[0].get_context().regs["rdi"] & 0xFFFFFFFF == 0x12345678
        assert m.cpus[0].stats.mmio_pending == 2
        assert [a.completed - a.issued for a in dev.history] == [delay, delay]
        assert dev.history[1].issued >= dev.history[0].completed
        assert r.ticks >= 2 * delay
    finally:
        m.close()


@kvm
@binutils
@pytest.mark.kvm
def test_guest_waits_in_mmio_pending_while_the_other_vcpu_runs(tmp_path: Path) -> None:
    from kvmfw.device import Range
    from kvmfw.machine import Machine, MachineConfig

    delay = 20 * TICKS_PER_MS
    seen: list[tuple[str, int]] = []

    class Watched(LatencyMmio):
        """Samples vCPU 0's status and vCPU 1's progress at issue and at completion."""

        def _defer(self, pending: PendingAccess, offset: int, data: bytes | None,
                   d: int) -> PendingAccess:
            seen.append(("issue", m.memory.read_u(0x500, 4)))
            return super()._defer(pending, offset, data, d)

        def _complete(self, entry: Any) -> None:
            seen.append((m.cpus[0].status.value, m.memory.read_u(0x500, 4)))
            super()._complete(entry)

    m = Machine(MachineConfig(memory=0x80000, cpus=2),  # RAM below the device at 0xd0000
                arch_plugin=_real_mode_arch(_guest(tmp_path)))
    try:
        dev = m.add_device(Watched(m.device_context(), base=0xD0000, size=0x100, delay=delay))
        m.map_device(Range("pio", 0x13, 1, "exit"), _Exit(m))
        c1 = m.cpus[1]
        c1.start_active = True
        c1.get_context().regs["rax"] = 2
        c1.mark_context_dirty()
        r = m.run(timeout=60)
        assert r.reason == "guest done", r
        assert m.cpus[0].get_context().regs["rdi"] & 0xFFFFFFFF == 0x12345678
        assert m.cpus[0].stats.mmio_pending == 2
        accesses = list(dev.history)
        assert [(a.is_write, a.size) for a in accesses] == [(True, 4), (False, 4)]
        # simulated time follows host time in parallel mode: never early, maybe late
        assert all(a.due - a.issued == delay <= a.completed - a.issued
                   for a in accesses), accesses
        assert r.ticks >= 2 * delay
        # while each access was outstanding vCPU 0 waited and vCPU 1 counted on
        assert [s for s, _ in seen] == ["issue", "RunningMMIOPending"] * 2, seen
        for (_, before), (_, after) in (seen[0:2], seen[2:4]):
            assert after > before, seen
    finally:
        m.close()


def test_zero_delay_answers_at_once(h: Any) -> None:
    d = LatencyMmio(h.ctx, delay=0, read_delay=7)
    assert d.write(4, b"\x09") is None and d.mem[4] == 9
    assert isinstance(d.read(4, 1), PendingAccess)  # its own read delay still applies
    e = LatencyMmio(h.ctx, delay=0)
    assert e.read(4, 1) == b"\x00" and e.is_drained()
