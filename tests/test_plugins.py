"""Plugin discovery through entry points (stevedore) and hook calling (pluggy)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from kvmtest import PIO, needs_kvm
from realmode_arch import RealModeArch

from kvmfw import hookimpl
from kvmfw.errors import (
    ArchNotFoundError,
    PluginApiMismatchError,
    PluginHookError,
    PluginLoadError,
)
from kvmfw.machine import Machine, MachineConfig
from kvmfw.plugins import BoundHooks, list_plugins, load_arch, make_plugin_manager


def _install_fake_dist(root: Path, dist: str, entry_points: str, modules: dict[str, str]) -> None:
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for name, code in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(code))


@pytest.fixture
def fake_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _install_fake_dist(tmp_path, "kvmfw-fake", """
        [kvmfw.arch]
        brokenarch = fake_broken:plugin
        oldarch = fake_old
        [kvmfw.devices]
        brokendev = fake_broken:Device
        gooddev = fake_good:GoodDevice
        """, {
        "fake_broken": "raise ImportError('needs libfoo.so.1, which is not installed')\n",
        "fake_old": "KVMFW_PLUGIN_API = (0, 9)\n",
        "fake_good": """
            from kvmfw.device import Device
            KVMFW_PLUGIN_API = (1, 0)
            class GoodDevice(Device):
                name = "gooddev"
            """,
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_plugin_that_raises_at_import_is_listed_as_failed(fake_plugins: Path) -> None:
    infos = {(i.group, i.name): i for i in list_plugins()}
    broken = infos[("kvmfw.devices", "brokendev")]
    assert broken.status == "failed"
    assert "ImportError: needs libfoo.so.1" in broken.error
    assert broken.package == "kvmfw-fake" and broken.version == "0.1"
    good = infos[("kvmfw.devices", "gooddev")]
    assert good.status == "loaded" and good.api == "1.0"
    old = infos[("kvmfw.arch", "oldarch")]
    assert old.status == "failed" and "plugin API 0.9" in old.error


def test_loading_a_broken_arch_plugin_names_the_cause(fake_plugins: Path) -> None:
    with pytest.raises(PluginLoadError, match="brokenarch.*libfoo"):
        load_arch("brokenarch")


def test_an_api_mismatch_is_refused(fake_plugins: Path) -> None:
    with pytest.raises(PluginApiMismatchError, match="install a matching version"):
        load_arch("oldarch")


def test_a_missing_arch_lists_what_is_installed(fake_plugins: Path) -> None:
    with pytest.raises(ArchNotFoundError, match="no architecture plugin 'riscv'.*installed: "):
        load_arch("riscv")


def test_list_plugins_cli_json_shows_failures(fake_plugins: Path) -> None:
    env_path = str(fake_plugins)
    out = subprocess.run([sys.executable, "-m", "kvmfw.cli", "list-plugins", "--json"],
                         capture_output=True, text=True, check=True, cwd="/",
                         env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin",
                              "XDG_CACHE_HOME": str(fake_plugins / "cache2")})
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["brokendev"]["status"] == "failed"
    assert "libfoo" in rows["brokendev"]["error"]
    strict = subprocess.run([sys.executable, "-m", "kvmfw.cli", "list-plugins", "--strict"],
                            capture_output=True, text=True, cwd="/",
                            env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin",
                                 "XDG_CACHE_HOME": str(fake_plugins / "cache3")})
    assert strict.returncode == 4
    assert "brokendev (kvmfw.devices) failed: ImportError" in strict.stdout


class _Partial:
    @hookimpl
    def handle_exit_io(self, io):  # a subset of the spec's arguments
        return ("io", io)

    @hookimpl
    def pre_run(self, cpu):
        return None


class _Second:
    @hookimpl
    def handle_exit_io(self, cpu, io):
        return None  # not mine


def test_bound_hooks_adapt_argument_subsets_and_keep_firstresult_order() -> None:
    pm = make_plugin_manager()
    pm.register(_Partial(), name="a")
    pm.register(_Second(), name="b")  # registered last: asked first
    hooks = BoundHooks(pm)
    fn = hooks.bind("handle_exit_io")
    assert fn is not None and fn("cpu", "io-exit") == ("io", "io-exit")
    assert hooks.bind("post_run") is None  # nobody implements it: no call at all
    assert hooks.call("handle_exit_io", cpu=1, io=2) == ("io", 2)


@needs_kvm
def test_a_plugin_that_raises_in_a_cold_hook_is_named() -> None:
    class Exploding(RealModeArch):
        @hookimpl
        def vcpu_init(self, cpu):
            raise RuntimeError("CPUID table corrupt")

    with pytest.raises(PluginHookError, match="raised in hook vcpu_init: RuntimeError: CPUID"):
        Machine(MachineConfig(memory=0x10000), arch_plugin=Exploding(PIO),
                arch_name="exploding")


@needs_kvm
def test_a_plugin_with_a_misspelt_hook_is_refused() -> None:
    from kvmfw.errors import PluginError

    class Misspelt(RealModeArch):
        @hookimpl
        def update_kvm_stat(self, cpu):
            pass

    with pytest.raises(PluginError, match="does not match the hook contract"):
        Machine(MachineConfig(memory=0x10000), arch_plugin=Misspelt(PIO), arch_name="x")


def test_hook_discovery_follows_attribute_lookup() -> None:
    """The manager reads a plugin instance's hooks from its class once (what pluggy would
    find): the definition lookup finds first counts, and what an instance holds itself is
    still pluggy's to judge."""

    class Base:
        @hookimpl
        def pre_run(self, cpu: object) -> None:
            pass

        @hookimpl(specname="post_run")
        def after(self, cpu: object, exit_reason: int) -> None:
            pass

        @hookimpl
        @staticmethod
        def machine_created(machine: object) -> None:
            pass

    class Hidden(Base):
        def pre_run(self, cpu: object) -> None:  # no marker: hides the hook
            pass

    class Slotted:
        __slots__ = ("pre_run",)

    pm = make_plugin_manager()
    base, hidden = Base(), Hidden()
    pm.register(base, name="base")
    pm.register(hidden, name="hidden")
    assert [i.plugin for i in pm.hook.pre_run.get_hookimpls()] == [base]
    assert {i.plugin for i in pm.hook.post_run.get_hookimpls()} == {base, hidden}
    assert {i.plugin for i in pm.hook.machine_created.get_hookimpls()} == {base, hidden}

    own = Slotted()
    own.pre_run = hookimpl(lambda cpu: None)  # a hook held by the instance (a slot)
    pm.register(own, name="own")
    assert own in [i.plugin for i in pm.hook.pre_run.get_hookimpls()]
