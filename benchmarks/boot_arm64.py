#!/usr/bin/env python3
"""Linux boot time on arm64: kvmfw vs qemu-system-aarch64 -M virt (KVM), same kernel, initramfs.

Runs on an arm64 host with a real /dev/kvm, such as the emulated one of the arm64 environment:

    plugins/armv8/env/run-arm64-kvm.sh --bench [--runs 5] [--cpus 1,2] [--profile]

Both VMMs boot Debian's arm64 kernel (``/boot/vmlinuz-*`` of the environment, or
``--kernel``) with one busybox initramfs whose /init prints ``KVMFW-INIT-OK uptime=<guest
seconds>`` on the PL011 console and powers off (PSCI SYSTEM_OFF), the same command line,
RAM and vCPU count; QEMU as ``qemu-system-aarch64 -M virt,gic-version=N -accel kvm -cpu
host -nic none``. For every vCPU count the runs alternate in rounds, the order reversed
every other round (A B, B A, ...: a host whose speed drifts favours neither). Per VMM it
prints the median time from process start to the init marker and to the process exit, the
guest's own uptime at the marker (so ``marker - uptime`` is roughly the VMM's start-up:
interpreter, imports, machine set-up, image loading), the ratios kvmfw/QEMU of the medians,
the geometric mean of the rounds' own ratios (the steadier one on a drifting host) and the
peak RSS. It also times the interpreter's start-up alone (``python3 -c pass``, ``import
kvmfw.cli``, the armv8 plugin), which on the emulated arm64 host is a large share of a
kvmfw boot. ``--profile`` adds one untimed kvmfw boot per vCPU count with
``kvmfw run --profile`` and prints its exit table; ``--importtime`` the slowest imports.

Exit status: 0 when every boot reached the marker and exited 0, 1 otherwise, 2 when it
cannot run here (no arm64 /dev/kvm, kernel or busybox).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "linux"))
sys.path.insert(0, str(HERE))

from boot import comma_list, cpu_counts, scrub_free_memory  # noqa: E402  (as the x86 one's)
from linuxguest import (  # noqa: E402
    MARKER,
    Result,
    interval_report,
    kvmfw_argv,
    paired_text,
    round_order,
    round_ratios,
    run,
)

VMMS = ("kvmfw", "qemu")
CMDLINE = "console=ttyAMA0 panic=-1 quiet"
INIT = ("#!/bin/busybox sh\n"
        "/bin/busybox mount -t proc proc /proc\n"
        f"echo \"{MARKER.decode()} uptime=$(/bin/busybox cut -d' ' -f1 /proc/uptime)\"\n"
        "/bin/busybox poweroff -f\n")
_UPTIME = re.compile(MARKER + rb" uptime=([0-9.]+)")


@dataclass
class ArmBoot:
    """One arm64 boot; ``linuxguest.run`` runs it (it needs argv(), timeout, memory_mib)."""

    vmm: str
    kernel: Path
    initrd: Path
    cmdline: str = CMDLINE
    cpus: int = 1
    memory_mib: int = 256
    gic: str = "3"
    timeout: float = 120.0
    extra: list[str] = field(default_factory=list)
    kvmfw: list[str] | None = None
    """How to start kvmfw (default: :func:`kvmfw_cmd`)."""

    def argv(self) -> list[str]:
        if self.vmm == "kvmfw":
            return [*(self.kvmfw or kvmfw_cmd()), "run", "--arch", "armv8",
                    "--kernel", str(self.kernel), "--initrd", str(self.initrd),
                    "--cmdline", self.cmdline,
                    "--memory", f"{self.memory_mib}M", "--cpus", str(self.cpus),
                    "--console", "stdio", "--no-summary", "--no-reboot",
                    "--timeout", str(self.timeout),
                    "--option", f"gic={ {'2': 'v2', '3': 'v3'}.get(self.gic, 'auto') }",
                    *self.extra]
        if self.vmm == "qemu":
            return ["qemu-system-aarch64", "-M", f"virt,gic-version={self.gic}",
                    "-accel", "kvm", "-cpu", "host", "-smp", str(self.cpus),
                    "-m", str(self.memory_mib), "-nographic", "-no-reboot", "-nic", "none",
                    "-kernel", str(self.kernel), "-initrd", str(self.initrd),
                    "-append", self.cmdline, *self.extra]
        raise ValueError(f"unknown VMM {self.vmm!r} (one of {', '.join(VMMS)})")


def guest_uptime(r: Result) -> float | None:
    """The guest kernel's uptime its /init printed with the marker (guest seconds)."""
    m = _UPTIME.search(r.output)
    return float(m.group(1)) if m else None


def why_unavailable(kernel: Path | None, busybox: Path) -> str | None:
    import platform
    if platform.machine() not in ("aarch64", "arm64"):
        return (f"needs an arm64 host with /dev/kvm, this is {platform.machine()} "
                "(plugins/armv8/env/run-arm64-kvm.sh --bench runs it in an emulated one)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not accessible"
    if kernel is None or not kernel.is_file():
        return "no arm64 kernel: --kernel PATH or /boot/vmlinuz-*"
    if not busybox.is_file():
        return f"no static busybox at {busybox} (--busybox PATH)"
    return None


_KVMFW: list[str] = []
"""How the timed boots start kvmfw: the installed ``kvmfw`` console script, else (the
environment's staged checkout has none) a script of the same name and contents in the
benchmark's directory, so kvmfw ends as an installed one does (``os._exit`` once its output
is flushed) instead of as ``python -c`` (the interpreter's teardown)."""


def kvmfw_cmd() -> list[str]:
    return _KVMFW or kvmfw_argv()


def _console_script(tmp: Path) -> list[str]:
    argv = kvmfw_argv()
    if Path(argv[0]).name == "kvmfw":
        return argv
    script = tmp / "kvmfw"
    script.write_text("import sys\nfrom kvmfw.cli import main\nsys.exit(main())\n")
    return [sys.executable, str(script)]


def _time(argv: list[str], n: int = 3) -> float:
    """Median wall seconds of running argv to completion n times."""
    ts = []
    for _ in range(n):
        t0 = time.monotonic()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        ts.append(time.monotonic() - t0)
    return statistics.median(ts)


def startup_report(importtime: bool) -> str:
    """The interpreter's and kvmfw's start-up alone: what every kvmfw boot pays first."""
    py = sys.executable
    lines = ["python start-up (median of 3, host seconds):"]
    for what, code in (("python3 -c pass", "pass"),
                       ("import kvmfw.cli", "import kvmfw.cli"),
                       ("+ the armv8 plugin and board", "import kvmfw.cli, kvmfw_armv8.plugin, "
                        "kvmfw_armv8.board, kvmfw_devices.pl011")):
        lines.append(f"  {what:32s} {_time([py, '-c', code]):7.3f}")
    lines.append(f"  {'kvmfw --help':32s} {_time([*kvmfw_cmd(), '--help']):7.3f}")
    if importtime:
        p = subprocess.run([py, "-X", "importtime", "-c", "import kvmfw.cli, kvmfw_armv8.plugin"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           check=False)
        rows = []
        for ln in p.stderr.splitlines():
            parts = ln.split("|")
            if len(parts) == 3 and parts[1].strip().isdigit():
                rows.append((int(parts[1]), parts[2].rstrip()))
        lines.append("  slowest imports (cumulative us, -X importtime):")
        lines += [f"    {us:9d} {name}" for us, name in sorted(rows, reverse=True)[:15]]
    return "\n".join(lines)


def cprofile(b: ArmBoot, path: Path, top: int = 60) -> str:
    """One untimed kvmfw boot under cProfile: the functions with the most cumulative time."""
    import io
    import pstats
    b.kvmfw = [sys.executable, "-m", "cProfile", "-o", str(path), "-m", "kvmfw.cli"]
    r = run(b)
    head = (f"kvmfw under cProfile ({b.cpus} vCPU, untimed): marker "
            f"{r.t_marker if r.t_marker is None else round(r.t_marker, 2)} s, exit "
            f"{r.t_exit:.2f} s, rc={r.rc}")
    try:
        parts = []
        for title, key, pattern in (("by cumulative time, kvmfw's own functions", "cumulative",
                                     "kvmfw"),
                                    ("by own time, everything", "tottime", "")):
            out = io.StringIO()
            pstats.Stats(str(path), stream=out).sort_stats(key).print_stats(pattern, top)
            text = out.getvalue()
            parts.append(f"-- {title}\n" + text[text.find("   ncalls"):].rstrip())
    except (OSError, TypeError, EOFError) as exc:
        return f"{head}\n  (no profile: {exc})\n{r.tail(10)}"
    return head + "\n" + "\n".join(parts)


PHASES = """
import atexit, os, sys, time
def say(what):
    os.write(2, b"KVMFW-PHASE %s %.4f\\n" % (what.encode(), time.monotonic()))
say("python-started")
atexit.register(say, "atexit")  # registered first: runs last, after the threads' join
import kvmfw.cli
from kvmfw.machine import Machine
say("imported")
import kvmfw.cpu
import kvmfw_armv8.plugin as arm
say("plugin-imported")
def wrap(owner, name, label=None):
    f = getattr(owner, name, None)
    if f is None:
        return
    label = label or name
    def timed(*a, **k):
        say(label + "-begin")
        try:
            return f(*a, **k)
        finally:
            say(label + "-end")
    setattr(owner, name, timed)
for name in ("__init__", "load_guest", "run", "close"):
    wrap(Machine, name)
# inside load_guest (module globals: the plugin looks them up at call time)
for name in ("_place_kernel", "_read_into", "make_dtb"):
    wrap(arm, name, "load." + name.lstrip("_"))
_run_ctx = kvmfw.cpu._run_ctx
def first_run(ctx):  # the first KVM_RUN of any vCPU
    kvmfw.cpu._run_ctx = _run_ctx
    say("first-KVM_RUN")
    return _run_ctx(ctx)
kvmfw.cpu._run_ctx = first_run
try:
    kvmfw.cli.main()
except SystemExit as e:
    say("main-returned")
    if os.environ.get("KVMFW_BENCH_FAST_EXIT"):  # what skipping the interpreter's teardown saves
        sys.stdout.flush()
        sys.stderr.flush()
        say("os._exit")
        os._exit(e.code if isinstance(e.code, int) else 1)
    raise
"""
"""A kvmfw start that prints when each phase begins and ends (CLOCK_MONOTONIC, on stderr)."""


def phases(b: ArmBoot, fast_exit: bool = False) -> str:
    """One untimed kvmfw boot with time stamps: where start-up and shutdown go. fast_exit:
    the wrapper leaves through ``os._exit`` once ``main`` returns (no interpreter teardown)."""
    b.kvmfw = [sys.executable, "-c", PHASES]
    os.environ.pop("KVMFW_BENCH_FAST_EXIT", None)
    if fast_exit:
        os.environ["KVMFW_BENCH_FAST_EXIT"] = "1"
    t0 = time.monotonic()
    try:
        r = run(b)
    finally:
        os.environ.pop("KVMFW_BENCH_FAST_EXIT", None)
    rows = [("process started (parent)", 0.0)]
    for m in re.finditer(rb"KVMFW-PHASE (\S+) ([0-9.]+)", r.output):
        rows.append((m.group(1).decode(), float(m.group(2)) - t0))
    if r.t_marker is not None:
        rows.append(("init marker seen (parent)", r.t_marker))
    rows.append(("process reaped (parent)", r.t_exit))
    rows.sort(key=lambda x: x[1])
    out = [f"kvmfw phases ({b.cpus} vCPU, untimed{', os._exit after main' if fast_exit else ''}"
           f"; rc={r.rc}): seconds from process start"]
    prev = 0.0
    for name, t in rows:
        out.append(f"  {t:8.3f}  (+{t - prev:6.3f})  {name}")
        prev = t
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5,
                    help="timed boots per VMM (default 5; 0: only the other reports)")
    ap.add_argument("--vmms", default="kvmfw,qemu", help="comma list of kvmfw, qemu")
    ap.add_argument("--cpus", default="1,2", help="comma list of vCPU counts (default 1,2)")
    ap.add_argument("--kernel", type=Path, help="arm64 Image (default /boot/vmlinuz-*)")
    ap.add_argument("--busybox", type=Path,
                    default=Path(os.environ.get("KVMFW_ARM64_BUSYBOX") or "/bin/busybox"),
                    help="static arm64 busybox for the initramfs (default /bin/busybox)")
    ap.add_argument("--cmdline", default=CMDLINE, help=f"default {CMDLINE!r}")
    ap.add_argument("--memory", type=int, default=256, help="guest RAM in MiB (default 256)")
    ap.add_argument("--gic", default=os.environ.get("KVMFW_ARM64_GIC", "3"),
                    choices=("2", "3"), help="GIC version of both machines (default 3)")
    ap.add_argument("--timeout", type=float, default=120.0, help="per boot, seconds")
    ap.add_argument("--profile", action="store_true",
                    help="one more kvmfw boot per vCPU count with --profile: its exits")
    ap.add_argument("--importtime", action="store_true", help="list the slowest imports")
    ap.add_argument("--phases", action="store_true",
                    help="more kvmfw boots (one per vCPU count, and one without os._exit) "
                    "with time stamps of their phases: start-up, imports, machine, load "
                    "(kernel, initrd, device tree), first KVM_RUN, run, close, exit")
    ap.add_argument("--cprofile", action="store_true",
                    help="one more kvmfw boot (first vCPU count) under cProfile: where the "
                    "Python time goes")
    ap.add_argument("--no-memory", action="store_true", help="skip the untimed RSS boots")
    ap.add_argument("--kvmfw-option", action="append", default=[],
                    help="extra kvmfw run argument (repeatable), e.g. --kvmfw-option=-o...")
    ap.add_argument("--scrub", action="store_true",
                    help="before every timed boot, write the machine's available memory once "
                    "(the emulated outer host's stale code translations: boot.py's "
                    "scrub_free_memory)")
    ap.add_argument("-v", "--verbose", action="store_true", help="console tail of failed boots")
    args = ap.parse_args(argv)

    kernel = args.kernel or next((Path(p) for p in sorted(glob.glob("/boot/vmlinuz-*"))), None)
    why = why_unavailable(kernel, args.busybox)
    if why is None and "qemu" in args.vmms and not shutil.which("qemu-system-aarch64"):
        why = "no qemu-system-aarch64 (Debian: qemu-system-arm; run-arm64-kvm.sh --bench adds it)"
    if why:
        print(f"boot_arm64.py: cannot run here: {why}", file=sys.stderr)
        return 2
    assert kernel is not None
    vmms = comma_list(args.vmms, VMMS, "--vmms")
    cpus_list = cpu_counts(ap, args.cpus, 8)

    from kvmfw_armv8.testing import busybox_initramfs
    tmp = Path(tempfile.mkdtemp(prefix="kvmfw-bootbench-arm64-"))
    initrd = tmp / "initramfs.cpio.gz"
    initrd.write_bytes(busybox_initramfs(args.busybox.read_bytes(), init=INIT))
    _KVMFW[:] = _console_script(tmp)

    def boot(vmm: str, cpus: int, extra: list[str] | None = None) -> ArmBoot:
        return ArmBoot(vmm, kernel, initrd, args.cmdline, cpus, args.memory, args.gic,
                       args.timeout, (extra or []) + (args.kvmfw_option if vmm == "kvmfw"
                                                      else []))

    print(f"kernel {kernel.name}, cmdline {args.cmdline!r}, {args.memory} MiB, GICv{args.gic}, "
          f"{args.runs} alternating runs per VMM; kvmfw as {' '.join(kvmfw_cmd())}", flush=True)
    print(startup_report(args.importtime), flush=True)
    ok = True
    table: list[str] = []
    intervals: list[tuple[str, str, str, list[float]]] = []
    for cpus in cpus_list:
        conf = f"{cpus} vCPU{'s' if cpus > 1 else ''}"
        print(f"\n== {conf}", flush=True)
        results: dict[str, list[Result]] = {v: [] for v in vmms}
        for i in range(1, args.runs + 1):
            for v in round_order(vmms, i):
                if args.scrub:
                    scrubbed, took = scrub_free_memory()
                    print(f"scrubbed {scrubbed >> 20} MiB in {took:.1f} s", flush=True)
                r = run(boot(v, cpus))
                results[v].append(r)
                good = r.t_marker is not None and r.rc == 0
                ok &= good
                up = guest_uptime(r)
                marker = f"{r.t_marker:7.3f}" if r.t_marker is not None else "     NA"
                print(f"run {i:2d} {v:6s} marker {marker} s  exit {r.t_exit:7.3f} s  guest "
                      f"uptime {up if up is not None else 'NA'} s  rc={r.rc}  maxrss "
                      f"{r.maxrss_kib / 1024:6.1f} MiB{'' if good else '  FAILED'}", flush=True)
                if not good and args.verbose:
                    print(r.tail(20), flush=True)

        def med(v: str, key: str, results: dict[str, list[Result]] = results) -> float | None:
            xs = [x for x in (guest_uptime(r) if key == "uptime" else getattr(r, key)
                              for r in results[v] if r.t_marker is not None and r.rc == 0)
                  if x is not None]
            return statistics.median(xs) if xs else None

        def f(x: float | None) -> str:
            return f"{x:7.3f}" if x is not None else "     NA"

        for v in vmms:
            m, e, u = med(v, "t_marker"), med(v, "t_exit"), med(v, "uptime")
            rss = statistics.median(r.maxrss_kib for r in results[v]) / 1024 \
                if results[v] else 0.0
            n_ok = sum(1 for r in results[v] if r.t_marker is not None and r.rc == 0)
            row = f"| {conf:8s} | {v:5s} | {f(m)} | {f(e)} | {f(u)} | {rss:6.1f} |"
            if v != "kvmfw" and "kvmfw" in vmms:
                km, ke, ku = med("kvmfw", "t_marker"), med("kvmfw", "t_exit"), med("kvmfw",
                                                                                   "uptime")
                row += " " + " / ".join(f"{a / b:.2f}" if a and b else "NA"
                                        for a, b in ((km, m), (ke, e), (ku, u))) + " | "
                row += " / ".join(paired_text(results["kvmfw"], results[v], k)
                                  for k in ("t_marker", "t_exit")) + " |"
                intervals += [(conf, f"kvmfw / {v}", k[2:],
                               round_ratios(results["kvmfw"], results[v], k))
                              for k in ("t_marker", "t_exit")]
            else:
                row += " | |"
            table.append(row + f" {n_ok}/{len(results[v])} |")
        if args.profile and "kvmfw" in vmms:
            r = run(boot("kvmfw", cpus, ["--profile"]))
            text = r.text.replace("\r", "")
            at = text.find("exit profile:")
            print(f"kvmfw --profile ({conf}, untimed; marker "
                  f"{r.t_marker if r.t_marker is None else round(r.t_marker, 2)} s, rc={r.rc}):\n"
                  + (text[at:].rstrip() if at >= 0 else "  (no profile)\n" + r.tail(10)),
                  flush=True)

    if args.phases and "kvmfw" in vmms:
        print(phases(boot("kvmfw", cpus_list[0])), flush=True)
        for cpus in cpus_list:  # as kvmfw runs (it leaves through os._exit itself)
            print(phases(boot("kvmfw", cpus), fast_exit=True), flush=True)
    if args.cprofile and "kvmfw" in vmms:
        print(cprofile(boot("kvmfw", cpus_list[0]), tmp / "kvmfw.prof"), flush=True)
    print("\nmedians (successful boots), host seconds from process start; uptime = the guest "
          "kernel's at the marker;\nratio = kvmfw / qemu (marker / exit / uptime) of the medians; "
          "paired = geometric mean of the rounds' own ratios (lowest-highest), marker / exit;\n"
          "RSS = median peak RSS (MiB, includes touched guest RAM):")
    print("| vCPUs    | vmm   | marker  | exit    | uptime  | RSS    | ratio | paired | ok |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in table:
        print(row)
    print("\n" + interval_report(intervals))
    if not args.no_memory:
        print(f"\npeak resident memory outside guest RAM (one untimed boot each, {cpus_list[0]} "
              "vCPU, smaps every 0.2 s):")
        for v in vmms:
            r = run(boot(v, cpus_list[0]), sample_memory=True)
            n = r.peak_non_guest_kib
            print(f"{v:6s} peak RSS {r.maxrss_kib / 1024:6.1f} MiB, outside guest RAM "
                  + (f"{n / 1024:6.1f} MiB" if n is not None else "    NA") + f"  rc={r.rc}",
                  flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
