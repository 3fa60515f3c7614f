#!/usr/bin/env python3
"""Linux boot time: kvmfw vs QEMU/KVM (-M pc and -M microvm), same kernel, initramfs, cmdline.

kvmfw boots on its default PC board (``kvmfw``, against QEMU ``-M pc``) and on its board
without PCI and i8042 (``kvmfw-microvm``, ``--option board=microvm``, against QEMU
``-M microvm``): each ratio compares machines of the same kind.

Runs inside the nested x86 KVM environment (a real /dev/kvm with hardware-virtualization
semantics; this machine's own kvm_pvm cannot boot stock Linux):

    envs/x86-linux-kvm/run.sh --bench [--runs 5] [--cpus 1,2] [--disk no,yes] [--profile]
                                      [--kvm-stats]

For every configuration (vCPU count x with/without a virtio-blk disk) the runs alternate
between the VMMs in rounds, the order reversed every other round (A B, B A, ...: a host whose
speed drifts favours neither). Per configuration and VMM it prints the median time from
process start to the init marker (KVMFW-INIT-OK on the 16550 console) and to the process
exit (`reboot -f`), the guest's own uptime at the marker (the rest is the VMM's start-up,
firmware and the kernel's decompression), the median gap from the marker to the exit (the
guest's reboot path and the VMM's teardown), the time its threads spent on a CPU up to the
marker (the scheduler's account, guest mode included), the ratios kvmfw/QEMU of the medians and the
geometric mean of the per-round ratios (each round's two boots ran next to each other, so
this one is the steadier on a drifting host), and the peak RSS. Then each pair's per-round
ratios get a 95% confidence interval (a t interval on their logarithms), per configuration
and pooled over all of them, with a verdict: faster or slower when the whole interval lies
below or above 1, parity when it holds 1 (this host's noise hides any difference). One
untimed boot per VMM comes first (a warm-up: caches as a second boot finds them).
With a disk the guest also mounts it and prints a file from it (``kvmfw.test=blk``; QEMU
gets virtio-blk-pci on -M pc and virtio-blk-device on -M microvm, kvmfw its virtio-mmio
virtio-blk). -M microvm gets ``rtc=on`` (its KVM default has no CMOS RTC, and the guest's
rtc_cmos probe of the absent chip costs seconds; -M pc and kvmfw have one); the output's
header prints every VMM's full command line. ``--kvm-stats`` adds one untimed boot per VMM
and configuration and prints KVM's own counters at the marker side by side (debugfs, root:
every exit, including those each VMM's KVM handled itself). ``--profile`` adds one untimed
boot per kvmfw machine and configuration with ``--stats`` and ``--profile`` and prints
where its exits went (by kind, by device, with host time); ``--console-times`` first boots
each VMM once without ``quiet`` and prints every console line with the host time it
arrived; ``--guest-timeline N`` first boots each VMM N times (alternating) with
``kvmfw.test=dmesg`` and lines up the medians of the guest's own kernel-log timestamps by
message, printing where the VMMs part (the guest's time, not the VMM's); ``--scrub`` writes
the outer machine's free memory before every timed boot (:func:`scrub_free_memory`: the
emulated host's stale code translations make a guest's first writes slow on some pages,
by what ran before, and so vary its boot by up to 0.5 s). Exit status: 0
when every boot reached the marker and exited 0, 1 otherwise, 2 when Linux guests are not
available here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "linux"))

from linuxguest import (  # noqa: E402
    BASE_CMDLINE,
    FLAVORS,
    VMMS,
    Boot,
    guests_dir,
    interval_report,
    make_ext4,
    mount_debugfs,
    paired_text,
    round_order,
    round_ratios,
    run,
    why_unavailable,
)

# The guest leaves through `reboot -f` (reboot=k: the i8042 reset line), which kvmfw and QEMU
# -M pc turn into their exit; the microvm machines have no i8042 and power off through ACPI.
CMDLINE = f"{BASE_CMDLINE} kvmfw.exit=reboot"
CMDLINE_MICROVM = f"{BASE_CMDLINE} kvmfw.exit=poweroff"
BLK_TEST = " kvmfw.test=blk"
REFERENCE = {"qemu": "kvmfw", "qemu-microvm": "kvmfw-microvm"}
"""The kvmfw machine each QEMU machine's ratio is taken against (same kind of board)."""


def comma_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    """``--vmms``/``--disk``: a comma list of ``allowed`` words."""
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in allowed]
    if bad or not out:
        raise SystemExit(f"{what} must be a comma list of {', '.join(allowed)}")
    return out


def cpu_counts(ap: argparse.ArgumentParser, text: str, most: int) -> list[int]:
    """``--cpus``: a comma list of vCPU counts from 1 to ``most``."""
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        ap.error("--cpus must be a comma list of numbers")
    if not counts or any(not 1 <= c <= most for c in counts):
        ap.error(f"--cpus must be a comma list of numbers from 1 to {most}")
    return counts


def command_line(boot: Boot) -> str:
    """The VMM's command line for ``boot``, guest paths shortened to $KVMFW_LINUX_GUESTS."""
    text = shlex.join(boot.argv())
    d = guests_dir()
    return text.replace(str(d), "$KVMFW_LINUX_GUESTS") if d is not None else text


def profile(boot: Boot, path: Path) -> str:
    """One untimed boot of a kvmfw machine with --stats: exits by kind and accesses by
    device."""
    boot.extra = [*boot.extra, "--stats", str(path), "--profile"]
    r = run(boot)
    lines = r.text.replace("\r", "").splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("kvmfw: exit profile:")), None)
    table = "\n".join("  " + ln for ln in lines[start:]) + "\n" if start is not None else ""
    try:
        dumps = json.loads(path.read_text())
        last = dumps[-1] if isinstance(dumps, list) else dumps
    except (OSError, ValueError, IndexError) as exc:
        return f"{table}  (no stats: {exc}; rc={r.rc})"
    kinds: dict[str, int] = {}
    devices: dict[str, int] = {}
    for name, group in last.items():
        if name.startswith("system.cpu"):
            for k in ("vm_exits", "io", "mmio", "halt", "exit_signal", "interrupts",
                      "coalesced_mmio"):
                kinds[k] = kinds.get(k, 0) + int(group.get(k, 0))
        elif name not in ("system", "system.bus", "system.work"):
            n = int(group.get("reads", 0)) + int(group.get("writes", 0))
            if n:
                devices[name.removeprefix("system.")] = n
        if name == "system.bus":
            for k, v in group.items():
                if v:
                    devices[f"unclaimed {k}"] = int(v)
    sim = last.get("system", {}).get("sim_seconds", 0)
    top = sorted(devices.items(), key=lambda kv: -kv[1])[:8]
    return (table + f"  exits {kinds}\n  simulated {sim:.2f} s, marker "
            f"{r.t_marker if r.t_marker is None else round(r.t_marker, 2)} s, rc={r.rc}\n"
            f"  device accesses (exits, plus coalesced/ioeventfd where noted): "
            + ", ".join(f"{k} {v}" for k, v in top))


TIMELINE_STEP = 0.015
"""``--guest-timeline`` prints a line where the VMMs' difference moved by more than this
(seconds of guest time)."""


def guest_timeline(boots: dict[str, list[Any]]) -> str:
    """The guest's own kernel log timestamps (``kvmfw.test=dmesg``), per VMM the median
    over its boots, lined up by message (numbers masked): where the guest spends its time
    and where the VMMs part. Host time measures the VMM; this measures the guest."""
    logs: dict[str, list[dict[str, float]]] = {}
    order: list[str] = []
    for v, rs in boots.items():
        for r in rs:
            seen: dict[str, float] = {}
            for m in re.finditer(rb"\[\s*([0-9]+\.[0-9]+)\] ([^\r\n]*)", r.output):
                key = re.sub(r"[0-9a-f]{6,}|[0-9]+", "#", m.group(2).decode(errors="replace"))
                seen.setdefault(key[:90], float(m.group(1)))
            if seen:  # (a failed boot has none)
                logs.setdefault(v, []).append(seen)
                order = order or list(seen)
    vmms = list(logs)
    missing = [v for v in boots if v not in logs]
    if not vmms or missing:
        return f"  (no kernel log from {', '.join(missing) or 'any VMM'}: its boots failed)"
    med: dict[str, dict[str, float]] = {v: {} for v in vmms}
    for key in order:
        if all(key in d for v in vmms for d in logs[v]):
            for v in vmms:
                med[v][key] = statistics.median(d[key] for d in logs[v])
    keys = [k for k in order if k in med[vmms[0]]]
    ref = vmms[0]
    lines = [f"  {'':7s}" + "".join(f" {v:>14s}" for v in vmms) +
             (f"  {'diff':>6s} (each VMM - {ref})" if len(vmms) > 1 else "")]
    last: float | None = None
    for i, k in enumerate(keys):
        diff = max((med[v][k] - med[ref][k] for v in vmms[1:]), key=abs, default=0.0)
        if last is None or abs(diff - last) > TIMELINE_STEP or i == len(keys) - 1:
            lines.append(f"  {'':7s}" + "".join(f" {med[v][k]:14.3f}" for v in vmms) +
                         (f"  {diff:+6.3f}" if len(vmms) > 1 else "") + f"  {k}")
            last = diff
    return "\n".join(lines)


KVM_ROWS = 24
"""KVM counters shown per configuration (the largest in any VMM)."""


SCRUB_KEEP = 300 << 20
"""Bytes of available memory ``--scrub`` leaves alone (the VMM about to start needs them)."""


def scrub_free_memory(keep: int = SCRUB_KEEP, most: int | None = None) -> tuple[int, float]:
    """Write every page of the memory this machine has available (less ``keep``, at most
    ``most`` bytes) once, then free it: (bytes written, whole MiB; seconds). In the nested
    environment the outer machine is an emulated one (QEMU TCG), whose stores to a page
    that still holds translations of code that ran there earlier take a slow path until
    the page is rewritten; which pages a guest's RAM gets, and so how slowly the guest
    first writes it, depends on what ran before (the arm64 environment showed it, see the
    README). Scrubbing before each boot gives every VMM fresh pages. (0, 0.0) when
    ``/proc/meminfo`` cannot say."""
    import mmap
    import time

    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0, 0.0
    chunk = 1 << 20
    n = (min(avail - keep, most) if most is not None else avail - keep) // chunk * chunk
    if n <= 0:
        return 0, 0.0
    t0 = time.monotonic()
    # in a child, so this process's peak RSS (which the VMMs it starts inherit as their
    # ru_maxrss) stays as it was
    pid = os.fork()
    if pid == 0:
        try:
            page = b"\x01" * chunk
            with mmap.mmap(-1, n) as m:
                for off in range(0, n, chunk):
                    m[off:off + chunk] = page
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return n, time.monotonic() - t0


def kvm_table(conf: str, results: dict[str, Any]) -> str:
    """KVM's counters at the marker of one untimed boot per VMM, side by side."""
    got = {v: r.kvm_at_marker or {} for v, r in results.items()}
    # counts first, largest first; then the times (debugfs names them *_ns), in ms
    names = sorted({n for c in got.values() for n, x in c.items() if x},
                   key=lambda n: (n.endswith("_ns"), -max(c.get(n, 0) for c in got.values())))
    vmms = list(got)
    lines = [f"KVM's own counters at the marker, one boot each ({conf}; every exit, the ones "
             "KVM handled itself included; debugfs, vCPUs summed):",
             f"  {'counter':28s}" + "".join(f" {v:>14s}" for v in vmms)]
    for n in names[:KVM_ROWS]:
        if n.endswith("_ns"):
            lines.append(f"  {n[:-3] + ' (ms)':28s}" +
                         "".join(f" {got[v].get(n, 0) / 1e6:14.1f}" for v in vmms))
        else:
            lines.append(f"  {n:28s}" + "".join(f" {got[v].get(n, 0):14d}" for v in vmms))
    missing = [v for v in vmms if not got[v]]
    if missing:
        lines.append(f"  (no counters for {', '.join(missing)}: the boot failed before the "
                     "marker, or the VM was not found)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="boots per VMM (default 5)")
    ap.add_argument("--vmms", default="kvmfw,kvmfw-microvm,qemu,qemu-microvm",
                    help=f"comma list of {', '.join(VMMS)} (default: all)")
    ap.add_argument("--cpus", default="1,2", help="comma list of vCPU counts (default 1,2)")
    ap.add_argument("--disk", default="no,yes",
                    help="comma list: no (no disk), yes (virtio-blk; default both)")
    ap.add_argument("--flavor", default="cloud-amd64", choices=FLAVORS, help="guest kernel")
    ap.add_argument("--cmdline", help=f"default {CMDLINE!r} ({CMDLINE_MICROVM!r} for "
                    "the microvm machines)")
    ap.add_argument("--memory", type=int, default=256, help="guest RAM in MiB (default 256)")
    ap.add_argument("--timeout", type=float, default=60.0, help="per boot, seconds")
    ap.add_argument("--profile", action="store_true",
                    help="one more boot per kvmfw machine and configuration with --stats: "
                    "its exits")
    ap.add_argument("--no-memory", action="store_true", help="skip the untimed RSS boots")
    ap.add_argument("--kvm-stats", action="store_true",
                    help="one more boot per VMM and configuration: KVM's own counters at the "
                    "marker (every exit, the ones KVM handled itself included), side by side")
    ap.add_argument("--console-times", action="store_true",
                    help="first, one untimed boot per VMM without 'quiet': every console "
                    "line with the host time it arrived (where the guest spends its time)")
    ap.add_argument("--guest-timeline", type=int, default=0, metavar="N",
                    help="first, N rounds of quiet boots per VMM (first vCPU count, no disk) "
                    "printing the kernel log (kvmfw.test=dmesg): the guest's own timestamps, "
                    "medians lined up by message, where the VMMs part")
    ap.add_argument("--kvmfw-option", action="append", default=[],
                    help="extra kvmfw run argument (repeatable), e.g. --option=...")
    ap.add_argument("--scrub", action="store_true",
                    help="before every timed boot, write the machine's available memory once "
                    "(the emulated outer host's stale code translations, see "
                    "scrub_free_memory): steadier guest times, ~5 s more per boot")
    ap.add_argument("-v", "--verbose", action="store_true", help="console tail of failed boots")
    args = ap.parse_args(argv)

    why = why_unavailable()
    if why:
        print(f"boot.py: cannot run here: {why}", file=sys.stderr)
        return 2
    if args.kvm_stats:
        why = mount_debugfs()
        if why:
            print(f"boot.py: --kvm-stats: {why}", file=sys.stderr)
            return 2
    vmms = comma_list(args.vmms, tuple(VMMS), "--vmms")
    disks = comma_list(args.disk, ("no", "yes"), "--disk")
    cpus_list = cpu_counts(ap, args.cpus, 64)

    tmp = Path(tempfile.mkdtemp(prefix="kvmfw-bootbench-"))
    image = make_ext4(tmp / "disk.img", {"hello.txt": b"kvmfw boot benchmark\n"}) \
        if "yes" in disks else None

    def cmdline(vmm: str, disk: bool) -> str:
        base = args.cmdline or (CMDLINE_MICROVM if vmm.endswith("microvm") else CMDLINE)
        return base + (BLK_TEST if disk else "")

    def boot(vmm: str, cpus: int, disk: bool) -> Boot:
        return Boot(vmm, args.flavor, cmdline(vmm, disk), cpus=cpus, memory_mib=args.memory,
                    disk=image if disk else None, timeout=args.timeout,
                    extra=list(args.kvmfw_option) if vmm.startswith("kvmfw") else [])

    if args.console_times:
        for v in vmms:
            b = boot(v, cpus_list[0], False)
            b.cmdline = b.cmdline.replace(" quiet", "")
            r = run(b)
            print(f"\n== console of one {v} boot ({cpus_list[0]} vCPU, no disk, no 'quiet'): "
                  f"host s | guest line; marker {r.t_marker}, exit {r.t_exit:.3f}, rc={r.rc}")
            for t, line in r.timed_lines():
                print(f"{t:7.3f} | {line[:150]}")
        print(flush=True)

    if args.guest_timeline > 0:
        got: dict[str, list[Any]] = {v: [] for v in vmms}
        for v in vmms:  # (a warm-up each: kvmfw's first boot also decompresses the kernel)
            run(boot(v, cpus_list[0], False))
        for i in range(1, args.guest_timeline + 1):
            for v in round_order(vmms, i):
                b = boot(v, cpus_list[0], False)
                b.cmdline += " kvmfw.test=dmesg"
                got[v].append(run(b))
        marks = ", ".join(f"{v} {statistics.median(r.t_marker for r in rs if r.t_marker):.3f} s"
                          for v, rs in got.items() if any(r.t_marker for r in rs))
        print(f"\n== the guest's own timeline ({cpus_list[0]} vCPU, no disk, quiet): kernel "
              f"log timestamps, medians of {args.guest_timeline} boots per VMM, in guest "
              f"seconds; a line where the difference moved by > {TIMELINE_STEP * 1000:.0f} ms "
              f"(host time to the marker, medians: {marks})\n" + guest_timeline(got),
              flush=True)

    ok = True
    table: list[str] = []
    intervals: list[tuple[str, str, str, list[float]]] = []
    """(configuration, pair, time, the rounds' ratios) for :func:`interval_report`."""
    print(f"kernel {args.flavor}, cmdline {cmdline('kvmfw', False)!r}, {args.memory} MiB, "
          f"{args.runs} rounds of one boot per VMM (the order reversed every other round); "
          f"each VMM's command ({cpus_list[0]} vCPU, no disk; a disk adds its virtio-blk "
          "device and the cmdline kvmfw.test=blk):", flush=True)
    for v in vmms:
        print(f"  {v:13s} {command_line(boot(v, cpus_list[0], False))}", flush=True)
    # One untimed boot per VMM first: the timed ones then find what a user's second boot
    # finds (the host's page cache of the images; kvmfw's decompressed kernel, which the
    # nested environment's fresh /tmp would otherwise make the first timed kvmfw boot build).
    for v in vmms:
        w = run(boot(v, cpus_list[0], False))
        print(f"warm-up {v:13s} {'ok' if w.t_marker is not None else 'no marker'}", flush=True)
    for cpus in cpus_list:
        for d in disks:
            disk = d == "yes"
            conf = f"{cpus} vCPU{'s' if cpus > 1 else ''}, {'virtio-blk' if disk else 'no disk'}"
            print(f"\n== {conf}", flush=True)
            results: dict[str, list] = {v: [] for v in vmms}
            for i in range(1, args.runs + 1):
                for v in round_order(vmms, i):
                    if args.scrub:
                        scrubbed, took = scrub_free_memory()
                        print(f"scrubbed {scrubbed >> 20} MiB in {took:.1f} s", flush=True)
                    r = run(boot(v, cpus, disk))
                    results[v].append(r)
                    good = r.t_marker is not None and r.rc == 0 and \
                        (not disk or b"KVMFW-BLK-END" in r.output)
                    ok &= good
                    marker = f"{r.t_marker:7.3f}" if r.t_marker is not None else "     NA"
                    up = f"{r.guest_uptime:6.2f}" if r.guest_uptime is not None else "    NA"
                    cpu = (f"{r.cpu_at_marker[0]:5.2f} / {r.cpu_at_marker[1]:5.2f}"
                           if r.cpu_at_marker else "   NA /    NA")
                    sch = (f"{r.sched_at_marker[0]:5.2f} (waited {r.sched_at_marker[1]:4.2f})"
                           if r.sched_at_marker else "   NA")
                    print(f"run {i:2d} {v:13s} marker {marker} s  exit {r.t_exit:7.3f} s  "
                          f"guest uptime {up} s  on-cpu {sch} s  cpu vmm/guest {cpu} s  "
                          f"rc={r.rc}  maxrss {r.maxrss_kib / 1024:6.1f} MiB"
                          f"{'' if good else '  FAILED'}", flush=True)
                    if not good and args.verbose:
                        print(r.tail(20), flush=True)

            def med(v: str, attr: str, results: dict[str, list] = results) -> float | None:
                xs = [getattr(r, attr) for r in results[v]
                      if r.t_marker is not None and r.rc == 0]
                return statistics.median(xs) if xs else None

            def med_gap(v: str, results: dict[str, list] = results) -> float | None:
                xs = [r.t_exit - r.t_marker for r in results[v]
                      if r.t_marker is not None and r.rc == 0]
                return statistics.median(xs) if xs else None

            def med_of(v: str, get: Callable[[Any], float | None],
                       results: dict[str, list] = results) -> float | None:
                """Median of ``get(result)`` over the boots where it is known."""
                xs = [x for r in results[v] if (x := get(r)) is not None]
                return statistics.median(xs) if xs else None

            for v in vmms:
                m, e = med(v, "t_marker"), med(v, "t_exit")
                u = med_of(v, lambda r: r.guest_uptime)
                c = med_of(v, lambda r: r.cpu_at_marker and r.cpu_at_marker[0])
                fc = f"{c:5.2f}" if c is not None else "   NA"
                o = med_of(v, lambda r: r.sched_at_marker and r.sched_at_marker[0])
                fo = f"{o:6.2f}" if o is not None else "    NA"
                n_ok = sum(1 for r in results[v] if r.t_marker is not None and r.rc == 0)
                fm = f"{m:7.3f}" if m is not None else "     NA"
                fe = f"{e:7.3f}" if e is not None else "     NA"
                fu = f"{u:6.2f}" if u is not None else "    NA"
                g = med_gap(v)
                fg = f"{g:5.2f}" if g is not None else "   NA"
                row = f"| {conf:22s} | {v:13s} | {fm} | {fe} | {fu} | {fg} | {fo} | {fc} |"
                ref = REFERENCE.get(v, "")
                if ref not in vmms:
                    ref = "kvmfw" if v.startswith("qemu") else ""
                if ref in vmms:
                    km, ke = med(ref, "t_marker"), med(ref, "t_exit")
                    rm = f"{km / m:.2f}" if km and m else "NA"
                    re_ = f"{ke / e:.2f}" if ke and e else "NA"
                    row += f" {rm} / {re_} | " + " / ".join(
                        paired_text(results[ref], results[v], k)
                        for k in ("t_marker", "t_exit")) + " |"
                    intervals += [(conf, f"{ref} / {v}", k[2:],
                                   round_ratios(results[ref], results[v], k))
                                  for k in ("t_marker", "t_exit")]
                else:
                    row += " | |"
                table.append(row + f" {n_ok}/{len(results[v])} |")
            if args.kvm_stats:
                print(kvm_table(conf, {v: run(boot(v, cpus, disk), kvm_stats=True)
                                       for v in vmms}), flush=True)
            for v in vmms if args.profile else ():
                if v.startswith("kvmfw"):
                    print(f"{v} profile ({conf}):\n" +
                          profile(boot(v, cpus, disk), tmp / f"stats-{v}-{cpus}-{d}.json"),
                          flush=True)

    print("\nmedians (successful boots), seconds; ratio = kvmfw / this VMM (marker / exit), "
          "kvmfw-microvm / qemu-microvm when both ran, of the medians;")
    print("paired = geometric mean of the rounds' own ratios (lowest-highest), marker / exit")
    print("guest uptime = the guest's own clock at the marker (host time less the VMM's "
          "start-up, firmware and decompression)")
    print("gap = median of exit - marker per boot (the guest's reboot path and the VMM's "
          "teardown)")
    print("on-cpu = median seconds the VMM's threads spent on a CPU up to the marker, guest "
          "mode included (the scheduler's own account: the whole host cost of the boot)")
    print("vmm cpu = median host CPU seconds of the VMM process outside the guest up to the "
          "marker (its start-up and exit handling; the nested environment's outer guest has "
          "one CPU, so the guest's vCPUs wait for it; sampled at the timer tick, so only "
          "indicative there)")
    print("| configuration          | vmm           | marker  | exit    | uptime | gap   "
          "| on-cpu | vmm cpu | ratio | paired | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in table:
        print(row)
    print("\n" + interval_report(intervals))
    if not args.no_memory:
        # one more, untimed boot per VMM, sampling /proc/PID/smaps (the sampling costs CPU,
        # so it is kept out of the timed runs)
        print("\npeak resident memory outside guest RAM (one untimed boot each, "
              f"{cpus_list[0]} vCPU, no disk, smaps every 0.2 s):")
        for v in vmms:
            r = run(boot(v, cpus_list[0], False), sample_memory=True)
            n = r.peak_non_guest_kib
            print(f"{v:13s} peak RSS {r.maxrss_kib / 1024:6.1f} MiB, outside guest RAM "
                  + (f"{n / 1024:6.1f} MiB" if n is not None else "    NA") + f"  rc={r.rc}"
                  + ("" if r.t_marker is not None and r.rc == 0 else "  FAILED boot"),
                  flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
