"""Builds the compiled KVM ABI module (cffi API mode); all metadata is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["kvmfw/abi/_build.py:ffibuilder"])
