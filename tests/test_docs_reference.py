"""The built documentation's reference is complete: every hook of ``kvmfw/hookspecs.py`` and
every option of every ``kvmfw`` command (plugin commands included) appears in it.

``tox -e docs`` builds the docs with -W and points ``KVMFW_DOCS_HTML`` at the result; run
alone, this test builds them itself (needs Sphinx: ``pip install -r docs/requirements.txt``).
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

import kvmfw.cli.commands
import kvmfw.hookspecs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built = os.environ.get("KVMFW_DOCS_HTML")
    if built:
        return Path(built)
    if not (DOCS / "conf.py").is_file():
        pytest.skip("needs the source tree's docs/")
    pytest.importorskip("sphinx", reason="Sphinx is not installed: pip install -r "
                        "docs/requirements.txt, or run tox -e docs")
    pytest.importorskip("sphinx_click", reason="sphinx-click is not installed")
    pytest.importorskip("myst_parser", reason="myst-parser is not installed")
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed (apt install graphviz)")
    out = tmp_path_factory.mktemp("docs")
    r = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b",
                        "html", "-d", str(out / "doctrees"), str(DOCS), str(out / "html")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return out / "html"


def hook_names() -> list[str]:
    return [name for name, obj in inspect.getmembers(kvmfw.hookspecs, inspect.isfunction)
            if hasattr(obj, f"{kvmfw.hookspecs.PROJECT}_spec")]


def cli_options() -> list[tuple[str, str]]:
    """(program, option string) for every option of every command, as sphinx-click names them."""
    kvmfw.cli.commands._add_plugin_commands()
    out: list[tuple[str, str]] = []

    def walk(cmd: click.Command, prog: str) -> None:
        for p in cmd.params:
            if isinstance(p, click.Option):
                out.extend((prog, o) for o in (*p.opts, *p.secondary_opts))
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, f"{prog}-{name}")

    walk(kvmfw.cli.commands.cli, "kvmfw")
    return out


def test_there_is_something_to_check() -> None:
    assert len(hook_names()) >= 30
    assert ("kvmfw-run", "--kernel") in cli_options()
    assert ("kvmfw-doctor", "--json") in cli_options()


def test_every_hook_is_in_the_reference(html: Path) -> None:
    text = (html / "hooks.html").read_text()
    missing = [h for h in hook_names() if f'id="kvmfw.hookspecs.{h}"' not in text]
    assert not missing, f"hooks missing from docs/hooks.md's reference: {missing}"


def test_every_cli_option_is_in_the_reference(html: Path) -> None:
    text = (html / "cli.html").read_text()
    missing = []
    for prog, opt in cli_options():
        anchor = f'id="cmdoption-{prog}-{opt.lstrip("-")}'.lower()
        if anchor not in text.lower() or f'<span class="pre">{opt}</span>' not in text:
            missing.append(f"{prog} {opt}")
    assert not missing, f"options missing from docs/cli.md's reference: {missing}"
    for command in kvmfw.cli.commands.cli.commands:
        assert f'id="kvmfw-{command}"' in text, command


@pytest.mark.parametrize("page", ["architecture", "hooks", "device-guide", "arch-guide", "cli",
                                  "python-api", "comparison", "host"])
def test_pages_are_built_and_linked(html: Path, page: str) -> None:
    assert (html / f"{page}.html").is_file()
    assert f'href="{page}.html"' in (html / "index.html").read_text()


def test_run_loop_picture(html: Path) -> None:
    text = (html / "architecture.html").read_text()
    images = list((html / "_images").glob("graphviz-*.svg"))
    assert images, "the Graphviz pictures were not rendered"
    svg = "".join(p.read_text() for p in images)
    for state in ("Idle", "Running", "RunningService", "RunningMMIOPending",
                  "RunningServiceCompletion"):
        assert f">{state}<" in svg, state
    assert "graphviz" in text
