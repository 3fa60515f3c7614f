"""tox's inline plugin for kvmfw: say plainly which Python of the README's matrix a run is
about to skip, and how to get it (tox.ini skips a missing interpreter; .ci/run does not);
and note when the run started (``KVMFW_TOX_STARTED``, seconds since the epoch), so the
nested x86 environment, last in the list, fits its time budget in what the run has left."""

from __future__ import annotations

import configparser
import os
import shutil
import sys
import time
from pathlib import Path

from tox.config.sets import EnvConfigSet
from tox.plugin import impl
from tox.session.state import State

_INI = configparser.ConfigParser(interpolation=None)
_INI.read(Path(__file__).with_name("tox.ini"))
os.environ.setdefault("KVMFW_TOX_STARTED", str(int(time.time())))


@impl
def tox_add_env_config(env_conf: EnvConfigSet, state: State) -> None:
    section = f"testenv:{env_conf.name}"
    base = _INI.get(section, "basepython", fallback="") if _INI.has_section(section) else ""
    if not base.startswith("python3.") or shutil.which(base):
        return
    version = base.removeprefix("python")
    print(f"kvmfw: {base} is not on PATH, so tox will SKIP environment {env_conf.name} and "
          f"Python {version} goes untested (unless tox-uv finds a uv-managed {version}). "
          f"Get it: pyenv install {version} and put $(pyenv root)/versions/{version}.*/bin on "
          f"PATH (as .ci/run does), or your distribution's python{version}; .ci/run fails "
          "instead of skipping.", file=sys.stderr)
