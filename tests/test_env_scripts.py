"""The nested environments' shell scripts parse.

They run only inside the nested machines (minutes to boot), so a syntax error in a branch
those runs do not take (``guest-run.sh``'s benchmark staging, a retry path) would show up
only there; the shell's own ``-n`` check catches it here in milliseconds.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*ROOT.glob("envs/*/*.sh"), *ROOT.glob("plugins/*/env/*.sh")])


def test_scripts_found() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"run.sh", "guest-run.sh", "run-arm64-kvm.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_parses(script: Path) -> None:
    first = script.read_text().splitlines()[0]
    shell = "bash" if first.endswith("bash") else "sh"  # /bin/sh and busybox sh: POSIX
    exe = shutil.which(shell)
    if exe is None:
        pytest.skip(f"no {shell} on this machine to check {script.name} with")
    r = subprocess.run([exe, "-n", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{script}: {r.stderr.strip()}"
