"""Boot the nested environment's Linux test guests under kvmfw or QEMU/KVM, and time them.

The guests (Debian's kernels and busybox initramfs images, see envs/x86-linux-kvm/init-l2.sh)
are in ``$KVMFW_LINUX_GUESTS``, which only the nested x86 KVM environment sets
(envs/x86-linux-kvm/run.sh). Used by tests/linux/ and benchmarks/boot.py.

The VMM is one argument: ``"kvmfw"`` (``kvmfw run``), ``"kvmfw-microvm"`` (``kvmfw run
--option board=microvm``: no PCI, no i8042), ``"qemu"`` (``qemu-system-x86_64 -enable-kvm
-M pc``, the reference) or ``"qemu-microvm"`` (``-M microvm,rtc=on``, see :data:`MICROVM`).
"""

from __future__ import annotations

import math
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MARKER = b"KVMFW-INIT-OK"
FLAVORS = ("cloud-amd64", "amd64")
VMMS = ("kvmfw", "kvmfw-microvm", "qemu", "qemu-microvm")
BASE_CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet"
# -M microvm as a user booting this kernel would start it: its defaults under KVM leave out the
# CMOS RTC (rtc=auto is off with KVM), and Linux's rtc_cmos then probes the absent chip for
# seconds of guest time ("rtc_cmos: broken or not accessible"), which -M pc and kvmfw (both
# have an RTC) do not pay. The other defaults fit this kernel and cmdline as they are: PIT and
# PIC on (auto), the ISA serial port (console=ttyS0), ACPI with its GED (the guest powers off
# through it: there is no i8042 to reset through).
MICROVM = "microvm,rtc=on"


def round_order(vmms: list[str], i: int) -> list[str]:
    """The VMMs in the order round ``i`` (from 1) boots them: as given in odd rounds, reversed
    in even ones (A B, B A, A B, ...). The emulated hosts these benchmarks run on change speed
    by up to 2x within minutes; a fixed order would give the VMM booted second in every round
    a steadily faster (or slower) host, this one gives each VMM both places."""
    return list(vmms) if i % 2 else list(reversed(vmms))


def _ratios(xs: list[float | None], ys: list[float | None]) -> list[float]:
    """``x_i / y_i`` where both are known."""
    return [x / y for x, y in zip(xs, ys, strict=True) if x and y]


def paired_ratio(xs: list[float | None], ys: list[float | None]) \
        -> tuple[float, float, float, int] | None:
    """``x_i / y_i`` for the rounds where both are known (two boots next to each other in
    time, on a host at about the same speed): (geometric mean, lowest, highest, pairs), or
    None without a pair. Steadier than the ratio of two medians when the host drifts."""
    rs = _ratios(xs, ys)
    if not rs:
        return None
    gm = math.exp(sum(math.log(r) for r in rs) / len(rs))
    return gm, min(rs), max(rs), len(rs)


T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
"""Student's t, two-sided 95%, for 1..30 degrees of freedom (1.96 beyond)."""


def ratio_interval(ratios: list[float]) -> tuple[float, float, float] | None:
    """The geometric mean of ``ratios`` and its 95% confidence interval, (mean, low, high):
    a t interval on the logarithms (a ratio's log is symmetric where the ratio is not), or
    None with fewer than two. An interval below 1 says the first VMM is faster beyond this
    host's noise, one above 1 that it is slower, one across 1 that the runs cannot tell."""
    n = len(ratios)
    if n < 2:
        return None
    logs = [math.log(r) for r in ratios]
    mean = sum(logs) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in logs) / (n - 1))
    half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * sd / math.sqrt(n)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def verdict(interval: tuple[float, float, float] | None) -> str:
    """``faster``, ``slower`` or ``parity`` (the interval holds 1), from
    :func:`ratio_interval`; ``NA`` without one."""
    if interval is None:
        return "NA"
    return "faster" if interval[2] < 1 else "slower" if interval[1] > 1 else "parity"


def good_times(rs: list[Result], attr: str) -> list[float | None]:
    """Attribute ``attr`` of each boot that reached the marker and exited 0, else None."""
    return [getattr(r, attr) if r.t_marker is not None and r.rc == 0 else None for r in rs]


def round_ratios(xs: list[Result], ys: list[Result], attr: str) -> list[float]:
    """The per-round ratios ``x / y`` of ``attr`` over the rounds where both boots succeeded."""
    return _ratios(good_times(xs, attr), good_times(ys, attr))


def paired_text(xs: list[Result], ys: list[Result], attr: str) -> str:
    """:func:`paired_ratio` of attribute ``attr`` (``"t_marker"``, ``"t_exit"``) of two VMMs'
    boots, one per round, counting boots that reached the marker and exited 0; as
    ``"0.97 (0.90-1.05)"`` (mean, lowest-highest), or ``"NA"``."""
    p = paired_ratio(good_times(xs, attr), good_times(ys, attr))
    return f"{p[0]:.2f} ({p[1]:.2f}-{p[2]:.2f})" if p else "NA"


def interval_text(ratios: list[float]) -> str:
    """:func:`ratio_interval` and :func:`verdict` as ``"1.030 [0.980-1.080] parity (n=10)"``."""
    ci = ratio_interval(ratios)
    if ci is None:
        return f"NA (n={len(ratios)})"
    return f"{ci[0]:.3f} [{ci[1]:.3f}-{ci[2]:.3f}] {verdict(ci)} (n={len(ratios)})"


def interval_report(rows: list[tuple[str, str, str, list[float]]]) -> str:
    """The benchmarks' confidence table: one row per (configuration, pair such as
    ``"kvmfw / qemu"``, time such as ``"marker"``, the rounds' ratios), then each pair and
    time pooled over every configuration (ratios are unitless, so rounds of different
    configurations pool)."""
    out = ["paired ratios with their 95% confidence interval (t on the logs of the rounds' "
           "ratios): faster / slower when the whole interval is below / above 1, parity when "
           "it holds 1 (these runs cannot tell the VMMs apart)",
           "| configuration          | pair | time   | geometric mean [95% CI] verdict (rounds) |",
           "|---|---|---|---|"]
    pooled: dict[tuple[str, str], list[float]] = {}
    for conf, pair, time_, rs in rows:
        out.append(f"| {conf:22s} | {pair} | {time_:6s} | {interval_text(rs)} |")
        pooled.setdefault((pair, time_), []).extend(rs)
    if len({r[0] for r in rows}) > 1:
        for (pair, time_), rs in pooled.items():
            out.append(f"| {'all configurations':22s} | {pair} | {time_:6s} | "
                       f"{interval_text(rs)} |")
    return "\n".join(out)


def guests_dir() -> Path | None:
    d = os.environ.get("KVMFW_LINUX_GUESTS")
    return Path(d) if d and Path(d, "vmlinuz-cloud-amd64").exists() else None


def why_unavailable() -> str | None:
    """Why Linux guests cannot be booted here, or None when they can."""
    if guests_dir() is None:
        return ("needs the nested x86 KVM environment (envs/x86-linux-kvm/run.sh tests/linux): "
                "KVMFW_LINUX_GUESTS is not set, and a /dev/kvm without hardware "
                "virtualization (kvm_pvm) cannot boot a stock Linux kernel")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not accessible"
    return None


def kernel(flavor: str) -> Path:
    d = guests_dir()
    assert d is not None, why_unavailable()
    return d / f"vmlinuz-{flavor}"


def initrd(flavor: str) -> Path:
    d = guests_dir()
    assert d is not None, why_unavailable()
    return d / f"initramfs-{flavor}.cpio.gz"


def kvmfw_argv() -> list[str]:
    """``kvmfw`` of this interpreter's environment (the venv), else ``python -m kvmfw.cli``."""
    exe = Path(sys.executable).parent / "kvmfw"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("kvmfw")
    return [found] if found else [sys.executable, "-c", "from kvmfw.cli import main; main()"]


@dataclass
class Boot:
    """One guest boot: what to run it with."""

    vmm: str = "kvmfw"
    flavor: str = "cloud-amd64"
    cmdline: str = BASE_CMDLINE
    cpus: int = 1
    memory_mib: int = 256
    disk: Path | None = None
    timeout: float = 120.0
    extra: list[str] = field(default_factory=list)

    def argv(self) -> list[str]:
        k, i = str(kernel(self.flavor)), str(initrd(self.flavor))
        if self.vmm in ("kvmfw", "kvmfw-microvm"):
            argv = [*kvmfw_argv(), "run", "--kernel", k, "--initrd", i,
                    "--cmdline", self.cmdline, "--memory", f"{self.memory_mib}M",
                    "--cpus", str(self.cpus), "--console", "stdio", "--no-summary",
                    "--timeout", str(self.timeout),
                    "--option", "reboot=off"]  # as QEMU's -no-reboot below: a reset ends it
            if self.vmm == "kvmfw-microvm":  # no PCI, no i8042: as -M microvm
                argv += ["--option", "board=microvm"]
            if self.disk is not None:
                argv += ["--device", f"virtio-blk,file={self.disk}"]
            return argv + self.extra
        if self.vmm in ("qemu", "qemu-microvm"):
            machine = "pc" if self.vmm == "qemu" else MICROVM
            argv = ["qemu-system-x86_64", "-enable-kvm", "-cpu", "host", "-M", machine,
                    "-m", str(self.memory_mib), "-smp", str(self.cpus), "-nographic",
                    "-no-reboot", "-kernel", k, "-initrd", i, "-append", self.cmdline]
            if self.disk is not None:
                argv += ["-drive", f"file={self.disk},format=raw,if=none,id=d0",
                         "-device", "virtio-blk-pci,drive=d0" if self.vmm == "qemu"
                         else "virtio-blk-device,drive=d0"]
            return argv + self.extra
        raise ValueError(f"unknown VMM {self.vmm!r} (one of {', '.join(VMMS)})")


@dataclass
class Result:
    """What a boot did: exit status (None: killed at the timeout), console output, times in
    seconds from just before the process started, peak RSS of the VMM process in KiB."""

    argv: list[str]
    rc: int | None
    output: bytes
    t_marker: float | None
    t_exit: float
    maxrss_kib: int
    # with run(..., sample_memory=True): peak of (resident set - resident guest RAM), KiB
    peak_non_guest_kib: int | None = None
    # (seconds from the start, length of output so far) at every read of the console
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    # the VMM's host CPU seconds when the marker arrived: (outside the guest, in the guest)
    cpu_at_marker: tuple[float, float] | None = None
    # the scheduler's own account at the marker, all threads: (seconds on a CPU, seconds
    # runnable but waiting for one); see process_sched
    sched_at_marker: tuple[float, float] | None = None
    # with run(..., kvm_stats=True): KVM's own counters of the VMM's VM at the marker
    # (debugfs; see kvm_counters)
    kvm_at_marker: dict[str, int] | None = None

    def timed_lines(self) -> list[tuple[float, str]]:
        """Console lines with the host time (s from the start) the VMM had written each by."""
        out, pos, ai = [], 0, 0
        text = self.output
        while pos < len(text):
            nl = text.find(b"\n", pos)
            end = len(text) if nl < 0 else nl + 1
            while ai < len(self.arrivals) - 1 and self.arrivals[ai][1] < end:
                ai += 1
            t = self.arrivals[ai][0] if self.arrivals else self.t_exit
            out.append((t, text[pos:end].decode(errors="replace").rstrip("\r\n")))
            pos = end
        return out

    @property
    def guest_uptime(self) -> float | None:
        """The guest's own uptime at the init marker (init-l2.sh prints it): the host time
        less the VMM's start-up, firmware and kernel decompression."""
        m = re.search(rb"KVMFW-INIT-OK uptime=([0-9]+(?:\.[0-9]+)?)", self.output)
        return float(m.group(1)) if m else None

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def tail(self, n: int = 40) -> str:
        lines = self.text.replace("\r", "").splitlines()
        return f"$ {' '.join(self.argv)}\nexit status {self.rc}; last {n} console lines:\n" + \
            "\n".join(lines[-n:])


KILL_GRACE = 30.0
"""Seconds a SIGKILLed VMM may take to be reaped before the test gives up on it (a process
stuck in the kernel, e.g. in a KVM ioctl, cannot die): the test fails, it does not hang."""


def _reap(pid: int, grace: float = KILL_GRACE) -> tuple[int | None, int]:
    """SIGKILL pid and reap it within ``grace`` s; (None, peak RSS KiB or 0)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    end = time.monotonic() + grace
    while time.monotonic() < end:
        wpid, _, ru = os.wait4(pid, os.WNOHANG)
        if wpid == pid:
            return None, ru.ru_maxrss
        time.sleep(0.05)
    raise RuntimeError(f"the VMM (pid {pid}) did not die within {grace:g} s of SIGKILL: it is "
                       f"stuck in the kernel (state {_proc_state(pid)})")


def _proc_state(pid: int) -> str:
    try:
        stat = open(f"/proc/{pid}/stat").read()
        wchan = open(f"/proc/{pid}/wchan").read().strip()
    except OSError:
        return "?"
    return f"{stat.rsplit(')', 1)[1].split()[0]}, wchan {wchan or '-'}"


def _wait(pid: int, deadline: float) -> tuple[int | None, int]:
    """Wait for pid until deadline (kill it then); (exit status or None, peak RSS KiB)."""
    while True:
        wpid, status, ru = os.wait4(pid, os.WNOHANG)
        if wpid == pid:
            return os.waitstatus_to_exitcode(status), ru.ru_maxrss
        if time.monotonic() > deadline:
            return _reap(pid)
        time.sleep(0.01)


def non_guest_rss_kib(pid: int, guest_mib: int) -> int | None:
    """Resident KiB of pid outside its guest RAM: the sum of Rss over /proc/PID/smaps,
    less the Rss of the mappings at least as large as guest RAM (the RAM block)."""
    try:
        text = open(f"/proc/{pid}/smaps").read()
    except OSError:
        return None
    total = guest = 0
    size = 0
    for line in text.splitlines():
        if line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("Rss:"):
            rss = int(line.split()[1])
            total += rss
            if size >= guest_mib * 1024:
                guest += rss
    return total - guest


def run(boot: Boot, marker: bytes = MARKER, sample_memory: bool = False,
        kvm_stats: bool = False) -> Result:
    """Boot with the console on a pipe (stdin: /dev/null) until the VMM exits or times out.
    sample_memory: read /proc/PID/smaps every 0.2 s (costs host CPU: not for timed runs).
    kvm_stats: read KVM's counters of the VMM's VM when the marker arrives (debugfs, root;
    costs host CPU after the marker: not for timed runs)."""
    argv = boot.argv()
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, bufsize=0)
    assert p.stdout is not None
    fd = p.stdout.fileno()
    out, t_marker, peak, cpu, sched, kvm = b"", None, None, None, None, None
    arrivals: list[tuple[float, int]] = []
    deadline = t0 + boot.timeout + 5
    while time.monotonic() < deadline:
        if sample_memory:
            n = non_guest_rss_kib(p.pid, boot.memory_mib)
            if n is not None:
                peak = max(peak or 0, n)
        r, _, _ = select.select([fd], [], [], 0.2 if sample_memory else 0.5)
        if not r:
            if p.poll() is not None:
                break
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
        arrivals.append((time.monotonic() - t0, len(out)))
        if t_marker is None and marker in out:
            t_marker = time.monotonic() - t0
            cpu = process_cpu(p.pid)
            sched = process_sched(p.pid)
            if kvm_stats:
                kvm = kvm_counters(p.pid)
    rc, rss = _wait(p.pid, deadline)
    t_exit = time.monotonic() - t0
    p.returncode = rc if rc is not None else -9  # reaped by _wait
    out += p.stdout.read() if rc is not None else b""
    p.stdout.close()
    return Result(argv, rc, out, t_marker, t_exit, rss, peak, arrivals, cpu, sched, kvm)


KVM_DEBUGFS = "/sys/kernel/debug/kvm"


def kvm_counters(pid: int, base: str = KVM_DEBUGFS) -> dict[str, int] | None:
    """KVM's counters of process ``pid``'s VMs, from debugfs (``<base>/<pid>-<fd>/<name>``,
    the vCPUs' counters summed by the kernel; several VMs of one process summed here), or
    None when there are none (no debugfs, not root, or the process has no VM). Any VMM's
    VM reads the same way: the comparison between VMMs includes the exits each one's KVM
    handled itself."""
    try:
        dirs = [d for d in os.listdir(base) if d.startswith(f"{pid}-")]
    except OSError:
        return None
    out: dict[str, int] = {}
    for d in dirs[:16]:
        try:
            names = sorted(os.listdir(os.path.join(base, d)))[:1024]
        except OSError:
            continue
        for name in names:
            path = os.path.join(base, d, name)
            try:
                with open(path, "rb") as f:
                    text = f.read(64)
                value = int(text.split()[0])
            except (OSError, ValueError, IndexError):
                continue  # a directory (vcpuN), a histogram, a file gone
            out[name] = out.get(name, 0) + value
    return out or None


def mount_debugfs() -> str | None:
    """Make KVM's debugfs counters readable (mounting debugfs where it is not, as root):
    None, or why they cannot be read."""
    if os.path.isdir(KVM_DEBUGFS):
        return None
    if os.geteuid() != 0:
        return "KVM's counters are in debugfs, readable by root only"
    subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"],
                   capture_output=True, check=False)
    return None if os.path.isdir(KVM_DEBUGFS) else f"{KVM_DEBUGFS} is not there (no debugfs?)"


def process_cpu(pid: int) -> tuple[float, float] | None:
    """Host CPU seconds of process ``pid`` so far, all its threads: (outside the guest, in
    the guest). The kernel counts a vCPU thread's time in KVM_RUN's guest mode as both user
    and guest time; the first figure is the VMM's own work, which on a one-CPU host (the
    nested environment's outer guest) the guest's vCPUs wait for."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, system, guest = int(fields[11]), int(fields[12]), int(fields[40])
    return (user + system - guest) / tick, guest / tick


def process_sched(pid: int) -> tuple[float, float] | None:
    """Seconds process ``pid``'s threads have spent on a CPU and runnable waiting for one,
    summed over its threads, from the scheduler's nanosecond account
    (``/proc/PID/task/TID/schedstat``). None without it (a kernel built without
    CONFIG_SCHED_INFO reads 0 there) or when the process is gone.

    :func:`process_cpu`'s figures are sampled at the timer tick, which charges a whole tick
    to whichever thread it finds running: in the nested environment's emulated outer guest
    they drift far enough that a process's CPU time can exceed the wall time on its one
    CPU. This account does not: on-CPU time (guest mode included) is the whole host cost
    of a boot, comparable between VMMs, and the wait is what other processes took from it."""
    run = wait = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    seen = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                fields = f.read().split()
            run += int(fields[0])
            wait += int(fields[1])
            seen += 1
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile, or no schedstat
    return (run / 1e9, wait / 1e9) if seen and run else None


class Interactive:
    """The VMM on a pseudo-terminal, as a user at a terminal runs it."""

    def __init__(self, boot: Boot) -> None:
        self.argv = boot.argv()
        self.timeout = boot.timeout
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            try:
                os.execvp(self.argv[0], self.argv)
            finally:
                os._exit(127)
        self.output = b""
        self.pos = 0  # output before this was consumed by expect()

    def expect(self, pattern: bytes | str, timeout: float = 60.0) -> re.Match[bytes]:
        """Read until the regex pattern matches output not yet consumed; consume to its end."""
        rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.output, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {rx.pattern!r} within {timeout} s; output so far:\n"
                                   + self.output[-2000:].decode(errors="replace"))
            r, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if r:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # EIO: the VMM closed the terminal
                    chunk = b""
                if not chunk:
                    raise EOFError("the VMM closed its terminal; output so far:\n"
                                   + self.output[-2000:].decode(errors="replace"))
                self.output += chunk

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 30.0) -> int | None:
        """Drain output until the VMM exits (None: killed after timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            wpid, status = os.waitpid(self.pid, os.WNOHANG)
            if wpid == self.pid:
                self._drain()
                return os.waitstatus_to_exitcode(status)
            self._drain(0.1)
        self.close()
        return None

    def _drain(self, wait: float = 0.0) -> None:
        try:
            r, _, _ = select.select([self.fd], [], [], wait)
            if r:
                self.output += os.read(self.fd, 65536)
        except OSError:
            pass

    def close(self) -> None:
        try:
            _reap(self.pid)
        except ChildProcessError:  # already reaped by wait()
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass


def make_ext4(path: Path, files: dict[str, bytes], size_mib: int = 8) -> Path:
    """An ext4 image holding ``files`` (mkfs.ext4 -d: no mounting, no root needed)."""
    src = path.with_suffix(".d")
    src.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (src / name).write_bytes(data)
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(path)], check=True,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return path
