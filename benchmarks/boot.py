#!/usr/bin/env python3
"""Linux boot time: kvmfw vs QEMU/KVM (-M pc and -M microvm), same kernel, initramfs, cmdline.

Runs inside the nested x86 KVM environment (a real /dev/kvm with hardware-virtualization
semantics; this machine's own kvm_pvm cannot boot stock Linux):

    envs/x86-linux-kvm/run.sh --bench [--runs 5] [--vmms kvmfw,qemu,qemu-microvm]

Runs alternate between the VMMs (run 1 of each, then run 2 of each, ...). For each VMM it
prints the median time from process start to the init marker (KVMFW-INIT-OK on the 16550
console) and to the process exit (`reboot -f`), the ratios kvmfw/QEMU, and the peak RSS of
the VMM process (for kvmfw also minus guest RAM). Exit status: 0 when every boot reached the
marker and exited 0, 1 otherwise, 2 when Linux guests are not available here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "linux"))

from linuxguest import BASE_CMDLINE, FLAVORS, VMMS, Boot, run, why_unavailable  # noqa: E402

# The guest leaves through `reboot -f` (reboot=k: the i8042 reset line), which kvmfw and QEMU
# -M pc turn into their exit; -M microvm has no i8042 and powers off through ACPI instead.
CMDLINE = f"{BASE_CMDLINE} kvmfw.exit=reboot"
CMDLINE_MICROVM = f"{BASE_CMDLINE} kvmfw.exit=poweroff"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="boots per VMM (default 5)")
    ap.add_argument("--vmms", default="kvmfw,qemu,qemu-microvm",
                    help=f"comma list of {', '.join(VMMS)} (default: all)")
    ap.add_argument("--flavor", default="cloud-amd64", choices=FLAVORS, help="guest kernel")
    ap.add_argument("--cmdline", help=f"default {CMDLINE!r} ({CMDLINE_MICROVM!r} for "
                    "qemu-microvm)")
    ap.add_argument("--memory", type=int, default=256, help="guest RAM in MiB (default 256)")
    ap.add_argument("--timeout", type=float, default=60.0, help="per boot, seconds")
    ap.add_argument("-v", "--verbose", action="store_true", help="console tail of failed boots")
    args = ap.parse_args(argv)

    why = why_unavailable()
    if why:
        print(f"boot.py: cannot run here: {why}", file=sys.stderr)
        return 2
    vmms = [v.strip() for v in args.vmms.split(",") if v.strip()]
    for v in vmms:
        if v not in VMMS:
            ap.error(f"unknown VMM {v!r}")

    results: dict[str, list] = {v: [] for v in vmms}
    ok = True
    def cmdline(vmm: str) -> str:
        if args.cmdline:
            return args.cmdline
        return CMDLINE_MICROVM if vmm == "qemu-microvm" else CMDLINE

    print(f"kernel {args.flavor}, cmdline {cmdline('kvmfw')!r}, {args.memory} MiB, "
          f"{args.runs} alternating runs per VMM", flush=True)
    for i in range(1, args.runs + 1):
        for v in vmms:
            r = run(Boot(v, args.flavor, cmdline(v), memory_mib=args.memory,
                         timeout=args.timeout))
            results[v].append(r)
            good = r.t_marker is not None and r.rc == 0
            ok &= good
            marker = f"{r.t_marker:7.3f}" if r.t_marker is not None else "     NA"
            print(f"run {i:2d} {v:13s} marker {marker} s  exit {r.t_exit:7.3f} s  rc={r.rc}  "
                  f"maxrss {r.maxrss_kib / 1024:6.1f} MiB{'' if good else '  FAILED'}",
                  flush=True)
            if not good and args.verbose:
                print(r.tail(20), flush=True)

    def med(v: str, attr: str) -> float | None:
        xs = [getattr(r, attr) for r in results[v] if r.t_marker is not None and r.rc == 0]
        return statistics.median(xs) if xs else None

    print("\nmedians (successful boots):")
    print(f"{'vmm':13s} {'to marker':>10s} {'to exit':>10s} {'peak RSS':>10s} {'ok':>6s}")
    for v in vmms:
        m, e = med(v, "t_marker"), med(v, "t_exit")
        rss = max((r.maxrss_kib for r in results[v]), default=0) / 1024
        n_ok = sum(1 for r in results[v] if r.t_marker is not None and r.rc == 0)
        fm = f"{m:9.3f}s" if m is not None else "        NA"
        fe = f"{e:9.3f}s" if e is not None else "        NA"
        print(f"{v:13s} {fm:>10s} {fe:>10s} {rss:8.1f}MiB {n_ok:>3d}/{len(results[v])}")
    if "kvmfw" in vmms:
        for ref in ("qemu", "qemu-microvm"):
            if ref not in vmms:
                continue
            for attr, what in (("t_marker", "marker"), ("t_exit", "exit")):
                a, b = med("kvmfw", attr), med(ref, attr)
                if a is not None and b:
                    label = "qemu -M pc" if ref == "qemu" else "qemu -M microvm"
                    print(f"ratio kvmfw / {label:15s} to {what:6s}: {a / b:.2f}")
    # Memory: one more, untimed boot per VMM, sampling /proc/PID/smaps (the sampling costs
    # CPU, so it is kept out of the timed runs).
    print("\npeak resident memory outside guest RAM (one untimed boot each, smaps every 0.2 s):")
    for v in vmms:
        r = run(Boot(v, args.flavor, cmdline(v), memory_mib=args.memory, timeout=args.timeout),
                sample_memory=True)
        n = r.peak_non_guest_kib
        print(f"{v:13s} peak RSS {r.maxrss_kib / 1024:6.1f} MiB, outside guest RAM "
              + (f"{n / 1024:6.1f} MiB" if n is not None else "    NA") + f"  rc={r.rc}"
              + ("" if r.t_marker is not None and r.rc == 0 else "  FAILED boot"),
              flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
