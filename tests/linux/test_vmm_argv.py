"""The reference VMMs' command lines (any host: no guest is booted): each is started as a
user would start it for this kernel, and the boot benchmark says what each one gets."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import linuxguest
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def guests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "vmlinuz-cloud-amd64").touch()
    monkeypatch.setenv("KVMFW_LINUX_GUESTS", str(tmp_path))
    return tmp_path


def _machine(argv: list[str]) -> str:
    return argv[argv.index("-M") + 1]


def test_microvm_has_the_cmos_rtc(guests: Path) -> None:
    # Without rtc=on, -M microvm under KVM has no RTC and the guest's rtc_cmos probe costs
    # seconds of guest time that -M pc and kvmfw (both with an RTC) do not pay.
    argv = linuxguest.Boot("qemu-microvm").argv()
    opts = _machine(argv).split(",")
    assert opts[0] == "microvm" and "rtc=on" in opts
    assert _machine(linuxguest.Boot("qemu").argv()) == "pc"


def test_microvm_disk_is_virtio_mmio(guests: Path) -> None:
    argv = linuxguest.Boot("qemu-microvm", disk=guests / "d.img").argv()
    assert "virtio-blk-device,drive=d0" in argv
    argv = linuxguest.Boot("qemu", disk=guests / "d.img").argv()
    assert "virtio-blk-pci,drive=d0" in argv


def test_benchmark_prints_each_vmms_command_line(guests: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("boot", None)
    import boot
    line = boot.command_line(linuxguest.Boot("qemu-microvm"))
    assert "-M microvm,rtc=on" in line
    assert str(guests) not in line and "$KVMFW_LINUX_GUESTS/vmlinuz-cloud-amd64" in line


def test_kvmfw_microvm_is_the_board_without_pci_and_i8042(guests: Path) -> None:
    argv = linuxguest.Boot("kvmfw-microvm", disk=guests / "d.img").argv()
    assert argv[argv.index("--option", argv.index("reboot=off")) + 1] == "board=microvm"
    assert f"virtio-blk,file={guests / 'd.img'}" in argv
    assert "board=microvm" not in linuxguest.Boot("kvmfw").argv()


def test_rounds_alternate_the_order_so_a_drifting_host_favours_neither() -> None:
    vmms = ["kvmfw-microvm", "qemu-microvm"]
    orders = [linuxguest.round_order(vmms, i) for i in range(1, 5)]
    assert orders == [vmms, vmms[::-1], vmms, vmms[::-1]]
    # over any two rounds each VMM boots first once and second once
    assert [o[0] for o in orders[:2]] == vmms


def test_paired_ratios_use_only_rounds_where_both_booted() -> None:
    gm, lo, hi, n = linuxguest.paired_ratio([2.0, 1.0, None, 4.0], [1.0, 2.0, 3.0, None])
    assert (lo, hi, n) == (0.5, 2.0, 2) and gm == pytest.approx(1.0)
    assert linuxguest.paired_ratio([None], [1.0]) is None
    ok = linuxguest.Result([], 0, b"", 5.0, 6.0, 0)
    failed = linuxguest.Result([], 1, b"", 4.0, 6.0, 0)  # reached the marker, exited 1
    assert linuxguest.paired_text([ok, failed], [ok, ok], "t_marker") == "1.00 (1.00-1.00)"
    assert linuxguest.paired_text([failed], [ok], "t_exit") == "NA"


def test_sched_account_sums_the_threads_and_tolerates_a_gone_process() -> None:
    import threading

    done = threading.Event()
    t = threading.Thread(target=done.wait)
    t.start()
    try:
        before = linuxguest.process_sched(os.getpid())
        if before is None:
            pytest.skip("this kernel keeps no schedstat account (CONFIG_SCHED_INFO)")
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
            mine = int(f.read().split()[0]) / 1e9  # this thread's alone
        after = linuxguest.process_sched(os.getpid())
        # (the account of a running thread moves at scheduler events, so no growth is
        # asserted: only that it never shrinks and that it sums every thread)
        assert after is not None and after[0] >= mine > 0 and after[0] >= before[0]
        assert after[1] >= before[1] >= 0
    finally:
        done.set()
        t.join()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its /proc entry is gone
    assert linuxguest.process_sched(child.pid) is None


def test_kvm_counters_sum_a_processes_vms_and_skip_what_is_not_a_number(tmp_path: Path) -> None:
    for d, files in {"4242-11": {"exits": "5\n", "io_exits": "3\n", "halt_wait_hist": "1 2 3"},
                     "4242-12": {"exits": "2\n"}, "77-11": {"exits": "1000\n"}}.items():
        (tmp_path / d).mkdir()
        (tmp_path / d / "vcpu0").mkdir()  # per-vCPU directories are not read
        for name, text in files.items():
            (tmp_path / d / name).write_text(text)
    (tmp_path / "4242-11" / "garbage").write_text("not a number")
    got = linuxguest.kvm_counters(4242, str(tmp_path))
    assert got == {"exits": 7, "io_exits": 3, "halt_wait_hist": 1}
    assert linuxguest.kvm_counters(99, str(tmp_path)) is None
    assert linuxguest.kvm_counters(4242, str(tmp_path / "absent")) is None


def test_the_kvm_table_sets_the_vmms_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("boot", None)
    import boot

    class R:
        def __init__(self, kvm: dict[str, int] | None) -> None:
            self.kvm_at_marker = kvm

    text = boot.kvm_table("1 vCPU, no disk", {
        "kvmfw": R({"exits": 3100, "mmio_exits": 0, "halt_wait_ns": 2_500_000_000}),
        "qemu": R({"exits": 4200, "mmio_exits": 900, "halt_wait_ns": 1_250_000}),
        "qemu-microvm": R(None)})
    rows = [ln.split() for ln in text.splitlines()[2:]]
    assert rows[0] == ["exits", "3100", "4200", "0"]
    assert rows[1] == ["mmio_exits", "0", "900", "0"]
    assert rows[2] == ["halt_wait", "(ms)", "2500.0", "1.2", "0.0"]  # times after counts
    assert "no counters for qemu-microvm" in text


def test_ratio_intervals_say_faster_slower_or_parity() -> None:
    ci = linuxguest.ratio_interval([0.9, 0.9, 0.9])
    assert ci is not None and ci == pytest.approx((0.9, 0.9, 0.9))
    assert linuxguest.verdict(ci) == "faster"
    assert linuxguest.ratio_interval([1.1]) is None
    assert linuxguest.verdict(None) == "NA"
    # symmetric on the log scale: 0.5 and 2.0 average to 1, and the interval holds 1
    mean, lo, hi = linuxguest.ratio_interval([0.5, 2.0]) or (0, 0, 0)
    assert mean == pytest.approx(1.0) and lo < 1 < hi and lo * hi == pytest.approx(1.0)
    assert linuxguest.verdict((1.0, lo, hi)) == "parity"
    # t with n - 1 = 3 degrees of freedom: 3.182 * sd / sqrt(4) on the logs
    rs = [1.05, 1.10, 1.08, 1.12]
    logs = [math.log(r) for r in rs]
    m = sum(logs) / 4
    sd = math.sqrt(sum((v - m) ** 2 for v in logs) / 3)
    mean, lo, hi = linuxguest.ratio_interval(rs) or (0, 0, 0)
    assert lo == pytest.approx(math.exp(m - 3.182 * sd / 2))
    assert hi == pytest.approx(math.exp(m + 3.182 * sd / 2))
    assert linuxguest.verdict((mean, lo, hi)) == "slower"
    ok = linuxguest.Result([], 0, b"", 5.0, 6.0, 0)
    slow = linuxguest.Result([], 0, b"", 5.5, 6.0, 0)
    failed = linuxguest.Result([], 1, b"", 4.0, 6.0, 0)
    assert linuxguest.round_ratios([slow, failed, slow], [ok, ok, ok], "t_marker") \
        == pytest.approx([1.1, 1.1])
    assert linuxguest.interval_text([1.1, 1.1]) == "1.100 [1.100-1.100] slower (n=2)"
    assert linuxguest.interval_text([]) == "NA (n=0)"


def test_the_interval_report_pools_rounds_over_configurations() -> None:
    text = linuxguest.interval_report([("1 vCPU", "a / b", "marker", [1.1, 1.1]),
                                       ("2 vCPUs", "a / b", "marker", [0.9, 0.9])])
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 3 and "slower (n=2)" in rows[0] and "faster (n=2)" in rows[1]
    assert rows[2].startswith("| all configurations") and "parity (n=4)" in rows[2]
    one = linuxguest.interval_report([("1 vCPU", "a / b", "exit", [1.0])])
    assert "all configurations" not in one and "NA (n=1)" in one


def test_scrub_writes_what_is_available_less_what_it_keeps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import boot

    # a small, real scrub: 8 MiB, whatever else the machine is doing meanwhile
    n, took = boot.scrub_free_memory(keep=0, most=8 << 20)
    assert n == 8 << 20 and took >= 0
    assert boot.scrub_free_memory(keep=1 << 60) == (0, 0.0)  # nothing to spare: nothing done
