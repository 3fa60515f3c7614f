"""What kvmfw sees once this package is installed: its devices and board by name."""

from __future__ import annotations

from kvmfw.plugins import board_devices, list_plugins


def test_installed_plugins_are_listed_and_loaded() -> None:
    mine = {(p.group, p.name): p for p in list_plugins() if p.package == "kvmfw-plugin-template"}
    assert set(mine) == {("kvmfw.devices", "scratch"), ("kvmfw.devices", "exit-counter"),
                         ("kvmfw.boards", "template-pc")}
    assert all(p.status == "loaded" for p in mine.values()), mine


def test_the_board_builds_from_specs() -> None:
    assert "scratch,port=0x520,irq=10" in board_devices("template-pc", None)
