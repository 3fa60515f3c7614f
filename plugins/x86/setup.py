"""Setuptools entry for the build backend; all metadata is in pyproject.toml.

Builds the compiled KVM ABI module (cffi API mode) against CPython's limited API, so one
``cp311-abi3`` wheel serves every supported Python (3.11 on).

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
options["bdist_wheel"] = {"py_limited_api": "cp311"}
setup(cffi_modules=["kvmfw_x86/_build.py:ffibuilder"], options=options)
