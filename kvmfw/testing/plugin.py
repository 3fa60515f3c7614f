"""kvmfw's pytest plugin (entry point ``pytest11``: active wherever kvmfw is installed).

Fixtures (all function-scoped; machines are closed at teardown):

``kvmfw_kvm``
    Skips the test, with the reason, unless ``/dev/kvm`` can run guests.
``kvmfw_machine_factory``
    ``make(**kw) -> Machine``: keywords as :class:`kvmfw.Machine`'s, default ``memory="64M"``
    and no default board (``default_devices=True`` for it). Skips without KVM.
``kvmfw_machine``
    One such machine for the host's architecture.
``kvmfw_assemble``
    ``assemble(source, bits=32, name="guest") -> Path``: GNU as/ld into the test's
    ``tmp_path`` (:func:`kvmfw.testing.assemble`). Skips without binutils.
``kvmfw_run_guest``
    ``run(source_or_path, devices=[...], **kw) -> GuestRun``: assembles source text (or
    takes an image path), boots it and returns result, console, exit counts and the port
    and MMIO trace (:func:`kvmfw.testing.run_guest`). Skips without KVM or binutils.
``kvmfw_device``
    ``make(DeviceClass or "name,key=value", **params) -> DeviceHarness``: a device at
    register level, no KVM (:class:`kvmfw.testing.DeviceHarness`).

The marker ``kvm`` is registered: ``pytest -m "not kvm"`` deselects tests that need KVM.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmfw.errors import ArchNotFoundError
from kvmfw.machine import Machine
from kvmfw.testing import (
    DeviceHarness,
    GuestRun,
    assemble,
    kvm_usable,
    run_guest,
    toolchain_missing,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm: needs a working /dev/kvm")


_kvm: list[tuple[bool, str]] = []


def _require_kvm() -> None:
    if not _kvm:
        _kvm.append(kvm_usable())
    ok, why = _kvm[0]
    if not ok:
        pytest.skip(why)


def _require_toolchain(arch: str | None = None) -> None:
    why = toolchain_missing(arch)
    if why:
        pytest.skip(why)


@pytest.fixture
def kvmfw_kvm() -> None:
    """Skip unless /dev/kvm is usable."""
    _require_kvm()


@pytest.fixture
def kvmfw_machine_factory() -> Iterator[Callable[..., Machine]]:
    _require_kvm()
    made: list[Machine] = []

    def make(**kw: Any) -> Machine:
        kw.setdefault("memory", "64M")
        kw.setdefault("default_devices", False)
        try:
            m = Machine(**kw)
        except ArchNotFoundError as exc:
            pytest.skip(str(exc))
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


@pytest.fixture
def kvmfw_machine(kvmfw_machine_factory: Callable[..., Machine]) -> Machine:
    return kvmfw_machine_factory()


@pytest.fixture
def kvmfw_assemble(tmp_path: Path) -> Callable[..., Path]:
    _require_toolchain()
    n = [0]

    def build(source: str, **kw: Any) -> Path:
        n[0] += 1
        kw.setdefault("name", f"guest{n[0]}")
        return assemble(source, out_dir=tmp_path, **kw)

    return build


@pytest.fixture
def kvmfw_run_guest(tmp_path: Path) -> Callable[..., GuestRun]:
    _require_kvm()

    def run(guest: str | os.PathLike[str], *, bits: int = 32, **kw: Any) -> GuestRun:
        if isinstance(guest, str) and "\n" in guest:  # source text, not a path
            _require_toolchain()
            image = assemble(guest, out_dir=tmp_path, bits=bits)
            if bits == 16:
                kw.setdefault("load", {}).setdefault("load_addr", 0x7C00)
        else:
            image = Path(guest)
        return run_guest(image, **kw)

    return run


@pytest.fixture
def kvmfw_device() -> Iterator[Callable[..., DeviceHarness]]:
    made: list[DeviceHarness] = []

    def make(device: Any, **kw: Any) -> DeviceHarness:
        h = DeviceHarness(device, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()
