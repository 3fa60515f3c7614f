"""Host memory a hostile virtio chain costs: ``python rss_hostile_chain.py [blk|console] [N]``.

A 1 MiB guest posts one chain of N (default 255) descriptors that all list the same 1 MiB
of its RAM (device-readable) and a 1-byte status buffer, and notifies. Prints the peak RSS
growth of this process in MiB (the issue-10 reproducer: the gathering transport grew by
~511 MiB with N=255, ~126 MiB with N=63; views keep it flat).
"""

from __future__ import annotations

import resource
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import RAM_SIZE, make_harness  # noqa: E402
from virtio_driver import Driver  # noqa: E402

from kvmfw_devices import virtio_mmio as v  # noqa: E402
from kvmfw_devices.virtio_blk import T_OUT, VirtioBlk  # noqa: E402
from kvmfw_devices.virtio_console import VirtioConsole  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(kind: str, count: int) -> None:
    h = make_harness()
    mem = h.ctx.memory
    tmp = Path(tempfile.mkdtemp(prefix="kvmfw-rss-")) / "disk.img"
    tmp.write_bytes(bytes(512))
    if kind == "blk":
        dev: v.VirtioMmio = VirtioBlk(h.ctx, file=str(tmp))
        mem.write(0, struct.pack("<IIQ", T_OUT, 0, 0))
    else:
        dev = VirtioConsole(h.ctx, output="none")
    drv = Driver(dev, mem, ring_base=0x80000, num=256)
    drv.start(dev.num_queues)
    q = 0 if kind == "blk" else 1
    desc, avail, _ = drv.rings[q]
    for i in range(count + 1):
        flags = v.DESC_F_NEXT if i < count else v.DESC_F_WRITE
        mem.write(desc + 16 * i, struct.pack("<QIHH", 0, RAM_SIZE if i < count else 1, flags,
                                             i + 1))
    mem.write_u(avail + 4, 2, 0)
    mem.write_u(avail + 2, 2, 1)
    before = peak_mib()
    drv.w32(v.REG_QUEUE_NOTIFY, q)
    after = peak_mib()
    print(f"{kind}: guest RAM {RAM_SIZE >> 20} MiB, chain {count} x 1 MiB: peak RSS "
          f"{before:.0f} -> {after:.0f} MiB (+{after - before:.0f} MiB); broken={dev.broken}, "
          f"chains={dev.stats['chains']}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "console",
         int(sys.argv[2]) if len(sys.argv) > 2 else 255)
