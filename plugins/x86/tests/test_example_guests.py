"""The example guests in examples/guests run as the README says (real KVM), the committed
images are what their sources build, and the README's Python example runs as written."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from kvmfw import Machine, RunEnd

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples" / "guests"
README = ROOT / "README.md"

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                       reason="needs a working /dev/kvm"),
    pytest.mark.skipif(not EXAMPLES.is_dir(), reason="not run from a kvmfw source tree"),
]

# (README command, exit status, text the guest prints)
RUNS = [
    ("kvmfw run --kernel examples/guests/hello.elf", 0, "Hello, world!"),
    ("kvmfw run --kernel examples/guests/debug-exit.elf --device debug-exit", 67,
     "kvmfw exits with status 67"),
    ("kvmfw run --kernel examples/guests/debug-exit.elf --memory 64M --device debug-exit "
     "--timeout 10", 67, "kvmfw exits with status 67"),
    ("kvmfw run --kernel examples/guests/pseudo-ops.elf --stats stats.txt", 3,
     "exit(3): kvmfw ends the run with status 3"),
    ("kvmfw run --kernel examples/guests/virtio-blk.elf "
     "--device virtio-blk,file=examples/guests/disk.img,readonly=on", 0,
     "sector 0 of the disk says: Hello from sector 0 of disk.img!"),
    ("kvmfw run --kernel examples/guests/smp.elf --cpus 2", 0,
     "application processor up, APIC id 1"),
    ("kvmfw run --kernel examples/guests/hello16.bin --load-addr 0x7c00 "
     "--option irqchip=userspace --cpus 2", 0, "Hello from real mode"),
    ("kvmfw run --kernel examples/guests/hello16.bin --load-addr 0x7c00 "
     "--option irqchip=userspace", 0, "Hello from real mode"),
]


_NOT_RUN = {"kvmfw run --kernel examples/guests/debug-exit.elf --device debug-exit -s -S &"}
"""README commands not run here (waiting for gdb: tests/test_gdb* cover the stub)."""


def _kvmfw() -> str:
    exe = shutil.which("kvmfw") or str(Path(sys.executable).parent / "kvmfw")
    if not Path(exe).exists():
        pytest.skip("the kvmfw command is not installed")
    return exe


def test_the_readme_names_every_example_command() -> None:
    text = README.read_text()
    for cmd, _, _ in RUNS:
        assert cmd in text, f"README does not show: {cmd}"
    # and every example command the README shows is one of those (so each is run here)
    shown = {re.sub(r"\s+#.*", "", line).strip()
             for line in text.splitlines() if "examples/guests/" in line
             and line.startswith("kvmfw run")}
    assert shown <= {c for c, _, _ in RUNS} | _NOT_RUN, shown - {c for c, _, _ in RUNS}


@pytest.mark.parametrize(("cmd", "status", "printed"), RUNS, ids=[r[0].split()[3] for r in RUNS])
def test_example_runs_as_the_readme_says(cmd: str, status: int, printed: str,
                                        tmp_path: Path) -> None:
    argv = shlex.split(cmd)
    argv[0] = _kvmfw()
    # paths in the command are relative to the source tree; stats.txt lands in tmp_path
    argv = [str(ROOT / a) if a.startswith("examples/") else a for a in argv]
    argv = [a.replace("file=examples/", f"file={ROOT}/examples/") for a in argv]
    argv = [str(tmp_path / a) if a == "stats.txt" else a for a in argv]
    disk = (EXAMPLES / "disk.img").read_bytes()
    if "--timeout" not in argv:
        argv += ["--timeout", "60"]
    r = subprocess.run(argv, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, cwd=tmp_path, timeout=120, check=False)
    assert r.returncode == status, r.stdout + r.stderr
    assert printed in r.stdout
    assert (EXAMPLES / "disk.img").read_bytes() == disk  # readonly: the example is unchanged
    if "--stats" in argv:
        assert "system.work.work_items_ended" in (tmp_path / "stats.txt").read_text()


def test_example_from_python_with_until() -> None:
    with Machine(arch="x86", memory="64M", devices=["debug-exit"]) as m:
        m.load(EXAMPLES / "debug-exit.elf")
        r = m.run(timeout=60)
        assert (r.end, r.status) == (RunEnd.GUEST, 67)
        assert "Leaving through debug-exit" in m.console.text
    with Machine(arch="x86", memory="64M") as m:
        m.load(EXAMPLES / "pseudo-ops.elf")
        r = m.run(timeout=60, until="work_end(1)")
        assert r.end is RunEnd.UNTIL and "exit(3)" not in r.console


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("objcopy") is None,
                    reason="needs GNU as, ld and objcopy (binutils)")
def test_committed_images_are_what_the_sources_build(tmp_path: Path) -> None:
    work = tmp_path / "guests"
    shutil.copytree(EXAMPLES, work)
    for f in [*work.glob("*.elf"), *work.glob("*.bin")]:
        f.unlink()
    (work / "disk.img").unlink()
    subprocess.run(["sh", str(work / "build.sh")], check=True, capture_output=True)
    for f in sorted(EXAMPLES.glob("*.elf")) + [EXAMPLES / "hello16.bin", EXAMPLES / "disk.img"]:
        # ELF layout details differ between binutils versions: compare what is loaded
        assert _loaded(work / f.name) == _loaded(f), f"{f.name} is stale: run build.sh"


def _loaded(path: Path) -> bytes:
    if path.suffix != ".elf":
        return path.read_bytes()
    with tempfile.TemporaryDirectory() as d:  # (never write into the source tree)
        out = Path(d) / "loaded.bin"
        subprocess.run(["objcopy", "-O", "binary", str(path), str(out)], check=True)
        return out.read_bytes()


def test_readme_python_example_runs_as_written(tmp_path: Path) -> None:
    """The README's first Python block, run from the source tree as a user would."""
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no Python example"
    assert "hooks.call" not in text
    # -I: the installed kvmfw, not the source tree's (cwd would come first on sys.path, and
    # a wheel-installed test run has no compiled module in the tree)
    r = subprocess.run([sys.executable, "-I", "-c", blocks[0]], capture_output=True,
                       text=True, cwd=ROOT, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Hello, world!" in r.stdout
