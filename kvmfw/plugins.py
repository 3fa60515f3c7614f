"""Plugin discovery (stevedore) and calling (pluggy).

stevedore finds what is installed under the entry-point groups ``kvmfw.arch`` (one object
per architecture), ``kvmfw.devices`` (one :class:`~kvmfw.device.Device` class per
name) and ``kvmfw.boards`` (one callable per board: ``board(machine) -> [device spec,
...]``, so any package can contribute a board and no plugin imports another), and records
every plugin that fails to import instead of dying. pluggy calls hooks:
one :class:`pluggy.PluginManager` per machine, the arch plugin registered first, device
instances after it. :class:`BoundHooks` resolves the run-loop hooks once, so an exit costs
a plain function call, not pluggy's dispatch; the machine rebinds them whenever a device
registers (see :data:`DEVICE_HOOKS` for what a device may implement).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pluggy
from stevedore import DriverManager, ExtensionManager
from stevedore.exception import MultipleMatches, NoMatches

from kvmfw import hookspecs
from kvmfw.errors import (
    ArchNotFoundError,
    ConfigError,
    KvmfwError,
    PluginApiMismatchError,
    PluginError,
    PluginHookError,
    PluginLoadError,
)

log = logging.getLogger("kvmfw.plugins")

ARCH_GROUP = "kvmfw.arch"
DEVICE_GROUP = "kvmfw.devices"
BOARD_GROUP = "kvmfw.boards"
CLI_GROUP = "kvmfw.cli"
GROUPS = (ARCH_GROUP, DEVICE_GROUP, BOARD_GROUP, CLI_GROUP)
MAX_BOARD_DEVICES = 256
"""Device specs one board may return (a broken board must not build a machine forever)."""

DEVICE_HOOKS = frozenset({"pre_run", "post_run", "machine_created", "dump_state"})
"""The hooks a device instance may implement (observers; every implementation is called,
the arch's first, then devices in the order they were added). Every other hook belongs to
the architecture plugin alone: a device implementing one is refused when it is added."""

_HOST_ARCH = {"x86_64": "x86", "amd64": "x86", "i686": "x86", "aarch64": "armv8",
              "arm64": "armv8"}


def host_arch() -> str:
    """The arch plugin name for this host (``x86`` on x86_64, ``armv8`` on aarch64)."""
    m = platform.machine().lower()
    return _HOST_ARCH.get(m, m)


@dataclass
class PluginInfo:
    """One entry point as ``kvmfw list-plugins`` shows it."""

    name: str
    group: str
    target: str
    package: str
    version: str
    status: str  # "loaded" | "failed"
    api: str = ""
    error: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


_Fingerprint = tuple[tuple[str, int], ...]
_installed: tuple[_Fingerprint, dict[tuple[str, str], tuple[str, str, Any]]] | None = None


def _path_fingerprint() -> _Fingerprint:
    """sys.path with each directory's mtime: installing or removing a package creates or
    deletes a ``*.dist-info`` entry in a path directory, which changes its mtime."""
    out = []
    for p in sys.path:
        try:
            out.append((p, os.stat(p or ".").st_mtime_ns))
        except OSError:
            out.append((p, -1))
    return tuple(out)


def _installed_entry_points() -> dict[tuple[str, str], tuple[str, str, Any]]:
    """``{(group, name): (package, version, entry point)}`` for kvmfw's groups, from one
    pass over the installed distributions, cached until sys.path or a path directory
    changes (a full scan costs tens of milliseconds, once per machine otherwise)."""
    global _installed
    key = _path_fingerprint()
    if _installed is not None and _installed[0] == key:
        return _installed[1]
    found: dict[tuple[str, str], tuple[str, str, Any]] = {}
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group.startswith("kvmfw.") and (ep.group, ep.name) not in found:
                found[(ep.group, ep.name)] = (dist.metadata["Name"] or "?",
                                              dist.version or "?", ep)
    _installed = (key, found)
    return found


def entry_points(group: str) -> list[Any]:
    """The installed entry points of ``group`` (cached; see :func:`_installed_entry_points`)."""
    return [ep for (g, _), (_, _, ep) in _installed_entry_points().items() if g == group]


def _dist_of(group: str, name: str) -> tuple[str, str]:
    """(package, version) of the distribution that declares entry point ``group:name``."""
    pkg, ver, _ = _installed_entry_points().get((group, name), ("?", "?", None))
    return pkg, ver


def _api_of(obj: Any) -> tuple[int, int] | None:
    """The plugin API a plugin declares: on the object, its module, or its top package."""
    api = getattr(obj, "KVMFW_PLUGIN_API", None)
    mod = inspect.getmodule(obj)
    if api is None and mod is not None:
        api = getattr(mod, "KVMFW_PLUGIN_API", None)
        if api is None:
            top = sys.modules.get(mod.__name__.partition(".")[0])
            api = getattr(top, "KVMFW_PLUGIN_API", None)
    return tuple(api) if api is not None else None  # type: ignore[return-value]


def check_api(name: str, obj: Any) -> None:
    """Refuse a plugin written for another major version of the plugin API."""
    api = _api_of(obj)
    if api is not None and api[0] != hookspecs.PLUGIN_API[0]:
        raise PluginApiMismatchError(
            f"plugin {name!r} was written for kvmfw plugin API {api[0]}.{api[1]}, this core "
            f"provides {hookspecs.PLUGIN_API[0]}.{hookspecs.PLUGIN_API[1]}: install a matching "
            "version of the plugin")


def _forget_entry_points(group: str) -> None:
    """Drop stevedore's per-process list of ``group``'s entry points: it is filled by the
    first scan and never refreshed, so a package installed (or a path added) later in the
    same process would stay invisible. Its path-keyed cache underneath keeps rescans cheap."""
    cache = getattr(ExtensionManager, "ENTRY_POINT_CACHE", None)
    if isinstance(cache, dict):
        cache.pop(group, None)


def scan(group: str) -> tuple[dict[str, Any], list[PluginInfo]]:
    """Load every entry point of ``group``: ``({name: loaded object}, infos)``."""
    failures: dict[str, BaseException] = {}

    def on_failure(manager: Any, ep: Any, exc: BaseException) -> None:
        failures[ep.name] = exc
        log.debug("plugin %s failed to load: %s", ep.name, exc)

    _forget_entry_points(group)
    mgr = ExtensionManager(namespace=group, invoke_on_load=False,
                           on_load_failure_callback=on_failure)
    loaded: dict[str, Any] = {}
    infos: list[PluginInfo] = []
    for ext in mgr.extensions:
        pkg, ver = _dist_of(group, ext.name)
        api = _api_of(ext.plugin)
        info = PluginInfo(ext.name, group, ext.entry_point.value, pkg, ver, "loaded",
                          api=".".join(map(str, api)) if api else "")
        try:
            check_api(ext.name, ext.plugin)
            loaded[ext.name] = ext.plugin
        except PluginApiMismatchError as exc:
            info.status, info.error = "failed", str(exc)
        infos.append(info)
    eps = {ep.name: ep for ep in entry_points(group)}
    for name, err in failures.items():
        ep = eps.get(name)
        pkg, ver = _dist_of(group, name)
        infos.append(PluginInfo(name, group, ep.value if ep is not None else "?", pkg, ver,
                                "failed", error=f"{type(err).__name__}: {err}"))
    return loaded, sorted(infos, key=lambda i: i.name)


def list_plugins() -> list[PluginInfo]:
    """Every installed kvmfw plugin, loaded or failed, in every group."""
    out: list[PluginInfo] = []
    for group in GROUPS:
        out += scan(group)[1]
    return out


def load_arch(name: str | None = None) -> tuple[str, Any]:
    """Load the arch plugin ``name`` (default: the host's) and return ``(name, plugin)``."""
    arch = name or host_arch()
    failure: list[BaseException] = []

    def on_failure(manager: Any, ep: Any, exc: BaseException) -> None:
        failure.append(exc)

    _forget_entry_points(ARCH_GROUP)
    try:
        drv = DriverManager(ARCH_GROUP, arch, invoke_on_load=False,
                            on_load_failure_callback=on_failure)
    except NoMatches:
        if failure:
            raise PluginLoadError(arch, ARCH_GROUP, failure[0]) from None
        installed = sorted(ep.name for ep in entry_points(ARCH_GROUP))
        raise ArchNotFoundError(
            f"no architecture plugin {arch!r} is installed (installed: "
            f"{', '.join(installed) or 'none'}); install it, e.g. pip install "
            f"./plugins/{arch}") from None
    except MultipleMatches:
        raise ArchNotFoundError(
            f"several packages provide architecture plugin {arch!r}: "
            "uninstall all but one") from None
    check_api(arch, drv.driver)
    return arch, drv.driver


def board_names() -> list[str]:
    """Every installed board (``kvmfw.boards`` entry points), loaded or not."""
    return sorted({ep.name for ep in entry_points(BOARD_GROUP)})


def board_devices(name: str, machine: Any, *, missing_ok: bool = False) -> list[str]:
    """The device specs of board ``name`` (a ``kvmfw.boards`` entry point) for
    ``machine``. An unknown board is a :class:`~kvmfw.errors.ConfigError` (``missing_ok``:
    an empty board); one that fails to load or returns anything but a list of specs is a
    :class:`~kvmfw.errors.PluginError`."""
    eps = [ep for ep in entry_points(BOARD_GROUP) if ep.name == name]
    if not eps:
        if missing_ok:
            return []
        raise ConfigError(f"no board {name!r} is installed (installed: "
                          f"{', '.join(board_names()) or 'none'}); check -o board=NAME")
    if len({ep.value for ep in eps}) > 1:
        raise PluginError(f"several packages provide board {name!r}: uninstall all but one")
    try:
        fn = eps[0].load()
    except Exception as exc:
        raise PluginLoadError(name, BOARD_GROUP, exc) from exc
    check_api(name, fn)
    try:
        specs = fn(machine)
    except KvmfwError:
        raise
    except Exception as exc:
        raise PluginHookError("board", name, exc) from exc
    if not isinstance(specs, list | tuple) or not all(isinstance(s, str) for s in specs):
        raise PluginError(f"board {name!r} returned {type(specs).__name__}, not a list of "
                          "device specs")
    if len(specs) > MAX_BOARD_DEVICES:
        raise PluginError(f"board {name!r} returned {len(specs)} devices "
                          f"(at most {MAX_BOARD_DEVICES})")
    return list(specs)


class DeviceRegistry:
    """Device classes by name: the ``kvmfw.devices`` entry points plus hook additions."""

    def __init__(self) -> None:
        self._classes: dict[str, type] = {}
        self.failures: dict[str, str] = {}

    @classmethod
    def from_entry_points(cls) -> DeviceRegistry:
        reg = cls()
        loaded, infos = scan(DEVICE_GROUP)
        for name, obj in loaded.items():
            reg.add(name, obj)
        for info in infos:
            if info.status == "failed":
                reg.failures[info.name] = info.error
        return reg

    def add(self, name: str, device_class: type) -> None:
        """Make ``device_class`` available as ``--device name``."""
        self._classes[name] = device_class

    def get(self, name: str) -> type:
        try:
            return self._classes[name]
        except KeyError:
            pass
        if name in self.failures:
            raise PluginLoadError(name, DEVICE_GROUP, self.failures[name])
        known = ", ".join(sorted(self._classes)) or "none installed"
        raise ConfigError(f"unknown device {name!r} (available: {known})")

    def names(self) -> list[str]:
        return sorted(self._classes)


def check_device_hooks(device: Any, label: str) -> None:
    """Refuse a device that implements an architecture-only hook (or a misspelt one).

    Arch hooks are firstresult or bound to one implementation: a device answering one would
    silently replace the architecture's answer (its ``handle_exit_io`` would take every
    port, its ``update_kvm_state`` every sync). Devices observe through :data:`DEVICE_HOOKS`.
    """
    bad = []
    for attr in dir(type(device)):
        fn = getattr(type(device), attr, None)
        if fn is None or not callable(fn):
            continue
        opts = getattr(fn, hookspecs.PROJECT + "_impl", None)
        if opts is None:
            continue
        name = opts.get("specname") or attr
        if name not in DEVICE_HOOKS:
            bad.append(name)
    if bad:
        raise PluginError(
            f"device {label} implements {', '.join(sorted(bad))}: devices may implement only "
            f"{', '.join(sorted(DEVICE_HOOKS))} (the rest belong to the architecture plugin)")


def make_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


class BoundHooks:
    """Hook implementations resolved once, callable without pluggy's per-call machinery.

    ``bind(name)`` returns None when nobody implements the hook, else one plain callable
    taking the spec's arguments positionally. ``call(name, **kwargs)`` is for cold hooks:
    it names the plugin that raised (:class:`~kvmfw.errors.PluginHookError`).
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm

    def impls(self, name: str) -> list[Any]:
        """The implementations of hook ``name`` in registration order (the arch's first,
        then devices as they were added); pluggy ``HookImpl`` objects."""
        return list(getattr(self.pm.hook, name).get_hookimpls())

    def _impls(self, name: str) -> list[Any]:
        # pluggy's calling order: last registered (and tryfirst) first
        return list(reversed(self.impls(name)))

    def _spec(self, name: str) -> tuple[tuple[str, ...], bool]:
        caller = getattr(self.pm.hook, name)
        spec = caller.spec
        return tuple(spec.argnames), bool(spec.opts.get("firstresult"))

    def _adapt(self, name: str, impl: Any, argnames: tuple[str, ...]) -> Callable[..., Any]:
        fn = impl.function
        if tuple(impl.argnames) == argnames:
            return fn  # type: ignore[no-any-return]
        positions = [argnames.index(a) for a in impl.argnames]
        return lambda *args: fn(*[args[i] for i in positions])

    def bind(self, name: str) -> Callable[..., Any] | None:
        """One callable for hook ``name`` (None if unimplemented): firstresult hooks ask in
        pluggy's order; the others call every implementation in registration order (the
        arch's first, then devices)."""
        argnames, firstresult = self._spec(name)
        order = self._impls(name) if firstresult else self.impls(name)
        impls = [i for i in order if not (i.hookwrapper or i.wrapper)]
        if not impls:
            return None
        fns = [self._adapt(name, i, argnames) for i in impls]
        if len(fns) == 1:
            return fns[0]
        if firstresult:
            def first(*args: Any) -> Any:
                for f in fns:
                    r = f(*args)
                    if r is not None:
                        return r
                return None
            return first

        def every(*args: Any) -> None:
            for f in fns:
                f(*args)
        return every

    def plugin_name_of(self, impl: Any) -> str:
        return str(impl.plugin_name)

    def call(self, name: str, **kwargs: Any) -> Any:
        """Call a cold hook; returns the first non-None result for firstresult hooks, else a
        list of results."""
        argnames, firstresult = self._spec(name)
        results = []
        for impl in self._impls(name):
            if impl.hookwrapper or impl.wrapper:
                return getattr(self.pm.hook, name)(**kwargs)
            try:
                r = impl.function(*[kwargs[a] for a in impl.argnames])
            except KvmfwError:
                raise
            except Exception as exc:
                raise PluginHookError(name, impl.plugin_name, exc) from exc
            if r is not None:
                if firstresult:
                    return r
                results.append(r)
        return None if firstresult else results

