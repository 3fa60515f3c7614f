"""A third-party device package is listed by ``kvmfw list-plugins`` like ours."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from third_party import make_third_party


def test_third_party_device_is_listed(tmp_path: Path) -> None:
    kvmfw = shutil.which("kvmfw")
    if kvmfw is None:
        pytest.skip("the kvmfw command is not on PATH")
    env = make_third_party(tmp_path)
    proc = subprocess.run([kvmfw, "list-plugins", "--json"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {(r["group"], r["name"]): r for r in json.loads(proc.stdout)}
    acme = rows[("kvmfw.devices", "acme-stopper")]
    assert (acme["package"], acme["version"], acme["status"]) == ("acme-devices", "1.0", "loaded")
    assert rows[("kvmfw.devices", "uart16550")]["package"] == "kvmfw-devices"
