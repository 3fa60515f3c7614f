"""Setuptools entry for the build backend; all metadata is in pyproject.toml.

Build output (and the egg-info) goes to a temporary directory, not into the source tree,
where a stale ``build/lib`` copy of a deleted module would end up in the next wheel.
"""

import atexit
import shutil
import tempfile

from setuptools import setup

_build = tempfile.mkdtemp(prefix="kvmfw-build-")
atexit.register(shutil.rmtree, _build, True)

options = {"build": {"build_base": _build}, "egg_info": {"egg_base": _build}}
setup(options=options)
