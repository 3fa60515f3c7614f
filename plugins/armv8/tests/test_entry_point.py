"""The plugin is found through the ``kvmfw.arch`` entry point and matches the hook contract."""

from __future__ import annotations

import importlib.metadata

import pluggy
import pytest

from kvmfw import hookspecs
from kvmfw.plugins import load_arch


def _installed() -> bool:
    try:
        importlib.metadata.distribution("kvmfw-armv8")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _installed(), reason="kvmfw-armv8 is not installed (pip install "
                    "./plugins/armv8): entry points need an installed distribution")
def test_entry_point_loads_the_plugin_module() -> None:
    from kvmfw_armv8 import plugin

    name, obj = load_arch("armv8")
    assert (name, obj) == ("armv8", plugin)


def test_plugin_matches_the_hookspecs() -> None:
    from kvmfw_armv8 import KVMFW_PLUGIN_API, plugin

    assert KVMFW_PLUGIN_API == hookspecs.PLUGIN_API
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(plugin, name="arch:armv8")
    pm.check_pending()  # every hookimpl has a spec with matching argument names
    assert pm.hook.arch_name() == "armv8"
