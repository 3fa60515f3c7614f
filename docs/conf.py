"""Sphinx configuration: Markdown pages (MyST), the hook and Python API reference from the
docstrings (autodoc), the CLI reference from the click commands themselves (sphinx-click)."""

from __future__ import annotations

import shutil
from pathlib import Path

import kvmfw
import kvmfw.cli.commands

project = "kvmfw"
author = "the kvmfw authors"
copyright = "the kvmfw authors"  # noqa: A001 (Sphinx's name)
release = version = kvmfw.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.graphviz",
    "sphinx_click",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "requirements.txt"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3


# Format sketches in ```json blocks carry comments and "..." (the checkpoint manifest);
# Pygments falls back to plain text for them, which is what they are.
suppress_warnings = ["misc.highlighting_failure"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True}

graphviz_output_format = "svg"
if shutil.which("dot") is None:
    raise RuntimeError("the docs need Graphviz's dot for the run-loop picture: "
                       "apt install graphviz")

html_theme = "alabaster"
html_title = f"kvmfw {release}"

# `kvmfw cpuid` and any other plugin command join the CLI as they do at run time
kvmfw.cli.commands._add_plugin_commands()


# The checkpoint format page (docs/checkpoint.md) is written with the checkpoint code; until
# it exists its toctree entry is left out, so the docs build with -W before and after.
HERE = Path(__file__).resolve().parent


def _toctree_of_present_pages(app, docname: str, source: list[str]) -> None:  # noqa: ANN001
    if docname == "index" and not (HERE / "checkpoint.md").exists():
        source[0] = source[0].replace("\ncheckpoint\n", "\n")


def setup(app):  # noqa: ANN001, ANN201
    app.connect("source-read", _toctree_of_present_pages)
