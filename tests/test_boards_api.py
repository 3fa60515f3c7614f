"""Boards come from ``kvmfw.boards`` entry points any package can publish (issue 14 item 7),
and no plugin package imports another."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest
from kvmtest import needs_kvm
from realmode_arch import RealModeArch

from kvmfw import Machine
from kvmfw.errors import ConfigError, PluginError
from kvmfw.plugins import BOARD_GROUP, GROUPS, board_devices, board_names

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_boards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    info = tmp_path / "kvmfw_board_fake-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvmfw-board-fake\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [kvmfw.boards]
        lab-board = fake_board:lab
        realmode-test = fake_board:lab
        junk-board = fake_board:junk
        [kvmfw.devices]
        lab-dev = fake_board:LabDevice
        """))
    (tmp_path / "fake_board.py").write_text(textwrap.dedent("""
        from kvmfw.device import Device, Range
        class LabDevice(Device):
            name = "lab-dev"
            def ranges(self):
                return [Range("pio", 0x80, 1)]
        def lab(machine):
            return ["lab-dev"]
        def junk(machine):
            return "lab-dev"
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_boards_are_a_plugin_group(fake_boards: Path) -> None:
    assert BOARD_GROUP in GROUPS
    assert {"lab-board", "junk-board"} <= set(board_names())
    assert board_devices("lab-board", None) == ["lab-dev"]


def test_an_unknown_or_broken_board_is_a_typed_error(fake_boards: Path) -> None:
    with pytest.raises(ConfigError, match="no board 'nope'.*lab-board"):
        board_devices("nope", None)
    assert board_devices("nope", None, missing_ok=True) == []
    with pytest.raises(PluginError, match="not a list of device specs"):
        board_devices("junk-board", None)


@needs_kvm
def test_the_board_option_picks_a_board_from_any_package(fake_boards: Path) -> None:
    with Machine(arch_plugin=RealModeArch(), memory="64K",
                 options={"board": "lab-board"}) as m:
        assert [d.name for d in m.devices] == ["lab-dev"]
    with Machine(arch_plugin=RealModeArch(), memory="64K", default_devices=False,
                 options={"board": "lab-board"}) as m:
        assert m.devices == []  # no default board at all


@needs_kvm
def test_an_arch_without_a_board_hook_gets_the_board_named_after_it(fake_boards: Path) -> None:
    # RealModeArch implements no default_devices: the board "realmode-test" is used
    with Machine(arch_plugin=RealModeArch(), arch_name="realmode-test", memory="64K") as m:
        assert [d.name for d in m.devices] == ["lab-dev"]
        assert m.default_board() == ["lab-dev"]


def test_plugins_installed_after_a_first_scan_are_seen(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmfw.plugins import DeviceRegistry

    before = DeviceRegistry.from_entry_points().names()  # stevedore caches this group
    assert "late-dev" not in before
    info = tmp_path / "kvmfw_late-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvmfw-late\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kvmfw.devices]\nlate-dev = kvmfw.device:Device\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "late-dev" in DeviceRegistry.from_entry_points().names()


def _imports(package: Path) -> set[str]:
    names: set[str] = set()
    for f in package.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.partition(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.partition(".")[0])
    return names


def test_no_plugin_imports_another_and_the_core_imports_none() -> None:
    plugins = {"kvmfw_x86": ROOT / "plugins/x86/kvmfw_x86",
               "kvmfw_devices": ROOT / "plugins/devices/kvmfw_devices",
               "kvmfw_armv8": ROOT / "plugins/armv8/kvmfw_armv8"}
    for name, path in plugins.items():
        others = set(plugins) - {name}
        assert not (_imports(path) & others), f"{name} imports {_imports(path) & others}"
    assert not (_imports(ROOT / "kvmfw") & set(plugins))
