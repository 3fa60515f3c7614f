"""A Linux sweep on the real x86 KVM: Linux boots once and checkpoints itself from a
shell line that, once restored, reads a command from the host file ``cmd`` (``kvmfwop
readfile``, from the variant's directory), runs it, writes its output back (``kvmfwop
writefile out``) and prints it between markers; ``kvmfw.sweep`` runs 4 variants of the
command from that checkpoint as Dask tasks, and every row carries its command's output
(console and file)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from linuxguest import BASE_CMDLINE, Boot, Interactive, why_unavailable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_linux_checkpoint import MEMORY_MIB, TIMEOUT, _start, initrd_with_kvmfwop  # noqa: E402

WHY = why_unavailable()
pytestmark = [pytest.mark.linux, pytest.mark.skipif(WHY is not None, reason=WHY or "")]

CMDLINE = f"{BASE_CMDLINE} kvmfw.test=shell kvmfw.exit=reboot"
# typed once; runs to the checkpoint in the boot, and from there in every variant
LINE = (b"kvmfwop checkpoint && echo CKPT''-OK && kvmfwop readfile cmd > /tmp/cmd && "
        b"sh /tmp/cmd > /tmp/out 2>&1; kvmfwop writefile out < /tmp/out; "
        b"echo OUT''-BEGIN; cat /tmp/out; echo OUT''-END; kvmfwop exit 0\r")
COMMANDS = {"echo hello-sweep": "hello-sweep", "expr 6 '*' 7": "42", "uname -s": "Linux",
            "echo $((3 + 4))": "7"}


def test_linux_sweep_from_one_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("distributed", reason="the environment lacks the sweep extra "
                        "(kvmfw[sweep]: Dask distributed)")
    pytest.importorskip("pyarrow", reason="the environment lacks the sweep extra (pyarrow)")
    import kvmfw.sweep

    ckdir = tmp_path / "ckpts"
    boot = Boot("kvmfw", "cloud-amd64", CMDLINE, memory_mib=MEMORY_MIB,
                timeout=8 * TIMEOUT, extra=["--checkpoint-dir", str(ckdir)])
    argv = boot.argv()
    argv[argv.index("--initrd") + 1] = str(initrd_with_kvmfwop(tmp_path))
    s = Interactive.__new__(Interactive)
    _start(s, argv, boot.timeout)
    try:
        s.expect(rb"kvmfw# ", timeout=TIMEOUT)
        s.send(LINE)
        s.expect(rb"CKPT-OK", timeout=4 * TIMEOUT)
        assert s.wait(timeout=TIMEOUT) == 0  # no file "cmd" here: straight to exit 0
    finally:
        s.close()
    (ck,) = sorted(ckdir.glob("cpt.*"))
    spec = {"base": {"checkpoint": str(ck)},
            "grid": {"param.cmd": list(COMMANDS)},
            "collect": {"console": {"out": r"(?s)OUT-BEGIN\r?\n(.*?)\r?\nOUT-END"},
                        "files": ["out"]},
            "limits": {"timeout": 4 * TIMEOUT}}
    df = kvmfw.sweep.run(spec, out=tmp_path / "sweep", workers=os.cpu_count() or 1,
                         progress=False)
    assert len(df) == len(COMMANDS)
    for _, row in df.iterrows():
        want = COMMANDS[row["param.cmd"]]
        assert row["status"] == "ok" and row["exit_status"] == 0, \
            (row["error"], row["reason"], row["status"])
        assert row["console.out"].strip() == want, row.to_dict()
        assert row["file.out"].strip() == want, row.to_dict()
