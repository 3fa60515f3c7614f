"""Opening and closing: /dev/kvm errors, and no fd or mapping left behind after close."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kvmtest import PIO, needs_kvm

from kvmfw.errors import GuestMemoryError, KvmUnavailableError
from kvmfw.kvm import Kvm
from kvmfw.memory import MemoryRegion


def _fds() -> dict[str, str]:
    """Open fds and what each refers to, without the one the listing itself opens (its
    number moves when another thread of the test process closes a lower fd)."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own, closed by now
    return out


def _maps() -> int:
    return len(Path("/proc/self/maps").read_text().splitlines())


def test_missing_dev_kvm_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(KvmUnavailableError, match="load the KVM module"):
        Kvm(str(tmp_path / "kvm"))


def test_a_file_that_is_not_kvm_is_refused_without_leaking(tmp_path: Path) -> None:
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    before = _fds()
    with pytest.raises(KvmUnavailableError, match="not a usable KVM device.*ENOTTY"):
        Kvm(str(fake))
    assert _fds() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can open any file; needs a normal user")
def test_permission_denied_says_how_to_fix() -> None:
    with pytest.raises(KvmUnavailableError, match="kvm' group"):
        Kvm("/dev/kvm")


@needs_kvm
def test_no_thread_outlives_a_run_with_a_timeout(make_machine) -> None:
    """The run's timeout watchdog is joined before run() returns: a fork (or a test of
    leaks) right after a run sees only the caller's thread."""
    import threading

    before = set(threading.enumerate())
    m, _, _ = make_machine(PIO)
    try:
        for _ in range(3):
            m.run(timeout=30)
            assert set(threading.enumerate()) == before
    finally:
        m.close()


@needs_kvm
def test_close_releases_every_fd_and_mapping(make_machine) -> None:
    # warm up imports and one-time allocations first
    m, _, _ = make_machine(PIO)
    m.run(timeout=10)
    m.close()
    fds, maps = _fds(), _maps()
    for _ in range(3):
        m, _, _ = make_machine(PIO, memory=1 << 20)
        m.run(timeout=10)
        m.cpus[0].get_context()
        m.close()
        m.close()  # idempotent
    left = {fd: what for fd, what in _fds().items() if fds.get(fd) != what}
    assert left == {}, f"fds left open by closed machines: {left}"
    assert _maps() <= maps


@needs_kvm
def test_memory_regions_overlap_and_slots() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        a = vm.add_ram(0, 0x10000)
        with pytest.raises(GuestMemoryError, match="overlaps ram"):
            vm.add_ram(0x8000, 0x10000)
        b = vm.add_ram(0x100000, 0x1000, "hi")
        assert (a.slot, b.slot) == (0, 1)
        vm.remove_memory(a)
        c = vm.add_ram(0x200000, 0x1000)
        assert c.slot == 0  # freed slots are reused
        vm.memory.write(0x200010, b"abc")
        assert vm.memory.read(0x200010, 3) == b"abc"
        with pytest.raises(GuestMemoryError, match="not in guest RAM"):
            vm.memory.read(0x200FFE, 4)  # runs off the end of the region
        assert vm.memory.contains(0x100000, 0x1000) and not vm.memory.contains(0x0, 1)


def test_unaligned_region_is_refused() -> None:
    with pytest.raises(GuestMemoryError, match="page-aligned"):
        MemoryRegion.anonymous(0x100, 0x1000)


def test_file_backed_private_region_is_copy_on_write(tmp_path: Path) -> None:
    img = tmp_path / "ram.img"
    img.write_bytes(b"A" * 4096)
    r = MemoryRegion.from_file(0, img, private=True)
    r.view[0:1] = b"B"
    assert bytes(r.view[0:2]) == b"BA"
    r.close()
    assert img.read_bytes()[:1] == b"A"  # the file never changes
    with pytest.raises(GuestMemoryError, match="cannot open"):
        MemoryRegion.from_file(0, tmp_path / "missing.img")


@needs_kvm
def test_in_kernel_device_attributes() -> None:
    import errno

    from kvmfw.errors import KvmError

    kvm_dev_type_vfio, group, add = 4, 1, 1  # KVM_DEV_TYPE_VFIO, KVM_DEV_VFIO_GROUP(_ADD)
    with Kvm() as kvm, kvm.create_vm() as vm:
        try:
            dev = vm.create_device(kvm_dev_type_vfio)
        except KvmError as exc:
            if exc.errno == errno.ENODEV:
                pytest.skip("this KVM has no in-kernel VFIO device (KVM_DEV_TYPE_VFIO)")
            raise
        assert dev.fd >= 0
        assert dev.has_attr(group, add) and not dev.has_attr(7, 7)
        with pytest.raises(KvmError) as info:
            dev.set_attr(group, add, 0xFFFFFFFF, size=4)  # fd -1: not a VFIO group
        assert info.value.ioctl == "KVM_SET_DEVICE_ATTR"
        assert info.value.errno == errno.EBADF
        assert "group 1 attr 0x1" in str(info.value)
    assert dev.fd == -1  # closed with the VM


@needs_kvm
def test_memory_slot_limit_is_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        monkeypatch.setattr(type(kvm), "nr_memslots", 2)
        vm.add_ram(0, 0x1000)
        vm.add_ram(0x1000, 0x1000)
        before = _maps()
        with pytest.raises(GuestMemoryError, match="no KVM memory slot left .* allows 2"):
            vm.add_ram(0x2000, 0x1000)
        assert len(vm.memory) == 2 and _maps() <= before


@needs_kvm
@pytest.mark.parametrize("cpus", [1, 2])
def test_rebinding_to_new_threads_leaks_no_perf_fd_or_timer(make_machine, monkeypatch,
                                                            cpus) -> None:
    """Every bind (a run from a new thread, a drain, each parallel run's vCPU threads)
    opens the cycle source's perf counters on its thread; the previous ones are closed (a
    software perf event stands in where the host has no PMU)."""
    import threading

    import kvmfw.timer as timer_mod

    real = timer_mod.lib

    class SoftwarePerf:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        @staticmethod
        def kvmfw_perf_open(type_: int, config: int, exclude_host: int) -> int:
            return real.kvmfw_perf_open(1, 0, 0)  # PERF_TYPE_SOFTWARE, CPU_CLOCK

    monkeypatch.setattr(timer_mod, "lib", SoftwarePerf())
    m, _, _ = make_machine(PIO, cpus=cpus)
    m.run(timeout=10)
    assert m.cpus[0].cycle_source is not None
    assert m.cpus[0].cycle_source.name == "perf-cycles"
    fds = len(_fds())
    for _ in range(5):
        t = threading.Thread(target=lambda: m.run(timeout=10))
        t.start()
        t.join(30)
        m.run(timeout=10)
        m.drain()
    assert len(_fds()) == fds  # each bind reopens them (the numbers may differ)
    m.close()
    assert len(_fds()) < fds  # the last source's counters went with the machine


@needs_kvm
def test_close_with_a_view_of_ram_still_held(make_machine) -> None:
    """A slice of guest RAM kept past the machine does not make close() fail (it raised
    BufferError: a sweep worker's row said 'internal error'); the mapping goes when the
    slice does."""
    import gc

    gc.collect()
    maps0 = _maps()
    m, _, _ = make_machine(PIO)
    ram = next(iter(m.memory))
    held = ram.view[0:16]
    m.run(timeout=20)
    m.close()
    assert held.nbytes == 16  # still readable: the mapping lives while the view does
    held.release()
    del held, ram, m
    gc.collect()
    assert _maps() == maps0
