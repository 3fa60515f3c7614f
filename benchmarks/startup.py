#!/usr/bin/env python3
"""kvmfw start-up: from process start to the first KVM_RUN, per phase.

    python benchmarks/startup.py [--runs 5] [--kernel K --initrd I] [--profile] [--importtime]
                                 [--qemu] [-- more kvmfw run arguments, e.g. --cpus 2]

Each run is a fresh ``python`` process that records CLOCK_MONOTONIC (system-wide, so the
parent's clock) when the interpreter is up, when ``kvmfw.cli`` is imported and when the
first KVM_RUN is issued (it wraps ``kvmfw.cpu._run_ctx`` for that one call), then leaves
through the same ``kvmfw run`` path a user takes (``--max-ticks 1``: it ends at the first
exit). Printed: medians of spawn->interpreter, ->imports, ->first KVM_RUN, and the whole
process; ``kvmfw run --help`` and ``python -c pass`` for scale. ``--profile`` adds one run
under cProfile up to the first KVM_RUN (top functions by cumulative time, then by
own time); ``--importtime`` one run with ``-X importtime`` (the slowest imports);
``--qemu`` the host CPU (user + system) of the whole ``kvmfw run --max-ticks 1`` process
against QEMU's with the same kernel and initramfs (``-M microvm,rtc=on -S``, quit over QMP
as soon as it answers: its start-up, up to where it would enter the guest), alternating,
with the ratio, and the floor under kvmfw's figure: ``python -c pass`` and ``python -c
'import pluggy'`` (the interpreter and the hook library with its imports). The
kernel defaults to the nested environment's ($KVMFW_LINUX_GUESTS/vmlinuz-cloud-amd64 and
its initramfs), else the embedded guest. Timing only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import sys, time
t_interp = time.monotonic()
prof = None
if PROFILE:
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
import kvmfw.cli
t_imports = time.monotonic()
import kvmfw.cpu
_orig = kvmfw.cpu._run_ctx
def _first(ctx):
    kvmfw.cpu._run_ctx = _orig
    t = time.monotonic()
    if prof is not None:
        prof.disable()
        import pstats
        st = pstats.Stats(prof, stream=sys.stderr)
        st.sort_stats("cumulative").print_stats(45)
        st.sort_stats("tottime").print_stats(30)
    sys.stderr.write(f"KVMFW-STARTUP {t_interp!r} {t_imports!r} {t!r}\n")
    sys.stderr.flush()
    return _orig(ctx)
kvmfw.cpu._run_ctx = _first
sys.argv = ["kvmfw", *ARGV]
kvmfw.cli.main()
"""


SCRIPT_DIR = Path(tempfile.mkdtemp(prefix="kvmfw-startup-"))


def guest_args(kernel: str | None, initrd: str | None) -> list[str]:
    g = os.environ.get("KVMFW_LINUX_GUESTS")
    if kernel is None and g and os.path.exists(f"{g}/vmlinuz-cloud-amd64"):
        kernel, initrd = f"{g}/vmlinuz-cloud-amd64", f"{g}/initramfs-cloud-amd64.cpio.gz"
    out = []
    if kernel:
        out += ["--kernel", kernel, "--cmdline", "console=ttyS0 quiet"]
    if initrd:
        out += ["--initrd", initrd]
    return out + ["--max-ticks", "1", "--no-summary", "--console", "none", "--timeout", "600"]


def child(argv: list[str], profile: bool = False, flags: tuple[str, ...] = ()) -> tuple:
    code = CHILD.replace("PROFILE", repr(profile)).replace("ARGV", repr(argv))
    # a file named kvmfw, as the console script: kvmfw.cli.main ends the process as there.
    # One directory for every run: it is sys.path[0], part of the entry-point index's key.
    script = SCRIPT_DIR / "kvmfw"
    script.write_text(code)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, *flags, str(script)], capture_output=True, text=True)
    t_end = time.monotonic()
    line = next((ln for ln in p.stderr.splitlines() if ln.startswith("KVMFW-STARTUP")), None)
    if line is None:
        raise SystemExit(f"startup.py: no first KVM_RUN (rc {p.returncode}):\n{p.stderr[-2000:]}")
    ti, tm, tr = (float(x) for x in line.split()[1:])
    return t0, ti, tm, tr, t_end, p.stderr


def cpu(cmd: list[str], stdin: bytes = b"") -> tuple[float, int, str]:
    """Host CPU seconds (user + system) of ``cmd`` run to its end, its exit status and the
    last line it wrote to stderr."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(cmd, input=stdin, capture_output=True)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    last = (p.stderr.decode(errors="replace").strip().splitlines() or [""])[-1]
    return (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), p.returncode, last


def qemu_cpu_vs_kvmfw(argv: list[str], runs: int) -> None:
    """Start-up CPU of kvmfw against QEMU's with the same guest, alternating A B, B A."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or "--kernel" not in argv:
        print("--qemu: needs qemu-system-x86_64 and a kernel (--kernel, or the nested "
              "environment's $KVMFW_LINUX_GUESTS)")
        return
    kernel = argv[argv.index("--kernel") + 1]
    q = [qemu, "-enable-kvm", "-cpu", "host", "-M", "microvm,rtc=on", "-m", "256",
         "-display", "none", "-no-reboot", "-S", "-qmp", "stdio", "-kernel", kernel,
         "-append", "console=ttyS0 quiet"]
    if "--initrd" in argv:
        q += ["-initrd", argv[argv.index("--initrd") + 1]]
    quit_ = b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'
    k = [sys.executable, "-m", "kvmfw.cli", *argv]
    # the floor under any start-up of kvmfw: the interpreter, and pluggy (the hook library
    # the core calls plugins through) with what it imports (typing, inspect, ...)
    floor = {"python": [sys.executable, "-c", "pass"],
             "pluggy": [sys.executable, "-c", "import pluggy"]}
    xs: dict[str, list[float]] = {"kvmfw": [], "qemu": [], "python": [], "pluggy": []}
    failed: dict[str, str] = {}
    for i in range(runs):
        order = ("kvmfw", "qemu", "python", "pluggy")
        for name in (order if i % 2 == 0 else order[::-1]):
            if name in floor:
                t, rc, last = cpu(floor[name])
            else:
                t, rc, last = cpu(k) if name == "kvmfw" else cpu(q, quit_)
            xs[name].append(t)
            if rc not in (0, 3):  # (3: kvmfw's --max-ticks limit)
                failed[name] = f"exit status {rc}: {last}"
    for name, why in failed.items():
        print(f"--qemu: {name} failed ({why}): its figure is not a whole start-up")
    km, qm = statistics.median(xs["kvmfw"]), statistics.median(xs["qemu"])
    print(f"host CPU (user + system), medians of {runs}: kvmfw run --max-ticks 1 {km:.3f} s, "
          f"QEMU -M microvm -S to its first QMP answer {qm:.3f} s: {km / qm:.2f}x")
    print(f"  ({' '.join(q)})")
    pm, gm = statistics.median(xs["python"]), statistics.median(xs["pluggy"])
    print(f"  the floor: python -c pass {pm:.3f} s, python -c 'import pluggy' {gm:.3f} s "
          f"({gm / qm:.2f}x QEMU's whole start-up); kvmfw's own part above it {km - gm:.3f} s")


def wall(cmd: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, capture_output=True)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kernel")
    ap.add_argument("--initrd")
    ap.add_argument("--profile", action="store_true", help="one cProfile run (top 45)")
    ap.add_argument("--importtime", action="store_true", help="one -X importtime run")
    ap.add_argument("--qemu", action="store_true",
                    help="host CPU of the whole kvmfw process against QEMU's start-up")
    ap.add_argument("extra", nargs="*", help="after --: more kvmfw run arguments "
                    "(e.g. -- --cpus 2 --option board=microvm)")
    args = ap.parse_args()
    argv = ["run", *guest_args(args.kernel, args.initrd), *args.extra]
    print(f"python {sys.version.split()[0]} {sys.executable}; kvmfw {' '.join(argv)}",
          flush=True)
    rows: dict[str, list[float]] = {k: [] for k in
                                    ("interpreter", "imports", "first KVM_RUN", "process",
                                     "run --help", "python -c pass")}
    for _ in range(args.runs):
        t0, ti, tm, tr, te, _err = child(argv)
        rows["interpreter"].append(ti - t0)
        rows["imports"].append(tm - t0)
        rows["first KVM_RUN"].append(tr - t0)
        rows["process"].append(te - t0)
        rows["run --help"].append(wall([sys.executable, "-m", "kvmfw.cli", "run", "--help"]))
        rows["python -c pass"].append(wall([sys.executable, "-c", "pass"]))
    print(f"medians of {args.runs}, seconds from spawn:")
    for k, xs in rows.items():
        print(f"  {k:16s} {statistics.median(xs):7.3f}   (min {min(xs):.3f} max {max(xs):.3f})")
    if args.importtime:
        *_, err = child(argv, flags=("-X", "importtime"))
        lines = [ln for ln in err.splitlines() if ln.startswith("import time:")
                 and "|" in ln and "cumulative" not in ln]
        lines.sort(key=lambda ln: -int(ln.split("|")[1]))
        print(f"-X importtime: {len(lines)} modules; slowest 35 (cumulative us):")
        print("\n".join(lines[:35]))
    if args.qemu:
        qemu_cpu_vs_kvmfw(argv, args.runs)
    if args.profile:
        *_, err = child(argv, profile=True)
        print("cProfile up to the first KVM_RUN:")
        print("\n".join(ln for ln in err.splitlines()[:80] if not ln.startswith("KVMFW-")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
