"""Builds the x86 KVM ABI module (cffi API mode); all metadata is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["kvmfw_x86/_build.py:ffibuilder"])
