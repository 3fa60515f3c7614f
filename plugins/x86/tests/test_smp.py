"""SMP: a multiboot guest finds the MP table, starts every AP with INIT-SIPI-SIPI through
its local APIC, and each AP reports from its own host thread; both interrupt modes."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from conftest import GUESTS, Reporter, requires_kvm
from kvmfw.eventq import Event

from kvmfw_x86 import loaders
from kvmfw_x86.lapic import DM_INIT, DM_STARTUP
from kvmfw_x86.plugin import X86Plugin

pytestmark = [requires_kvm, pytest.mark.kvm]


def _threads(rep: Reporter) -> list[tuple[int, str]]:
    """Record which host thread serviced each report."""
    seen: list[tuple[int, str]] = []
    write = rep.write

    def traced(offset: int, data: bytes) -> None:
        if offset == 0:
            seen.append((int.from_bytes(data, "little"), threading.current_thread().name))
        write(offset, data)

    rep.write = traced  # type: ignore[method-assign]
    return seen


def _at_its_hlt(m: Any, cpu: Any) -> bool:
    """The AP ran its trampoline to the end: halted on its hlt, or stopped just before it.
    The BSP ends the run once the last AP's counter increment lands, which may be before
    that AP's thread executed the hlt (seen in the nested environment, on a busy host)."""
    ctx = cpu.get_context()
    return bool(cpu.halted) or m.memory.read(ctx.cs.base + ctx.rip, 1) == b"\xf4"


@pytest.mark.parametrize("irqchip", ["kernel", "userspace"])
@pytest.mark.parametrize("cpus", [2, 4])
def test_every_cpu_comes_online(machine_factory: Any, cpus: int, irqchip: str) -> None:
    m, rep = machine_factory(cpus=cpus, irqchip=irqchip)
    seen = _threads(rep)
    loaders.load(m, str(GUESTS / "smp.elf"), {})
    r = m.run(timeout=300)
    assert r.reason == "reporter: guest done", rep.values
    v = [val for val, name in seen if name == "vcpu0"]
    assert v[0] == cpus  # processors the guest found in the MP table
    assert v[1] == 0  # the BSP's APIC id, read from its local APIC
    assert v[-2] == cpus  # CPUs online, BSP included
    assert v[-1] == (1 << cpus) - 2  # one bit per AP's APIC id
    ap_reports = sorted((val, name) for val, name in seen if val & 0xF00 == 0xA00)
    # every AP reported its own APIC id, serviced on its own host thread
    assert ap_reports == [(0xA00 | i, f"vcpu{i}") for i in range(1, cpus)]
    if irqchip == "userspace":
        lapics = X86Plugin.state(m.hooks.pm.get_plugin("arch:x86"), m).lapics  # type: ignore[arg-type]
        assert lapics is not None
        for ap in range(1, cpus):
            modes = [mode for s, t, mode, vec in lapics.ipis if t == ap]
            assert modes == [DM_INIT, DM_STARTUP, DM_STARTUP]
            assert all(vec == 0x06 for s, t, mode, vec in lapics.ipis if mode == DM_STARTUP)
        # the APs run their trampoline in real mode and halt there
        for cpu in m.cpus[1:]:
            ctx = cpu.get_context()
            assert ctx.mode == "real" and ctx.cs.selector == 0x600
            assert _at_its_hlt(m, cpu)


def test_userspace_init_parks_a_running_cpu_until_sipi(machine_factory: Any) -> None:
    """INIT to a CPU that is running stops it (parked, no interrupts taken); a SIPI
    restarts it in real mode at the vector's page."""
    m, rep = machine_factory(cpus=2, irqchip="userspace")
    seen = _threads(rep)
    loaders.load(m, str(GUESTS / "smp.elf"), {})
    m.run(timeout=300)
    st = X86Plugin.state(m.hooks.pm.get_plugin("arch:x86"), m)  # type: ignore[arg-type]
    ap = m.cpus[1]
    assert _at_its_hlt(m, ap)
    m.memory.write(0x7000, bytes.fromhex("b8 0b 0a e7 e0 e6 e4 f4"))  # out 0xa0b; end
    parked: list[tuple[bool, int, int]] = []

    def init_running() -> None:
        ap.wakeup()  # the AP runs its hlt loop again: INIT finds it running
        assert ap.status.value != "Idle"
        st.interrupts.init(1)

    def sipi() -> None:
        ctx = ap.get_context()
        parked.append((ap.halted, ctx.cs.selector, ctx.rip))
        st.interrupts.post(1, 0x30)  # a CPU waiting for SIPI takes no interrupt
        st.interrupts.sipi(1, 0x07)

    eq = m.eventq
    eq.schedule(Event(init_running, "init"), eq.cur_tick + 5_000_000_000)  # 5 ms
    eq.schedule(Event(sipi, "sipi"), eq.cur_tick + 100_000_000_000)  # 100 ms
    seen.clear()
    r = m.run(timeout=300)
    assert r.reason == "reporter: guest done"
    assert parked == [(True, 0xF000, 0xFFF1)]  # halted on the hlt at F000:FFF0
    assert seen == [(0xA0B, "vcpu1")]
    assert 1 not in st.interrupts.waiting_for_sipi
    assert (1, 0x30) not in st.interrupts.delivered
