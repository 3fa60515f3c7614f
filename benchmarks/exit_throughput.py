#!/usr/bin/env python3
"""PIO and MMIO exits per second: kvmfw's full path against a raw C loop, a raw Python
loop and (when installed) QEMU, all measured in this one invocation on the same guest.

    python benchmarks/exit_throughput.py [--exits 200000] [--reps 3] [--only kvmfw]

Every variant runs tests/guests/realmode.bin's loop of ``out %al,%dx`` (or an MMIO byte
store) N times. kvmfw's path is the real one: KvmCPU.tick -> KVM_RUN -> exit table -> the
arch's handle_exit_io (the core's test arch) -> bus -> a no-op device ("kvmfw"); the same
under a tick limit (an event bounds every slice, the run timer is armed); and with the
no-op device's registers declared sinks, so the compiled path (kvmfw.fastpath) answers the
exits in C ("kvmfw compiled"); for port IO also with the arch letting single accesses go
straight to the bus ("kvmfw, direct port IO": ``KvmCPU.direct_port_io``, as MMIO exits
always do); and with a coalesced PIO zone registered on a port the loop never touches
("kvmfw, coalesced zone": as every run on the x86 boards, whose CMOS RTC posts its index
writes there; an exit then costs what it costs without one). The reps are interleaved
(each rep runs every variant once) and each ratio is the median of the per-rep ratios, so
load that changes during the run (a busy host) hits the variants alike. A third section
runs ``kvmfw run`` as a user does, on the CLI's default x86 board, with a guest that
writes and reads back the 16550's scratch register N times (two exits per iteration: the
write through the x86 plugin's port IO, the bus and the 16550; the read answered in C from
the 16550's live registers, or also through Python with ``--option fastpath=off``),
against QEMU/KVM running the same code as its BIOS; all per exit from the difference of
two run lengths (start-up cancels out). Ratios are per exit against the C loop and against
the raw Python loop (lower is better): the median of the per-rep ratios, and against the
raw loop also the ratio of the two fastest reps ("best": the least disturbed by other load,
the steadier figure on a busy host). A fourth section prints N/2 bytes to the 16550 as
a console driver does (poll LSR until THR is empty, write THR: two exits a byte under
QEMU) and gives the time per byte: ``kvmfw run`` on the default board (LSR answered in C,
THR writes posted in KVM's coalesced ring), with ``uart16550,coalesce=off`` (each THR
write an exit to Python) and QEMU/KVM ``-M pc``; ratios against QEMU. The resident memory
of this process (guest RAM is 64 KiB here) is printed at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
GUEST = ROOT / "tests" / "guests" / "realmode.bin"
PROGRAM = {"pio": 8, "mmio": 9}


def build_c(tmp: Path) -> Path:
    exe = tmp / "raw_exits"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(ROOT / "benchmarks" / "raw_exits.c")],
                   check=True)
    return exe


def c_loop(exe: Path, kind: str, n: int) -> float:
    u0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    out = subprocess.run([str(exe), str(GUEST), kind, str(n)], check=True,
                         capture_output=True, text=True).stdout.split()
    USER_NS.setdefault("C loop", []).append(
        (resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - u0) * 1e9 / int(out[0]))
    return int(out[1]) / int(out[0])


class NoOp:
    """The cheapest device there is."""

    def __init__(self, machine: object) -> None:
        self.machine = machine

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        if offset == 3:
            self.machine.request_exit(0, "done")  # type: ignore[attr-defined]


TIMER_ARMS: list[float] = []
"""timer_settime calls per 1000 exits of each tick-limited kvmfw run."""
USER_NS: dict[str, list[float]] = {}
"""User-mode CPU ns per exit of each kvmfw run (kvmfw's own Python cost: unlike wall time,
barely moved by other load on the host)."""


def kvmfw_loop(kind: str, n: int, limited: bool = False, compiled: bool = False,
               direct: bool = False, zone: bool = False) -> float:
    """kvmfw's full path; ``limited``: under a tick limit, so an event bounds every slice
    and the run timer is armed (the path of any run with a device timer pending);
    ``compiled``: the loop's registers are declared sinks (kvmfw.fastpath); ``direct``:
    the arch lets single port accesses go straight to the bus (``KvmCPU.direct_port_io``);
    ``zone``: a coalesced PIO zone is registered (at port 0x70, which the loop never uses)."""
    from realmode_arch import RealModeArch

    from kvmfw.device import Range
    from kvmfw.eventq import TICKS_PER_SECOND
    from kvmfw.fastpath import FastRange
    from kvmfw.machine import Machine, MachineConfig

    arch = RealModeArch(PROGRAM[kind], direct_port_io=direct)
    with Machine(MachineConfig(memory=0x10000), arch_plugin=arch) as m:
        dev = NoOp(m)
        m.map_device(Range("pio", 0x10, 4, "noop"), dev)
        m.map_device(Range("mmio", 0x20000, 0x100, "noop-mmio"), dev)
        if compiled:  # NoOp ignores writes below offset 3: say so
            m.bus.pio.add_fast(FastRange("pio", 0x10, 3, sink=True))
            m.bus.mmio.add_fast(FastRange("mmio", 0x20000, 0x100, sink=True))
        if zone:
            m.vm.register_coalesced_mmio(0x70, 1, pio=True)
        m.cpus[0].get_context().regs["rcx"] = n
        m.cpus[0].mark_context_dirty()
        u0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        t0 = time.perf_counter_ns()
        m.run(max_ticks=10**6 * TICKS_PER_SECOND if limited else None)
        ns = time.perf_counter_ns() - t0
        stats = m.cpus[0].stats
        name = "kvmfw compiled" if compiled else "kvmfw, tick limit" if limited else \
            "kvmfw, direct port IO" if direct else "kvmfw, coalesced zone" if zone else "kvmfw"
        USER_NS.setdefault(name, []).append(
            (resource.getrusage(resource.RUSAGE_SELF).ru_utime - u0) * 1e9 / stats.vm_exits)
        if limited:
            TIMER_ARMS.append(1000 * getattr(stats, "timer_settime", -1) / stats.vm_exits)
        return ns / stats.vm_exits


def python_loop(kind: str, n: int) -> float:
    """The least Python can do per exit: KVM_RUN through cffi, read the reason and payload."""
    from realmode_arch import KVM_GET_REGS, KVM_REGS_SIZE, KVM_SET_REGS

    from kvmfw.abi import address_of, ffi, lib
    from kvmfw.kvm import Kvm
    from kvmfw.memory import MemoryRegion

    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_ram(0, 0x10000)
        rom = MemoryRegion.anonymous(0xFFFFF000, 0x1000, "rom")
        rom.view[:] = GUEST.read_bytes()
        vm.add_memory(rom)
        vcpu = vm.create_vcpu()
        buf = ffi.new("uint8_t[]", KVM_REGS_SIZE)
        vcpu.ioctl(KVM_GET_REGS, address_of(buf))
        regs = list(struct.unpack("<18Q", ffi.buffer(buf)))
        regs[0], regs[2] = PROGRAM[kind], n
        ffi.buffer(buf)[:] = struct.pack("<18Q", *regs)
        vcpu.ioctl(KVM_SET_REGS, address_of(buf))
        run, view, fd, kvm_run = vcpu.run, vcpu.run_view, vcpu.fd, lib.kvmfw_run
        sink = bytearray(64)
        exits = 0
        u0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        t0 = time.perf_counter_ns()
        while True:
            if kvm_run(fd) < 0:
                raise OSError("KVM_RUN failed")
            exits += 1
            reason = run.exit_reason
            if reason == 2:
                port, off = run.io.port, run.io.data_offset
                if port == 0x13:
                    break
                sink[exits & 63] = view[off]
            elif reason == 6:
                sink[exits & 63] = view[40]
            else:
                raise RuntimeError(f"unexpected exit {reason}")
        ns = (time.perf_counter_ns() - t0) / exits
        USER_NS.setdefault("raw Python loop", []).append(
            (resource.getrusage(resource.RUSAGE_SELF).ru_utime - u0) * 1e9 / exits)
        return ns


def qemu_loop(kind: str, n: int, tmp: Path) -> float | None:
    """QEMU/KVM running the same ROM as its BIOS; per-exit cost from two run lengths."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or kind != "pio":
        return None

    def timed(count: int) -> float:
        rom = bytearray(GUEST.read_bytes())
        struct.pack_into("<HHI", rom, 0xFE0, PROGRAM[kind], 0, count)
        path = tmp / f"rom-{count}.bin"
        path.write_bytes(bytes(0xF000) + rom)  # QEMU wants a 64 KiB BIOS; ours is its top
        t0 = time.perf_counter()
        r = subprocess.run([qemu, "-accel", "kvm", "-M", "pc", "-m", "16", "-display", "none",
                            "-nodefaults", "-no-user-config", "-bios", str(path),
                            "-device", "isa-debug-exit,iobase=0x13,iosize=1"],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 1:  # isa-debug-exit: (0 << 1) | 1
            raise RuntimeError(f"QEMU failed ({r.returncode}): {r.stderr.strip()}")
        return time.perf_counter() - t0

    base = min(timed(1) for _ in range(2))
    full = min(timed(n) for _ in range(2))
    return (full - base) * 1e9 / n


BOARD_GUEST = """
    .code16
    .globl _start
_start:
    mov $COUNT, %ecx
    mov $0x3ff, %dx         /* COM1's scratch register */
1:  mov %cl, %al
    out %al, %dx
    in %dx, %al
    cmp %cl, %al            /* the value must read back */
    jne 2f
    dec %ecx
    jnz 1b
    xor %al, %al
    out %al, $0xf4          /* debug-exit: status (0 << 1) | 1 */
2:  mov $1, %al
    out %al, $0xf4          /* read back wrong: status 3 */
3:  hlt
    jmp 3b
    .org 0xfff0             /* as a 64 KiB BIOS (QEMU), the reset vector */
    ljmp $0xf000, $_start
    .org 0x10000
"""

CONSOLE_GUEST = """
    .code16
    .globl _start
_start:
    mov $COUNT, %ecx
1:  mov $0x3fd, %dx         /* COM1's LSR: wait until THR is empty */
2:  in %dx, %al
    test $0x20, %al
    jz 2b
    mov $0x3f8, %dx         /* THR: one byte of output */
    mov $'.', %al
    out %al, %dx
    dec %ecx
    jnz 1b
    xor %al, %al
    out %al, $0xf4          /* debug-exit: status (0 << 1) | 1 */
3:  hlt
    jmp 3b
    .org 0xfff0             /* as a 64 KiB BIOS (QEMU), the reset vector */
    ljmp $0xf000, $_start
    .org 0x10000
"""


def board_guest(tmp: Path, count: int, text: str = BOARD_GUEST) -> Path:
    """A 16550 loop (``text``, COUNT iterations): flat at 0x7c00 for kvmfw, a 64 KiB BIOS
    for QEMU (the code is position-independent; only the reset vector jumps to it)."""
    tag = f"{'console' if text is CONSOLE_GUEST else 'board'}{count}"
    src, obj, out = tmp / f"board{tag}.S", tmp / f"board{tag}.o", tmp / f"board{tag}.bin"
    src.write_text(text.replace("COUNT", str(count)))
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0", "--oformat", "binary", "-o", str(out),
                    str(obj)], check=True)
    return out


def board_loop(who: str, n: int, tmp: Path, *extra: str, text: str = BOARD_GUEST,
               per_iteration: int = 2) -> float | None:
    """ns per exit of the 16550 guest ``text`` (``per_iteration`` exits per iteration
    under QEMU; 1: ns per iteration) under ``kvmfw run`` with the default x86 board
    (``extra``: more of its arguments), or QEMU/KVM ``-M pc`` with its COM1; from two run
    lengths."""
    qemu = shutil.which("qemu-system-x86_64")
    if who == "qemu" and qemu is None:
        return None

    def timed(count: int) -> float:
        image = board_guest(tmp, count, text)
        if who == "kvmfw":
            cmd = [sys.executable, "-m", "kvmfw.cli", "run", "--kernel", str(image),
                   "--load-addr", "0x7c00", "--console", "none", "--no-summary",
                   "--device", "debug-exit", "--memory", "16", *extra]
        else:
            cmd = [str(qemu), "-accel", "kvm", "-M", "pc", "-m", "16", "-display", "none",
                   "-nodefaults", "-no-user-config", "-serial", "null", "-bios", str(image),
                   "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd="/")
        if r.returncode != 1:
            raise RuntimeError(f"{who} board run failed ({r.returncode}): {r.stderr.strip()}")
        return time.perf_counter() - t0

    base = min(timed(1) for _ in range(2))
    full = min(timed(n // 2) for _ in range(2))
    return (full - base) * 1e9 / (per_iteration * (n // 2 - 1))


def rss_mib() -> tuple[float, float]:
    status = Path("/proc/self/status").read_text()
    val = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
           if line.startswith(("VmRSS", "VmHWM"))}
    return val["VmRSS"] / 1024, val["VmHWM"] / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exits", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", choices=["kvmfw"], help="measure only kvmfw's paths (and C)")
    args = ap.parse_args()
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("benchmark needs a readable and writable /dev/kvm", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        exe = build_c(tmp)
        print(f"{args.exits} exits per run, median of {args.reps} runs; ns per exit "
              "(exits/s); per-exit time / the C loop's and / the raw Python loop's (the "
              "median of the per-rep ratios; best: fastest rep against fastest rep)")
        c_pio = raw_pio = 0.0
        paired: dict[str, list[float]] = {}

        def show(res: dict[str, float], c: str = "C loop", py: str = "raw Python loop") -> None:
            base, pyb = res[c], res.get(py)

            def ratio(name: str, ref: str, ref_ns: float) -> float:
                # the median of per-rep ratios when both were measured in each rep (paired:
                # load that drifts during the run cancels), else the ratio of medians
                a, b = paired.get(name, []), paired.get(ref, [])
                if a and len(a) == len(b):
                    return statistics.median(x / y for x, y in zip(a, b, strict=True))
                return res[name] / ref_ns

            def best(name: str, ref: str) -> str:
                # the fastest rep of each against each other: what interference (which only
                # ever adds time) left least of; the figure to read on a busy host
                a, b = paired.get(name, []), paired.get(ref, [])
                return f" (best {min(a) / min(b):4.2f})" if len(a) > 1 and b else " " * 12

            for name, ns in res.items():
                user = USER_NS.pop(name, None)
                extra = f"  user CPU {statistics.median(user):6.0f} ns" if user else ""
                vs_py = f"  vs Python {ratio(name, py, pyb):5.2f}{best(name, py)}" if pyb else ""
                print(f"  {name:<24} {ns:8.0f} ns  ({1e9 / ns:9.0f} /s)  vs C "
                      f"{ratio(name, c, base):5.2f}{vs_py}{extra}")

        for kind in ("pio", "mmio"):
            # the reps are interleaved (each rep runs every variant once), so a change in
            # the host's load hits all variants alike
            n = args.exits
            variants: dict[str, Callable[[], float]] = {"C loop": partial(c_loop, exe, kind, n)}
            if not args.only:
                variants["raw Python loop"] = partial(python_loop, kind, n)
            variants["kvmfw"] = partial(kvmfw_loop, kind, n)
            if kind == "pio":
                variants["kvmfw, direct port IO"] = partial(kvmfw_loop, kind, n, direct=True)
            variants["kvmfw, tick limit"] = partial(kvmfw_loop, kind, n, limited=True)
            if kind == "pio":
                variants["kvmfw, coalesced zone"] = partial(kvmfw_loop, kind, n, zone=True)
            variants["kvmfw compiled"] = partial(kvmfw_loop, kind, n, compiled=True)
            paired.clear()
            for _ in range(args.reps):
                for name, fn in variants.items():
                    paired.setdefault(name, []).append(fn())
            res = {name: statistics.median(v) for name, v in paired.items()}
            if kind == "pio":
                c_pio, raw_pio = res["C loop"], res.get("raw Python loop")
            q = None if args.only else qemu_loop(kind, args.exits, tmp)
            if q is not None:
                res["QEMU/KVM"] = q
            print(f"\n{kind.upper()}")
            show(res)
            if kind == "pio" and q is None and not args.only:
                print("  QEMU/KVM         not measured (install qemu-system-x86 to compare)")
            arms = statistics.median(TIMER_ARMS)
            TIMER_ARMS.clear()
            print(f"  run timer: {arms:.2f} timer_settime per 1000 exits under a tick limit")
        paired.clear()
        if not args.only:
            print("\n16550 write+readback, `kvmfw run` on the CLI's default x86 board")
            res = {"C loop (PIO)": c_pio}
            if raw_pio is not None:
                res["raw Python loop (PIO)"] = raw_pio
            res["kvmfw run"] = board_loop("kvmfw", args.exits, tmp) or 0.0
            res["kvmfw run, fastpath=off"] = board_loop("kvmfw", args.exits, tmp, "--option",
                                                        "fastpath=off") or 0.0
            q = board_loop("qemu", args.exits, tmp)
            if q is not None:
                res["QEMU/KVM -M pc"] = q
            show(res, "C loop (PIO)", "raw Python loop (PIO)")
            print(f"\n16550 console output, {args.exits // 2} bytes, each after an LSR poll; "
                  "ns per byte, `kvmfw run` on the default x86 board")
            console = partial(board_loop, text=CONSOLE_GUEST, per_iteration=1)
            per_byte = {"kvmfw run": console("kvmfw", args.exits, tmp),
                        "kvmfw run, coalesce=off": console(
                            "kvmfw", args.exits, tmp, "--no-default-devices", "--device",
                            "uart16550,coalesce=off"),
                        "QEMU/KVM -M pc": console("qemu", args.exits, tmp)}
            q = per_byte["QEMU/KVM -M pc"]
            for name, ns in per_byte.items():
                if ns is not None:
                    vs = f"  vs QEMU {ns / q:5.2f}" if q else ""
                    print(f"  {name:<24} {ns:8.0f} ns  ({1e9 / ns:9.0f} bytes/s){vs}")
    rss, hwm = rss_mib()
    print(f"\nmemory: kvmfw process RSS {rss:.1f} MiB (peak {hwm:.1f} MiB) "
          "with 64 KiB of guest RAM")
    return 0


if __name__ == "__main__":
    sys.exit(main())
