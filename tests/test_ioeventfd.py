"""KVM_IOEVENTFD, KVM_IRQFD and KVM_SET_GSI_ROUTING through ``VM`` and the machine's device
services (issue 13): taken in the kernel, same guest behaviour without them."""

from __future__ import annotations

import os

import pytest
from kvmtest import MMIOLOOP, PIOLOOP, needs_kvm

from kvmfw.abi import Cap
from kvmfw.errors import KvmError, KvmfwError
from kvmfw.kvm import Kvm
from kvmfw.vm import IRQCHIP_IOAPIC

pytestmark = needs_kvm
N = 50


def _run_loop(make_machine, program: int, ioeventfd: bool) -> tuple[object, list, int]:
    m, _arch, rec = make_machine(program)
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        if ioeventfd:
            svc = m.device_context().services["ioeventfd"]
            if program == PIOLOOP:
                assert svc(fd, 0x10, 1, pio=True)
            else:
                assert svc(fd, 0x20010, 1)
        cpu = m.cpus[0]
        cpu.get_context().regs["rcx"] = N
        cpu.mark_context_dirty()
        r = m.run(timeout=60)
        try:
            rung = os.eventfd_read(fd)
        except BlockingIOError:
            rung = 0
        return r, list(rec.writes), rung
    finally:
        os.close(fd)


@pytest.mark.parametrize("program", [PIOLOOP, MMIOLOOP], ids=["pio", "mmio"])
def test_ioeventfd_writes_complete_in_the_kernel(make_machine, program: int) -> None:
    """The loop's N writes: without an ioeventfd N exits reach the device; with one they
    complete in KVM (the eventfd counts them) and only the exit-port write exits. The
    guest ends the same way either way."""
    r_off, writes_off, rung_off = _run_loop(make_machine, program, False)
    r_on, writes_on, rung_on = _run_loop(make_machine, program, True)
    assert r_off.status == r_on.status == 0  # type: ignore[attr-defined]
    assert len(writes_off) == N and rung_off == 0
    assert writes_on == [] and rung_on == N


def test_ioeventfd_datamatch_and_deassign(make_machine) -> None:
    """A doorbell with a value only catches that value; deassigned, writes exit again."""
    m, _arch, rec = make_machine(PIOLOOP)
    svc = m.device_context().services["ioeventfd"]
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert svc(fd, 0x10, 1, pio=True, datamatch=0x99)  # the guest writes AL=8
        assert svc(fd, 0x10, 1, pio=True, datamatch=0x99, deassign=True)
        with pytest.raises(KvmError):  # not assigned any more
            svc(fd, 0x10, 1, pio=True, datamatch=0x99, deassign=True)
        cpu = m.cpus[0]
        cpu.get_context().regs["rcx"] = 3
        cpu.mark_context_dirty()
        assert m.run(timeout=60).status == 0
        assert len(rec.writes) == 3
    finally:
        os.close(fd)


def test_irqfd_needs_an_irqchip_and_gsi_routing_is_bounded() -> None:
    with Kvm() as kvm:
        vm = kvm.create_vm()
        try:
            fd = os.eventfd(0)
            try:
                with pytest.raises(KvmError):  # no in-kernel irqchip yet
                    vm.irqfd(fd, 4)
                vm.create_irqchip()
                vm.irqfd(fd, 4)
                os.eventfd_write(fd, 1)  # raises GSI 4 in the kernel: no exit, no error
                vm.irqfd(fd, 4, deassign=True)
            finally:
                os.close(fd)
            limit = vm.check_extension(Cap.IRQ_ROUTING)
            assert limit > 0
            with pytest.raises(KvmfwError, match="at most"):
                vm.set_gsi_routing([(0, IRQCHIP_IOAPIC, 2)] * (limit + 1))
            vm.set_gsi_routing([(0, IRQCHIP_IOAPIC, 2)])
            assert vm.gsi_routes == [(0, IRQCHIP_IOAPIC, 2)]
            with pytest.raises(KvmError):  # pin 99 is not an IOAPIC pin
                vm.set_gsi_routing([(0, IRQCHIP_IOAPIC, 99)])
        finally:
            vm.close()
