"""Machine.fork on real guests (tests/guests/fork.S under the checkpoint tests' arch): a
warmed machine is forked; parent and children each get a different value through a
device, run on KVM from the shared state and compute the right result; guest RAM is shared
copy-on-write; neither process leaks fds or mappings; the variant helper collects results."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ckpt_arch import CkptArch
from kvmtest import needs_kvm

from kvmfw.device import Device, Range
from kvmfw.fork import CHILD_FAILED, ForkError
from kvmfw.machine import Machine, MachineConfig

pytestmark = needs_kvm
GUEST = Path(__file__).parent / "guests" / "fork.bin"
MEM = 64 << 20
WARM = 24 << 20  # bytes of guest RAM the host fills before forking


class Ports(Device):
    """Port 0x13 ends the run; port 0x14 answers ``value`` (32-bit); port 0x15 records
    the guest's result."""

    name = "fork-ports"

    def __init__(self, ctx: Any, machine: Machine) -> None:
        super().__init__(ctx)
        self.machine = machine
        self.value = 0
        self.results: list[int] = []
        self.forked_as: int | None = None

    def ranges(self) -> list[Range]:
        return [Range("pio", 0x13, 8, self.name)]

    def read(self, offset: int, size: int) -> bytes:
        return self.value.to_bytes(4, "little")[:size]

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0:
            self.machine.request_exit(0, "guest wrote the exit port")
        elif offset == 2:
            self.results.append(int.from_bytes(data, "little"))

    def after_fork(self, child: int) -> None:
        self.forked_as = child


def expected(v: int) -> int:
    r = 0
    for i in range(0x4000):
        r = (r * 31 + (((i * i) & 0xFFFF) ^ v)) & 0xFFFFFFFF
    return r


def make() -> tuple[Machine, Ports]:
    m = Machine(MachineConfig(memory=MEM), arch_plugin=CkptArch(0, GUEST.read_bytes()))
    ports = Ports(m.device_context(), m)
    m.add_device(ports)
    return m, ports


@pytest.fixture
def warmed() -> Iterator[tuple[Machine, Ports]]:
    m, ports = make()
    try:
        r = m.run(timeout=60)
        assert r.reason == "guest wrote the exit port" and ports.results == []
        ram = next(iter(m.memory))
        ram.view[1 << 20:(1 << 20) + WARM] = b"\x5a" * WARM  # resident, to be shared
        yield m, ports
    finally:
        m.close()


def _fds() -> list[str]:
    """The open fds, after a collection: an earlier test's garbage that holds an fd would
    otherwise be closed by whichever collection runs next, mid-comparison (a flake)."""
    import gc

    gc.collect()
    return sorted(os.listdir("/proc/self/fd"))


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return len(f.readlines())


def _region_smaps(addr: int) -> dict[str, int]:
    """The /proc/self/smaps fields (kB) of the mapping that holds ``addr`` (guest RAM's
    mapping may start a little before the region: kvmfw.memory.HUGE_PAGE)."""
    out: dict[str, int] = {}
    mine = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                mine = lo <= addr < hi
            elif mine and head[0].endswith(":") and len(head) >= 2 and head[1].isdigit():
                out[head[0][:-1]] = int(head[1])
    return out


def _child(fn: Any) -> None:
    """Run ``fn`` in a child and leave with its status (never back into pytest)."""
    try:
        status = fn()
    except BaseException as exc:
        os.write(2, f"fork child failed: {type(exc).__name__}: {exc}\n".encode())
        status = 99
    os._exit(status)


def _finish(m: Machine, ports: Ports, value: int) -> int:
    ports.value = value
    r = m.run(timeout=120)
    assert r.reason == "guest wrote the exit port", r
    return ports.results[-1]


def test_parent_and_two_children_compute_from_the_shared_state(
        warmed: tuple[Machine, Ports], tmp_path: Path) -> None:
    m, ports = warmed
    fds0, maps0 = _fds(), _maps()
    ram = next(iter(m.memory))
    pids = []
    for value in (0x1111, 0x2222):
        pid = m.fork()
        if pid == 0:
            def child(value: int = value) -> int:
                fds_c, maps_c = _fds(), _maps()
                assert ports.forked_as == os.getpid()
                result = _finish(m, ports, value)
                smaps = _region_smaps(ram.host_addr)
                (tmp_path / f"{os.getpid()}.json").write_text(json.dumps({
                    "result": result, "fds": fds_c, "maps": maps_c, "smaps": smaps,
                    "ram": ram.view[1 << 20:(1 << 20) + 8].hex()}))
                return 0
            _child(child)
        pids.append(pid)
    assert m.forks == 2
    # the parent keeps going, independently and at the same time
    assert _finish(m, ports, 0x3333) == expected(0x3333)
    ram.view[1 << 20] = 0xA5  # a parent write is not seen by the children (CoW)
    for pid in pids:
        _, st = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(st) == 0
    for pid, value in zip(pids, (0x1111, 0x2222), strict=True):
        rep = json.loads((tmp_path / f"{pid}.json").read_text())
        assert rep["result"] == expected(value)
        assert rep["ram"] == "5a" * 8
        # the child closed the parent's KVM fds and opened as many of its own
        assert len(rep["fds"]) == len(fds0), (rep["fds"], fds0)
        assert rep["maps"] == maps0
        # the warmed RAM is still shared with the parent (only touched pages copied)
        sm = rep["smaps"]
        assert sm["Shared_Dirty"] + sm.get("Shared_Clean", 0) >= WARM // 1024 * 9 // 10, sm
        assert sm["Private_Dirty"] < WARM // 1024 // 4, sm
    assert _fds() == fds0 and _maps() == maps0
    assert len({expected(v) for v in (0x1111, 0x2222, 0x3333)}) == 3


def test_fork_variants_collects_every_child(warmed: tuple[Machine, Ports]) -> None:
    m, ports = warmed
    fds0 = _fds()
    values = [1, 7, 0xABCD]
    out = m.fork_variants(values, lambda mm, v: _finish(mm, ports, v), max_parallel=2)
    assert [r.value for r in out] == values
    assert [r.status for r in out] == [0, 0, 0], [r.error for r in out]
    assert [r.result for r in out] == [expected(v) for v in values]
    assert _fds() == fds0
    # the parent's machine is where it was: it finishes with its own value
    assert _finish(m, ports, 5) == expected(5)


def test_a_failing_variant_reports_its_error(warmed: tuple[Machine, Ports]) -> None:
    m, _ = warmed

    def boom(mm: Machine, v: int) -> None:
        raise ValueError(f"variant {v} refuses")

    out = m.fork_variants([3], boom)
    assert out[0].status == CHILD_FAILED and out[0].error == "ValueError: variant 3 refuses"


def test_fork_refuses_a_closed_machine() -> None:
    m, _ = make()
    m.close()
    with pytest.raises(ForkError, match="closed"):
        m.fork()


def test_a_child_resets_to_a_snapshot_taken_before_the_fork(
        warmed: tuple[Machine, Ports], tmp_path: Path) -> None:
    """Dirty tracking goes on in the child's new VM: reset_to there copies back exactly
    what the child's guest dirtied."""
    m, ports = warmed
    snap = m.snapshot()
    pid = m.fork()
    if pid == 0:
        def child() -> int:
            first = _finish(m, ports, 0x4444)
            m.reset_to(snap)
            second = _finish(m, ports, 0x5555)
            (tmp_path / "child.json").write_text(json.dumps([first, second]))
            return 0
        _child(child)
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0
    assert json.loads((tmp_path / "child.json").read_text()) == [expected(0x4444),
                                                                   expected(0x5555)]
    assert _finish(m, ports, 0x6666) == expected(0x6666)
    m.reset_to(snap)
    assert _finish(m, ports, 7) == expected(7)
    snap.close()


def test_two_vcpus_in_parallel_mode_run_on_in_parent_and_child(tmp_path: Path) -> None:
    """fork(2) keeps only the calling thread: the child's next run starts its own vCPU
    threads, and both vCPUs make progress there and in the parent."""
    from kvmtest import COUNT
    from realmode_arch import GUEST as REALMODE_GUEST

    from kvmfw.eventq import TICKS_PER_MS

    m = Machine(MachineConfig(memory=0x10000, cpus=2),
                arch_plugin=CkptArch(COUNT, REALMODE_GUEST.read_bytes()))
    try:
        m.cpus[1].start_active = True

        def progress_after_runs() -> list[int]:
            before = [c.get_context().regs["rsi"] for c in m.cpus]
            for _ in range(100):  # a busy host may end a slice before a thread entered KVM
                m.run(max_ticks=100 * TICKS_PER_MS, timeout=20)
                after = [c.get_context().regs["rsi"] for c in m.cpus]
                if all(a > b for a, b in zip(after, before, strict=True)):
                    break
            return [a - b for a, b in zip(after, before, strict=True)]

        assert all(n > 0 for n in progress_after_runs())
        pid = m.fork()
        if pid == 0:
            def child() -> int:
                grew = progress_after_runs()
                (tmp_path / "child.json").write_text(json.dumps(grew))
                return 0
            _child(child)
        assert all(n > 0 for n in progress_after_runs())
        _, st = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(st) == 0
        assert all(n > 0 for n in json.loads((tmp_path / "child.json").read_text()))
    finally:
        m.close()


def test_a_child_that_cannot_rebuild_exits_and_never_returns(
        warmed: tuple[Machine, Ports], capfd: pytest.CaptureFixture[str]) -> None:
    m, ports = warmed

    def refuse(child: int) -> None:
        raise OSError("no room for the child's console file")

    ports.after_fork = refuse  # type: ignore[method-assign]
    out = m.fork_variants([1], lambda mm, v: 0)  # a returning child would record result 0
    assert out[0].status == CHILD_FAILED and out[0].result is None
    assert out[0].error == "the child wrote no result"
    err = capfd.readouterr().err
    assert "could not rebuild its machine: OSError: no room for the child's console file" in err
    del ports.after_fork
    assert _finish(m, ports, 9) == expected(9)  # the parent's machine is unharmed


def test_fork_refuses_a_parallel_run_gdb_and_shared_ram(
        warmed: tuple[Machine, Ports], tmp_path: Path) -> None:
    from kvmfw.memory import MemoryRegion

    m, _ = warmed
    m.cpus[0].parallel = True  # as inside a parallel run
    with pytest.raises(ForkError, match="parallel run"):
        m.fork()
    m.cpus[0].parallel = False
    m.gdb = object()  # type: ignore[assignment]
    with pytest.raises(ForkError, match="GDB"):
        m.fork()
    m.gdb = None
    backing = tmp_path / "shared.ram"
    backing.write_bytes(bytes(4096))
    assert m.vm is not None
    m.vm.add_memory(MemoryRegion.from_file(0x8000000, backing, private=False, name="shm"))
    with pytest.raises(ForkError, match="shm is a shared file mapping"):
        m.fork()
    assert m.forks == 0

def _fork_warnings_in_a_one_thread_process() -> int:
    """In a process with one Python thread: make and run a machine, fork it, and return
    0 if the fork gave no warning, 2 if it did (printed on stderr)."""
    import threading
    import warnings

    if threading.active_count() != 1:
        os.write(2, f"threads: {threading.enumerate()}\n".encode())
        return 3
    m, _ = make()
    try:
        m.run(timeout=60)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            pid = m.fork()
        if pid == 0:
            os._exit(0)
        _, st = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(st) != 0:
            return 4
    finally:
        m.close()
    warned = [str(w.message) for w in seen if "fork" in str(w.message)]
    if warned:
        os.write(2, f"fork warned: {warned}\n".encode())
        return 2
    return 0


def test_fork_does_not_warn_about_kvms_own_kernel_threads() -> None:
    """KVM's per-VM kernel worker counts as a thread of the process: Python 3.12+ would
    warn on every fork ("multi-threaded, use of fork() may lead to deadlocks") though no
    thread of the process but this one exists.

    Checked in a forked child: a fork copies only the calling thread, so the child has
    exactly one whatever threads the test process holds (its own fork is allowed to warn)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _fork_warnings_in_a_one_thread_process()
        finally:
            os._exit(code)
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0, "see the captured stderr"
