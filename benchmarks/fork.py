#!/usr/bin/env python3
"""``Machine.fork`` per second from a warmed guest, where the time goes, and how much of
the guest's RAM parent and child share.

    python benchmarks/fork.py [--forks 50] [--memory-mib 256] [--warm-mib 256]

The guest is tests/guests/fork.S (real mode, through the core's test arch: no plugin
needed), run once to its warm-up exit; then the host fills ``--warm-mib`` of its RAM so the
pages are resident. Each fork: the parent's ``fork()`` (drain, capture, ``fork(2)``), the
child's rebuild (new VM and vCPUs, the inherited RAM as their memory slots, state applied)
and its first KVM entry: the child runs until the guest's next port access (an IN from the
value port, which the benchmark's device turns into the end of the run), then exits. Forks
are sequential (the parent waits for each child). Columns, medians over the forks:

* ``fork()``: the parent's call, in ms; ``rebuild``: child's ``fork()`` return minus the
  parent's ``fork(2)``, in ms (includes the kernel's copy of the page tables);
  ``first entry``: from then to the first exit of the child's guest, in ms;
  ``round trip``: the parent's ``fork()`` to ``waitpid`` (the child's exit included);
* ``forks/s``: forks completed per second of wall time.

Then one child is held after its first entry and after writing ``--dirty-mib`` of RAM, and
the RAM mapping's ``/proc/PID/smaps`` figures of both processes are printed: resident,
shared with the other process, private (the pages the child wrote, copied on write).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from ckpt_arch import CkptArch  # noqa: E402

from kvmfw.device import Device, Range  # noqa: E402
from kvmfw.machine import Machine, MachineConfig  # noqa: E402

MiB = 1 << 20
GUEST = ROOT / "tests" / "guests" / "fork.bin"


class Ports(Device):
    """Port 0x13 ends the run (the warm-up); a read of port 0x14 ends it too (the child's
    first KVM entry reached the guest)."""

    name = "fork-bench-ports"

    def __init__(self, ctx: Any, machine: Machine) -> None:
        super().__init__(ctx)
        self.machine = machine

    def ranges(self) -> list[Range]:
        return [Range("pio", 0x13, 8, self.name)]

    def read(self, offset: int, size: int) -> bytes:
        self.machine.request_exit(0, "first entry")
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.machine.request_exit(0, "guest wrote the exit port")


def smaps(pid: int | str, addr: int) -> dict[str, int]:
    """kB figures of the mapping starting at ``addr`` in ``/proc/PID/smaps``."""
    out: dict[str, int] = {}
    mine = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                mine = int(head[0].split("-")[0], 16) == addr
            elif mine and head[0].endswith(":") and len(head) >= 2 and head[1].isdigit():
                out[head[0][:-1]] = int(head[1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--forks", type=int, default=50)
    ap.add_argument("--memory-mib", type=int, default=256)
    ap.add_argument("--warm-mib", type=int, default=256)
    ap.add_argument("--dirty-mib", type=int, default=16,
                    help="RAM the held child writes after its first entry")
    a = ap.parse_args()
    m = Machine(MachineConfig(memory=a.memory_mib * MiB),
                arch_plugin=CkptArch(0, GUEST.read_bytes()))
    try:
        m.add_device(Ports(m.device_context(), m))
        assert m.run(timeout=60).reason == "guest wrote the exit port"
        ram = next(iter(m.memory))
        warm = min(a.warm_mib * MiB, ram.size) - MiB
        chunk = b"\x5a" * MiB
        for off in range(MiB, MiB + warm, MiB):  # resident pages, above the guest's table
            ram.view[off:off + MiB] = chunk
        rows: dict[str, list[float]] = {"fork": [], "rebuild": [], "entry": [], "rt": []}
        t_all = time.perf_counter()
        for _ in range(a.forks):
            r, w = os.pipe()
            t0 = time.monotonic_ns()
            pid = m.fork()
            if pid == 0:
                status = 1
                try:
                    os.close(r)
                    t1 = time.monotonic_ns()
                    res = m.run(timeout=60)
                    t2 = time.monotonic_ns()
                    os.write(w, json.dumps([t1, t2, res.reason]).encode())
                    status = 0
                finally:
                    os._exit(status)
            t_ret = time.monotonic_ns()
            os.close(w)
            data = b""
            while chunk_ := os.read(r, 4096):
                data += chunk_
            os.close(r)
            _, st = os.waitpid(pid, 0)
            t_end = time.monotonic_ns()
            if os.waitstatus_to_exitcode(st) != 0 or not data:
                raise SystemExit(f"fork child failed (status {st})")
            t1, t2, reason = json.loads(data)
            assert reason == "first entry", reason
            rows["fork"].append((t_ret - t0) / 1e6)
            rows["rebuild"].append((t1 - t0) / 1e6)
            rows["entry"].append((t2 - t1) / 1e6)
            rows["rt"].append((t_end - t0) / 1e6)
        wall = time.perf_counter() - t_all
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(f"guest RAM {a.memory_mib} MiB, {warm // MiB} MiB resident; {a.forks} forks")
        print(f"fork() {med['fork']:.2f} ms  rebuild {med['rebuild']:.2f} ms  "
              f"first entry {med['entry']:.2f} ms  round trip {med['rt']:.2f} ms  "
              f"forks/s {a.forks / wall:.1f}")
        # sharing: one child held after its first entry
        r, w = os.pipe()
        r2, w2 = os.pipe()
        pid = m.fork()
        if pid == 0:
            try:
                m.run(timeout=60)
                n = min(a.dirty_mib * MiB, warm)
                ram.view[MiB:MiB + n] = b"\xa5" * n  # copied on write: private to the child
                os.write(w2, b"x")
                os.read(r, 1)
            finally:
                os._exit(0)
        os.read(r2, 1)
        child, parent = smaps(pid, ram.host_addr), smaps("self", ram.host_addr)
        os.write(w, b"x")
        os.waitpid(pid, 0)
        for fd in (r, w, r2, w2):
            os.close(fd)
        for who, s in (("parent", parent), ("child", child)):
            shared = s.get("Shared_Dirty", 0) + s.get("Shared_Clean", 0)
            private = s.get("Private_Dirty", 0) + s.get("Private_Clean", 0)
            print(f"{who:6}: RAM mapping Rss {s.get('Rss', 0) / 1024:.1f} MiB, shared "
                  f"{shared / 1024:.1f} MiB, private {private / 1024:.2f} MiB, "
                  f"Pss {s.get('Pss', 0) / 1024:.1f} MiB")
    finally:
        m.close()


if __name__ == "__main__":
    main()
