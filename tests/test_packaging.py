"""Packaging: metadata of the core and every plugin, the C modules on strict compilers,
``kvmfw --version``, and a source tree that builds leave clean.

The wheels themselves are built, installed into a fresh venv and tested by ``tox -e wheels``
(``.ci/wheels``); these checks are the fast part that runs with every test run.
"""

from __future__ import annotations

import importlib.util
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kvmfw": ROOT, "kvmfw-x86": ROOT / "plugins/x86",
            "kvmfw-devices": ROOT / "plugins/devices", "kvmfw-armv8": ROOT / "plugins/armv8"}
CFFI_BUILDERS = [ROOT / "kvmfw/abi/_build.py", ROOT / "plugins/x86/kvmfw_x86/_build.py"]

pytestmark = pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(),
                                reason="needs the source tree (run from a checkout)")


def project(name: str) -> dict:
    return tomllib.loads((PACKAGES[name] / "pyproject.toml").read_text())


@pytest.mark.parametrize("name", PACKAGES)
def test_metadata(name: str) -> None:
    data = project(name)
    proj = data["project"]
    assert proj["name"] == name
    # an SPDX string: the license table is deprecated (setuptools: an error from 2027-02-18)
    assert proj["license"] == "BSD-3-Clause"
    assert any(r.startswith("setuptools>=77") for r in data["build-system"]["requires"])
    assert "wheel" not in data["build-system"]["requires"]  # setuptools provides it
    assert (PACKAGES[name] / proj["readme"]).is_file()  # the sdist and PyPI page have one
    assert proj["version"] == project("kvmfw")["project"]["version"]
    assert proj["requires-python"] == ">=3.11"
    pys = sorted(c.rsplit(":: ", 1)[1] for c in proj["classifiers"]
                 if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    assert pys == ["3.11", "3.12", "3.13"]
    if name != "kvmfw":
        # a plugin needs a core of the same minor series (the plugin API it was written for)
        assert "kvmfw>=0.1,<0.2" in proj["dependencies"]


@pytest.mark.parametrize(("name", "data_dir"), [("kvmfw-x86", "kvmfw_x86/guests"),
                                                ("kvmfw-devices", "kvmfw_devices/guest")])
def test_data_directories_are_packages(name: str, data_dir: str) -> None:
    """A data-only directory must be listed as a package, or setuptools warns (deprecated
    and to be dropped) and a future setuptools leaves it out of the wheel."""
    tool = project(name)["tool"]["setuptools"]
    package = data_dir.replace("/", ".")
    assert package in tool["packages"]
    patterns = tool["package-data"][package]
    files = [p for p in (PACKAGES[name] / data_dir).iterdir() if p.is_file()]
    assert files and all(any(p.match(g) for g in patterns) for p in files
                         if p.suffix not in (".py", ".pyc", ".o"))


def test_core_finds_every_subpackage() -> None:
    find = project("kvmfw")["tool"]["setuptools"]["packages"]["find"]
    assert find["include"] == ["kvmfw", "kvmfw.*"]


def _builder(path: Path):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(f"_b_{path.parent.name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ffibuilder


@pytest.mark.parametrize("builder", CFFI_BUILDERS, ids=lambda p: p.parent.name)
def test_cffi_module_compiles_with_strict_pointer_types(tmp_path: Path, builder: Path) -> None:
    """GCC 14 makes incompatible pointer types an error; cffi's generated field checks take
    the address of every array field, so a declared element type must be the header's."""
    if shutil.which("gcc") is None:
        pytest.skip("no gcc on this host")
    if builder.parent.name == "kvmfw_x86" and platform.machine() != "x86_64":
        pytest.skip("the x86 module needs the x86 <asm/kvm.h>")
    c_file = tmp_path / "module.c"
    _builder(builder).emit_c_code(str(c_file))
    r = subprocess.run(["gcc", "-fsyntax-only", "-Wall", "-Werror=incompatible-pointer-types",
                        "-Werror", f"-I{sysconfig.get_paths()['include']}", str(c_file)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_version_names_every_plugin() -> None:
    r = subprocess.run([sys.executable, "-m", "kvmfw.cli", "--version"], capture_output=True,
                       text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    import importlib.metadata as md

    assert r.stdout.startswith(f"kvmfw {md.version('kvmfw')} ")
    for dist in ("kvmfw-x86", "kvmfw-devices"):
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            continue
        assert f"  {dist} {version} (" in r.stdout


@pytest.mark.parametrize("leftover", [
    "build/lib/x.py", "dist/kvmfw-0.1.0.tar.gz", "kvmfw.egg-info/PKG-INFO",
    "plugins/x86/build/lib/x.py", "plugins/x86/kvmfw_x86.egg-info/PKG-INFO",
    "plugins/devices/build/x", "plugins/armv8/build/x", "plugins/armv8/kvmfw_armv8.egg-info/x",
    "kvmfw/abi/_kvm.c", "kvmfw/abi/_kvm.o", "kvmfw/abi/_kvm.abi3.so",
    "plugins/x86/kvmfw_x86/_x86.c", "plugins/x86/kvmfw_x86/_x86.o",
    "plugins/x86/kvmfw_x86/_x86.abi3.so", "docs/_build/html/index.html", ".tox/x",
])
def test_build_leftovers_are_ignored(leftover: str) -> None:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "check-ignore", "-q", "--no-index", leftover], cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0, f"{leftover} would show up as untracked after a build"


def test_readme_python_versions_are_the_matrix() -> None:
    """The README's test command runs the Pythons it names, and CI refuses to skip one."""
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"the core on Python (3\.\d+)[–-](3\.\d+)", readme)
    assert m, "README names the Python versions of its test command"
    lo, hi = (int(v.split(".")[1]) for v in m.groups())
    tox = (ROOT / "tox.ini").read_text()
    envlist = re.search(r"^envlist\s*=\s*(.+)$", tox, re.M)
    assert envlist
    envs = [e.strip() for e in envlist.group(1).split(",")]
    for minor in range(lo, hi + 1):
        env = f"py3{minor}"
        assert env in envs or (minor == 11 and "core" in envs), env
    ci = (ROOT / ".ci/run").read_text()
    assert "--skip-missing-interpreters false" in ci or "skip_missing_interpreters=false" in ci


@pytest.mark.parametrize("name", ["kvmfw-devices", "kvmfw-armv8"])
def test_building_leaves_nothing_in_the_source_tree(tmp_path: Path, name: str) -> None:
    """pip builds in the source tree; a build/ left there would put a stale copy of a
    deleted module into the next wheel. (The pure-Python plugins: no compiler needed.)"""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("needs setuptools >= 77 (the SPDX license string)")
    src = tmp_path / "src"
    shutil.copytree(PACKAGES[name], src, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(tmp_path / "out"), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((tmp_path / "out").glob("*.whl"))
    left = sorted(p.name for p in src.iterdir() if p.name == "build" or p.suffix == ".egg-info")
    assert not left, f"the build left {left} in the source tree"


# --- the nested environments' host side (envs/host.sh) --------------------------------------

ENV_SCRIPTS = [ROOT / "envs/host.sh", ROOT / "envs/x86-linux-kvm/run.sh",
               ROOT / "plugins/armv8/env/run-arm64-kvm.sh"]


def test_no_mirror_host_in_the_repository() -> None:
    """The nested environments take their Debian mirror from the host's apt configuration."""
    for script in ENV_SCRIPTS:
        for n, line in enumerate(script.read_text().splitlines(), 1):
            code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
            assert not re.search(r"https?://|deb\.debian\.org|ftp\.\w+\.debian", code), \
                f"{script.relative_to(ROOT)}:{n}: {line.strip()}"
    for script in ENV_SCRIPTS[1:]:
        text = script.read_text()
        assert 'host_mirror "$SUITE"' in text and "python3 -m pip download" not in text


def _host_sh(cmd: str, env_path: str | None = None, **env: str) -> subprocess.CompletedProcess:
    import os

    full = {**os.environ, **env}
    if env_path:
        full["PATH"] = f"{env_path}:{full['PATH']}"
    return subprocess.run(["bash", "-c", f'. "{ROOT}/envs/host.sh"; {cmd}'], capture_output=True,
                          text=True, timeout=600, env=full)


def test_host_mirror_follows_apt(tmp_path: Path) -> None:
    r = _host_sh("host_mirror bookworm", KVMFW_DEBIAN_MIRROR="http://mirror.example/debian")
    assert r.stdout.strip() == "http://mirror.example/debian"
    if shutil.which("apt-get") is None:
        pytest.skip("no apt on this host")
    uris = subprocess.run(["apt-get", "indextargets", "--format", "$(REPO_URI)"],
                          capture_output=True, text=True, timeout=120).stdout.split()
    if not uris:
        pytest.skip("apt knows no repository here")
    r = _host_sh("host_mirror bookworm")
    assert r.stdout.strip() in uris


def test_host_pip_without_pip_in_python3(tmp_path: Path) -> None:
    """A tox-uv venv has no pip: host_pip makes one once in the cache instead of failing
    ("python3 -m pip is needed on the host")."""
    venv = tmp_path / "nopip"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=300)
    bindir = str(venv / "bin")
    assert _host_sh("python3 -m pip --version", bindir).returncode != 0
    r = _host_sh('host_pip "$CACHE" && "${HOST_PIP[@]}" --version', bindir,
                 CACHE=str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert str(tmp_path / "cache" / "host-pip") in r.stdout
