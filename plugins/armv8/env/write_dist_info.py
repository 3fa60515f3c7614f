"""Write ``*.dist-info`` (METADATA + entry_points.txt) for source trees, as an install would.

Used inside the arm64 test guest, which has no network and no pip: importlib.metadata (and
so stevedore) finds the entry points of the core and the plugins in ``SITE_DIR``.

    python3 write_dist_info.py SITE_DIR PROJECT_DIR...
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def write(site: Path, project: Path) -> None:
    """Write the dist-info of the project whose ``pyproject.toml`` is in ``project``."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    name, version = meta["name"], meta.get("version", "0")
    d = site / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir(parents=True, exist_ok=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, eps in meta.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in eps.items()]
    scripts = meta.get("scripts", {})
    if scripts:
        lines.append("[console_scripts]")
        lines += [f"{k} = {v}" for k, v in scripts.items()]
    (d / "entry_points.txt").write_text("\n".join(lines) + "\n")
    print(f"dist-info: {name} {version} ({sum(map(len, meta.get('entry-points', {}).values()))}"
          " entry points)")


def main(argv: list[str]) -> int:
    site = Path(argv[1])
    for p in argv[2:]:
        if (Path(p) / "pyproject.toml").exists():
            write(site, Path(p))
        else:
            print(f"dist-info: {p} has no pyproject.toml, skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
