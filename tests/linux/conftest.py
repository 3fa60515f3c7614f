"""Linux guests on a real KVM: these tests run only in the nested x86 KVM environment
(envs/x86-linux-kvm/run.sh tests/linux) and are skipped elsewhere, naming the reason."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import linuxguest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "linux: boots a real Linux guest (nested x86 KVM environment only)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    why = linuxguest.why_unavailable()
    here = Path(__file__).parent
    for item in items:
        # (test_env_watchdog.py tests the environment's own bounds, on any host)
        if here in Path(item.fspath).parents and Path(item.fspath).name == "test_linux_boot.py":
            item.add_marker(pytest.mark.linux)
            if why:
                item.add_marker(pytest.mark.skip(reason=why))
