"""A child process of the checkpoint tests (a new process for restores, a writer to kill).

    python ckpt_child.py write DIR FILL_MIB   run the guest a little, fill FILL_MIB MiB of
                                              guest RAM with random bytes, print "writing",
                                              checkpoint to DIR, print "done"
    python ckpt_child.py restore DIR          restore DIR, run to the end, print the result
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from ckpt_arch import build, restore  # noqa: E402

from kvmfw.eventq import TICKS_PER_MS  # noqa: E402


def main() -> None:
    cmd, path = sys.argv[1], sys.argv[2]
    if cmd == "write":
        fill = int(sys.argv[3]) << 20
        rig = build(memory=max(fill * 2, 1 << 20))
        m = rig.machine
        while rig.ticker.count < 10:
            m.run(max_ticks=TICKS_PER_MS // 2, timeout=60)
        region = next(iter(m.memory))
        region.view[fill:2 * fill] = os.urandom(fill)  # outside what the guest uses
        print("writing", flush=True)
        m.checkpoint(path)
        print("done", flush=True)
    else:
        rig = restore(path)
        r = rig.machine.run(timeout=60)
        print(r.status, rig.result().hex() if rig.result() else None, flush=True)


if __name__ == "__main__":
    main()
