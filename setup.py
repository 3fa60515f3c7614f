"""Builds the compiled KVM ABI module (cffi API mode); all metadata is in pyproject.toml.

cffi compiles against CPython's limited API, so one ``cp311-abi3`` wheel serves every
supported Python (3.11 on).
"""

from setuptools import setup

setup(cffi_modules=["kvmfw/abi/_build.py:ffibuilder"],
      options={"bdist_wheel": {"py_limited_api": "cp311"}})
