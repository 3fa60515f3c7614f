"""Fuzz of the x86 state restore (issue 10, item 1): a saved state with any part replaced
by any value either loads or raises StateError, never another exception or a crash, and a
refused state leaves the vCPU as it was."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from conftest import GUESTS, make_machine, requires_kvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvmfw.errors import StateError

from kvmfw_x86 import loaders
from kvmfw_x86.plugin import X86Plugin

pytestmark = [requires_kvm, pytest.mark.kvm]

VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
    st.sampled_from([0, 1, 0xFF, 0x100, 0xFFFF, 0x10000, 1 << 32, (1 << 64) - 1, 1 << 64, -1]),
    st.text(max_size=8), st.sampled_from(["00" * 512, "ff" * 4096, "ff" * 4097, "0x10", "zz"]),
    st.lists(st.integers(-2, 1 << 65), max_size=8),
    st.dictionaries(st.text(max_size=6), st.integers(-1, 1 << 65), max_size=4),
)


def paths(state: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(state, dict):
        for k, v in state.items():
            out += paths(v, (*prefix, k))
    return out


_M: dict[str, Any] = {}


def machine() -> tuple[Any, Any, dict[str, Any]]:
    if not _M:
        m, _ = make_machine()
        loaders.load(m, str(GUESTS / "long64.elf"), {})
        cpu = m.cpus[0]
        _M.update(m=m, cpu=cpu, good=m.hooks.call("save_arch_state", cpu=cpu))
    return _M["m"], _M["cpu"], _M["good"]


@pytest.fixture(scope="module", autouse=True)
def _close() -> Any:
    yield
    if _M:
        _M["m"].close()
        _M.clear()


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_corrupted_state_is_loaded_or_refused_typed(data: st.DataObject) -> None:
    m, cpu, good = machine()
    plugin = m.hooks.pm.get_plugin("arch:x86")
    assert isinstance(plugin, X86Plugin)
    bad = copy.deepcopy(good)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths(bad)))
        d = bad
        for k in path[:-1]:
            d = d[k]
        if data.draw(st.booleans()) and isinstance(d, dict):
            d[path[-1]] = data.draw(VALUES)
        elif isinstance(d, dict):
            d.pop(path[-1], None)
    if data.draw(st.booleans()) and isinstance(bad.get("regs"), dict):
        bad["regs"][data.draw(st.sampled_from(["_xsave", "cpu", "info", "r16"]))] = 1
    before = cpu.get_context().xsave, cpu.get_context().rip
    try:
        plugin.restore_arch_state(cpu, bad)
    except StateError:
        ctx = cpu.get_context()
        assert (ctx.xsave, ctx.rip) == before  # refused: nothing of it went in
    # either way the context still works and a good state still restores
    plugin.restore_arch_state(cpu, good)
    assert cpu.get_context().rip == good["regs"]["rip"]


_K: dict[str, Any] = {}


@pytest.fixture(scope="module", autouse=True)
def _close_kernel() -> Any:
    yield
    if _K:
        _K["m"].close()
        _K.clear()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_corrupted_vm_state_is_loaded_or_refused_typed(data: st.DataObject) -> None:
    """The same for the VM state (in-kernel PICs, IO-APIC, PIT, clock): loaded, or
    StateError with the irqchip as it was."""
    if not _K:
        m, _ = make_machine(irqchip="kernel")
        m.irq(4).raise_()
        _K.update(m=m, good=m.hooks.call("save_vm_state", machine=m))
    m, good = _K["m"], _K["good"]
    bad = dict(good)
    key = data.draw(st.sampled_from(sorted(good) + ["extra"]))
    if data.draw(st.booleans()):
        bad[key] = data.draw(VALUES)
    else:
        bad.pop(key, None)
    if key in ("pic_master", "pic_slave", "ioapic", "pit") and data.draw(st.booleans()):
        raw = bytearray.fromhex(good[key])  # flip one byte of a chip's state
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        bad[key] = raw.hex()
    chips = ("pic_master", "pic_slave", "ioapic")

    def now() -> dict[str, Any]:
        s = m.hooks.call("save_vm_state", machine=m)
        return {k: s[k] for k in chips}

    before = now()
    try:
        m.hooks.call("restore_vm_state", machine=m, state=bad)
    except StateError:
        assert now() == before
    m.hooks.call("restore_vm_state", machine=m, state=good)
    assert now() == {k: good[k] for k in chips}


_KC: dict[str, Any] = {}


@pytest.fixture(scope="module", autouse=True)
def _close_kernel_cpu() -> Any:
    yield
    if _KC:
        _KC["m"].close()
        _KC.clear()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_corrupted_kernel_irqchip_vcpu_state_is_loaded_or_refused(
        data: st.DataObject) -> None:
    """With the in-kernel irqchip (local APIC, MP state and the TSC rate in the state too):
    loaded, or StateError with the vCPU and its APIC as they were."""
    from kvmfw_x86.abi import X, addr, ffi

    if not _KC:
        m, _ = make_machine(irqchip="kernel")
        loaders.load(m, str(GUESTS / "long64.elf"), {})
        cpu = m.cpus[0]
        cpu.sync_kvm_state()  # the loader's writes into KVM: below KVM's state is compared
        _KC.update(m=m, cpu=cpu, good=m.hooks.call("save_arch_state", cpu=cpu))
    m, cpu, good = _KC["m"], _KC["cpu"], _KC["good"]
    bad = copy.deepcopy(good)
    for _ in range(data.draw(st.integers(1, 2))):
        path = data.draw(st.sampled_from(paths(bad)))
        d = bad
        for k in path[:-1]:
            d = d[k]
        if isinstance(d, dict):
            d[path[-1]] = data.draw(VALUES)

    def lapic() -> bytes:
        buf = ffi.new("struct kvm_lapic_state *")
        cpu.vcpu.ioctl(X.KVM_GET_LAPIC, addr(buf))
        raw = bytearray(ffi.buffer(buf))
        raw[0x390:0x394] = bytes(4)  # the timer's current count moves by itself
        return bytes(raw)

    before = cpu.get_context().xsave, cpu.get_context().rip, lapic()
    try:
        m.hooks.call("restore_arch_state", cpu=cpu, state=bad)
    except StateError:
        ctx = cpu.get_context()
        ctx._discard()  # what KVM holds, not the context's copy
        assert (ctx.xsave, ctx.rip, lapic()) == before
    m.hooks.call("restore_arch_state", cpu=cpu, state=good)
    assert cpu.get_context().rip == good["regs"]["rip"]
