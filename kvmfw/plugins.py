"""Plugin discovery (an entry-point index, and stevedore for listings) and calling (pluggy).

Plugins are entry points in the groups ``kvmfw.arch`` (one object per architecture),
``kvmfw.devices`` (one :class:`~kvmfw.device.Device` class per name) and ``kvmfw.boards``
(one callable per board: ``board(machine) -> [device spec, ...]``, so any package can
contribute a board and no plugin imports another); a plugin that fails to import is recorded
instead of dying. A run loads only what it names (its arch, its board, the devices it adds)
from an index of kvmfw's entry points that is kept on disk while the distributions found on
``sys.path`` are unchanged (:func:`_installed_entry_points`): a scan of every installed
distribution (``importlib.metadata``, each ``METADATA`` parsed) costs more than the rest of
start-up on a slow host. ``kvmfw list-plugins`` loads everything through stevedore. pluggy
calls hooks:
one :class:`pluggy.PluginManager` per machine, the arch plugin registered first, device
instances after it. :class:`BoundHooks` resolves the run-loop hooks once, so an exit costs
a plain function call, not pluggy's dispatch; the machine rebinds them whenever a device
registers (see :data:`DEVICE_HOOKS` for what a device may implement).
"""

from __future__ import annotations

import importlib
import inspect
import os
import stat
import sys
import time
import types
import weakref
import zlib
from collections.abc import Callable
from typing import Any

import pluggy

from kvmfw import hookspecs
from kvmfw.debug import get_logger
from kvmfw.errors import (
    ArchNotFoundError,
    ConfigError,
    KvmfwError,
    PluginApiMismatchError,
    PluginError,
    PluginHookError,
    PluginLoadError,
)
from kvmfw.record import Frozen, Record

log = get_logger("kvmfw.plugins")

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
    m = os.uname().machine.lower()  # (platform.machine(); platform compiles regexes)
    return _HOST_ARCH.get(m, m)


class PluginInfo(Record):
    """One entry point as ``kvmfw list-plugins`` shows it (``status``: ``loaded`` or
    ``failed``)."""

    def __init__(self, name: str, group: str, target: str, package: str, version: str,
                 status: str, api: str = "", error: str = "") -> None:
        self.name = name
        self.group = group
        self.target = target
        self.package = package
        self.version = version
        self.status = status
        self.api = api
        self.error = error


_Stamp = tuple[tuple[str, int, bool], ...]
_Fingerprint = tuple[tuple[str, int, tuple[tuple[str, int], ...]], ...]
_Listings = dict[str, tuple[int, tuple[str, ...]]]
_Found = dict[tuple[str, str], list[tuple[str, str, "EntryPoint"]]]
_installed: tuple[_Stamp, _Found] | None = None

INDEX_VERSION = 3
"""3: the key stamps each path directory (not each ``entry_points.txt``) and the file keeps
the directories' listings; 2: lines of tab-separated text (1 was JSON: the json package is
~5 modules a run would import for this file alone)."""
INDEX_MAX_BYTES = 1 << 20
"""Largest entry-point index file read (it is a file like any other: bounded, checked, and
rebuilt rather than trusted when anything in it is off)."""
_INDEX_MAX_ENTRIES = 4096
_INDEX_MAX_LISTINGS = 1024
_INDEX_MAX_TEXT = 1024
_RACY_NS = 2_000_000_000
"""A directory changed this recently may change again within its timestamp's granularity
(the kernel's coarse clock) without its mtime moving: its listing is not kept (as git
treats a "racily clean" index entry)."""


class EntryPoint(Frozen):
    """One ``kvmfw.*`` entry point: ``name = module:attr`` in ``group`` (what
    ``importlib.metadata.EntryPoint`` offers kvmfw, without importing it)."""

    name: str
    value: str
    group: str

    def load(self) -> Any:
        """Import the module and resolve the attribute path, as ``EntryPoint.load``."""
        module, _, attr = self.value.partition("[")[0].partition(":")
        obj: Any = importlib.import_module(module.strip())
        for part in filter(None, attr.strip().split(".")):
            obj = getattr(obj, part)
        return obj


_META_SUFFIXES = (".dist-info", ".egg-info")
_KEY_MAX_DISTS = 8192
"""Metadata directories the key lists at most (a path with more is scanned every time)."""
_STDLIB = os.path.dirname(os.path.abspath(os.__file__))
_STDLIB_DIRS = frozenset({_STDLIB, os.path.join(_STDLIB, "lib-dynload")})
"""The standard library's directories: they hold no distribution (site-packages is a
directory of its own), so neither the key nor a start-up lists them (~250 entries)."""


def _path_stamp() -> _Stamp:
    """Each sys.path entry with its mtime and whether it is a directory: cheap, and all the
    key needs stat for (an install or removal creates or deletes an entry in a path
    directory). The in-process cache compares it as it is."""
    out = []
    for p in sys.path:
        try:
            st = os.stat(p or ".")
            out.append((p, st.st_mtime_ns, stat.S_ISDIR(st.st_mode)))
        except OSError:
            out.append((p, -1, False))
    return tuple(out)


def _is_meta(name: str, egg: bool) -> bool:
    low = name.lower()
    return low.endswith(_META_SUFFIXES) or (egg and low == "egg-info")


def _path_fingerprint(stamp: _Stamp | None = None, listings: _Listings | None = None
                      ) -> tuple[_Fingerprint | None, _Listings]:
    """What decides the installed entry points, and the listings it read afresh.

    The key: the path directories that hold distribution metadata (``*.dist-info``,
    ``*.egg-info``, as ``importlib.metadata`` finds them), in sys.path order, each with its
    mtime (an install, reinstall or removal replaces a ``.dist-info`` in it) and those
    names; an ``.egg-info`` also with its ``entry_points.txt`` mtime (``setup.py develop``
    rewrites one in place, in a source tree); an archive (zip) on the path with its mtime.
    Entries that hold no metadata (the script's directory of ``kvmfw``, the current
    directory of ``python -c`` and ``-m``, the standard library) do not count, so the three
    ways to start kvmfw share one index. The key is None (no index) when the path holds
    more than ``_KEY_MAX_DISTS`` of them.

    ``listings`` (from the index) are reused for a directory whose mtime is unchanged, so a
    start-up stats each path directory instead of listing it; the listings read here, when
    not racy (:data:`_RACY_NS`), are returned for the next index."""
    if stamp is None:
        stamp = _path_stamp()
    listings = listings or {}
    fresh: _Listings = {}
    now = time.time_ns()
    out: list[tuple[str, int, tuple[tuple[str, int], ...]]] = []
    seen: set[str] = set()
    total = 0
    for p, mtime, isdir in stamp:
        d = os.path.abspath(p or ".")
        if d in seen or mtime < 0 or d in _STDLIB_DIRS:
            continue  # (missing, or a path-hook name rather than a directory)
        seen.add(d)
        if not isdir:  # an archive (zip) on the path: its mtime stands for what it holds
            out.append((d, mtime, ()))
            continue
        egg = d.lower().endswith(".egg")
        old = listings.get(d)
        if old is not None and old[0] == mtime:
            names = old[1]
        else:
            try:
                with os.scandir(d) as it:
                    names = tuple(sorted(e.name for e in it if _is_meta(e.name, egg)))
            except OSError:
                continue
            if now - mtime > _RACY_NS:
                fresh[d] = (mtime, names)
        if not names:
            continue
        total += len(names)
        if total > _KEY_MAX_DISTS:
            return None, fresh
        stamps = []
        for name in names:
            if name.lower().endswith(".dist-info"):
                stamps.append((name, 0))  # replaced whole on every install: the dir's mtime
                continue
            try:
                stamps.append((name, os.stat(os.path.join(d, name, "entry_points.txt"))
                               .st_mtime_ns))
            except OSError:
                stamps.append((name, -1))
        out.append((d, mtime, tuple(stamps)))
    return tuple(out), fresh


def _index_file() -> str | None:
    """Where the index for this interpreter lives (kvmfw's cache directory,
    :func:`kvmfw.cache.base_dir`: ``$XDG_CACHE_HOME/kvmfw`` or ``~/.cache/kvmfw``; one file
    per interpreter and prefix (a venv) whichever name started it (``python``,
    ``python3.11``), so a path that changes, as in tests, replaces it instead of adding
    files), or None when there is no cache directory."""
    from kvmfw.cache import base_dir

    base = base_dir()
    if base is None:
        return None
    exe = os.path.realpath(sys.executable) if sys.executable else ""
    tag = zlib.crc32(f"{exe}\0{sys.prefix}".encode()) & 0xFFFFFFFF
    return os.path.join(base, f"entry-points-{tag:08x}.txt")


_INDEX_MAGIC = f"kvmfw entry points {INDEX_VERSION}"


class _Index(Frozen):
    key: str
    listings: _Listings
    found: _Found


def _read_index(path: str) -> _Index | None:
    """The index in ``path``; None if it is missing, too large or malformed in any way
    (then it is rebuilt). Its key is compared by the caller.

    The file: a first line naming the format and its version, a second line with the key
    (``repr`` of the fingerprint: one line, compared as text, never evaluated), then the
    path directories' listings (``L``, directory, mtime, then its metadata names), then one
    entry point per line: group, name, value, package and version; fields separated by
    tabs."""
    try:
        with open(path, "rb") as f:
            raw = f.read(INDEX_MAX_BYTES + 1)
        if len(raw) > INDEX_MAX_BYTES:
            return None
        lines = raw.decode().split("\n")
        if len(lines) < 3 or lines[0] != _INDEX_MAGIC or lines[-1] != "":
            return None
        listings: _Listings = {}
        found: _Found = {}
        entries = 0
        for line in lines[2:-1]:
            row = line.split("\t")
            if any(len(x) > _INDEX_MAX_TEXT for x in row):
                return None
            if row[0] == "L":
                if len(row) < 3 or len(listings) >= _INDEX_MAX_LISTINGS \
                        or len(row) - 3 > _KEY_MAX_DISTS or not os.path.isabs(row[1]):
                    return None
                egg = row[1].lower().endswith(".egg")
                names = tuple(row[3:])
                if any("/" in n or not _is_meta(n, egg) for n in names):
                    return None
                listings[row[1]] = (int(row[2]), names)
                continue
            entries += 1
            if len(row) != 5 or entries > _INDEX_MAX_ENTRIES:
                return None
            group, name, value, pkg, ver = row
            if not group.startswith("kvmfw."):
                return None
            found.setdefault((group, name), []).append(
                (pkg, ver, EntryPoint(name, value, group)))
        return _Index(lines[1], listings, found)
    except (OSError, ValueError):  # (UnicodeDecodeError is a ValueError)
        return None


def _write_index(path: str, key: _Fingerprint, found: _Found,
                 listings: _Listings | None = None) -> None:
    """Store the index (atomically; a cache that cannot be written is no error). Not
    written when an entry point's field holds a tab or a line break, which the format
    cannot carry: then every run scans, as without an index (a listing that cannot be
    carried is left out: that directory is listed by every run)."""
    rows = [(ep.group, ep.name, ep.value, pkg, ver)
            for entries in found.values() for pkg, ver, ep in entries]
    if any(c in x for row in rows for x in row for c in "\t\n\r"):
        return
    lines = [_INDEX_MAGIC, repr(key)]
    items = list((listings or {}).items())[-_INDEX_MAX_LISTINGS:]  # (the newest last)
    for d, (mtime, names) in items:
        if not any(c in x for x in (d, *names) for c in "\t\n\r"):
            lines.append("\t".join(("L", d, str(mtime), *names)))
    lines += ["\t".join(row) for row in rows]
    text = "".join(f"{line}\n" for line in lines)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except (OSError, ValueError):  # (a text the file system's encoding cannot hold)
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _scan_distributions() -> _Found:
    """Every installed distribution's ``kvmfw.*`` entry points (the slow way)."""
    import importlib.metadata

    found: _Found = {}
    seen: set[str] = set()
    for dist in importlib.metadata.distributions():
        eps = [ep for ep in dist.entry_points if ep.group.startswith("kvmfw.")]
        if not eps:
            continue
        pkg, ver = dist.metadata["Name"] or "?", dist.version or "?"
        # the first of a distribution found twice on sys.path counts (as stevedore does)
        norm = pkg.lower().replace("-", "_").replace(".", "_")
        if norm in seen:
            continue
        seen.add(norm)
        for ep in eps:
            found.setdefault((ep.group, ep.name), []).append(
                (pkg, ver, EntryPoint(ep.name, ep.value, ep.group)))
    return found


def _installed_entry_points() -> _Found:
    """``{(group, name): [(package, version, entry point), ...]}`` for kvmfw's groups (one
    entry per distribution declaring it, in sys.path order), from the index on disk while
    the distributions on sys.path are unchanged (:func:`_path_fingerprint`), else from a
    scan of every distribution (then written to the index). Cached in the process too."""
    global _installed
    stamp = _path_stamp()
    if _installed is not None and _installed[0] == stamp:
        return _installed[1]
    path = _index_file()
    index = _read_index(path) if path is not None else None
    key, fresh = _path_fingerprint(stamp, index.listings if index is not None else None)
    kept = index.listings if index is not None else {}
    if index is not None and key is not None and index.key == repr(key):
        found = index.found
        keyed = {d for d, _, _ in key}
        if path is not None and keyed & set(fresh) - set(kept):
            # a directory listed anew (no longer racy): keep its listing for next time
            _write_index(path, key, found, {**kept, **fresh})
    else:
        found = _scan_distributions()
        if path is not None and key is not None:  # (a listing with an old mtime is unused)
            _write_index(path, key, found, {**kept, **fresh})
    _installed = (stamp, found)
    return found


def entry_points(group: str) -> list[EntryPoint]:
    """The installed entry points of ``group`` (cached; see :func:`_installed_entry_points`)."""
    return [ep for (g, _), entries in _installed_entry_points().items() if g == group
            for _, _, ep in entries]


def _dist_of(group: str, name: str) -> tuple[str, str]:
    """(package, version) of the distribution that declares entry point ``group:name``."""
    entries = _installed_entry_points().get((group, name))
    return (entries[0][0], entries[0][1]) if entries else ("?", "?")


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
    from stevedore import ExtensionManager

    cache = getattr(ExtensionManager, "ENTRY_POINT_CACHE", None)
    if isinstance(cache, dict):
        cache.pop(group, None)


def scan(group: str) -> tuple[dict[str, Any], list[PluginInfo]]:
    """Load every entry point of ``group`` through stevedore: ``({name: loaded object},
    infos)`` (the listing path: a run loads only what it names)."""
    from stevedore import ExtensionManager

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
    entries = _installed_entry_points().get((ARCH_GROUP, arch), [])
    if not entries:
        installed = sorted(ep.name for ep in entry_points(ARCH_GROUP))
        raise ArchNotFoundError(
            f"no architecture plugin {arch!r} is installed (installed: "
            f"{', '.join(installed) or 'none'}); install it, e.g. pip install "
            f"./plugins/{arch}")
    if len(entries) > 1:
        raise ArchNotFoundError(
            f"several packages provide architecture plugin {arch!r}: "
            "uninstall all but one")
    try:
        plugin = entries[0][2].load()
    except Exception as exc:
        raise PluginLoadError(arch, ARCH_GROUP, exc) from None
    check_api(arch, plugin)
    return arch, plugin


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
    """Device classes by name: the ``kvmfw.devices`` entry points plus hook additions.

    An entry point is imported when its name is first asked for (a run imports the devices
    it adds, not every installed one); :meth:`names` loads them all."""

    def __init__(self) -> None:
        self._classes: dict[str, type] = {}
        self._entry_points: dict[str, EntryPoint] = {}
        self.failures: dict[str, str] = {}

    @classmethod
    def from_entry_points(cls) -> DeviceRegistry:
        reg = cls()
        for ep in entry_points(DEVICE_GROUP):
            reg._entry_points[ep.name] = ep  # several with one name: the last (as stevedore)
        return reg

    def add(self, name: str, device_class: type) -> None:
        """Make ``device_class`` available as ``--device name``."""
        self._classes[name] = device_class

    def _load(self, name: str) -> type | None:
        """Import entry point ``name`` once; a failure is remembered in ``failures``."""
        ep = self._entry_points.pop(name, None)
        if ep is None:
            return None
        try:
            obj = ep.load()
            check_api(name, obj)
        except PluginApiMismatchError as exc:
            self.failures[name] = str(exc)
            return None
        except Exception as exc:
            log.debug("plugin %s failed to load: %s", name, exc)
            self.failures[name] = f"{type(exc).__name__}: {exc}"
            return None
        self._classes.setdefault(name, obj)  # a hook's addition of the same name wins
        return self._classes[name]

    def get(self, name: str) -> type:
        try:
            return self._classes[name]
        except KeyError:
            pass
        cls = self._load(name)
        if cls is not None:
            return cls
        if name in self.failures:
            raise PluginLoadError(name, DEVICE_GROUP, self.failures[name])
        known = ", ".join(self.names()) or "none installed"
        raise ConfigError(f"unknown device {name!r} (available: {known})")

    def names(self) -> list[str]:
        for name in list(self._entry_points):
            self._load(name)
        return sorted(self._classes)


_Marks = tuple[dict[str, dict[str, Any]], frozenset[str]]
_marked: weakref.WeakKeyDictionary[type, _Marks] = weakref.WeakKeyDictionary()


def _class_marks(cls: type) -> _Marks:
    """``({name: hookimpl options}, slot names)`` of ``cls``: the attributes whose
    definition (the one lookup finds first along the MRO) carries the ``kvmfw_impl`` marker,
    on the function or on a classmethod or staticmethod around it, with the options dict the
    marker holds; and the slots, whose values are read per instance. Cached per class:
    pluggy's own search reads every attribute through ``inspect.getattr_static``, once per
    plugin instance."""
    marks = _marked.get(cls)
    if marks is None:
        marker = hookspecs.PROJECT + "_impl"
        hooks: dict[str, dict[str, Any]] = {}
        slots: set[str] = set()
        seen: set[str] = set()
        for klass in cls.__mro__:
            for attr, value in vars(klass).items():
                if attr in seen:
                    continue  # a subclass's definition hides this one
                seen.add(attr)
                if isinstance(value, types.MemberDescriptorType):
                    slots.add(attr)
                    continue
                opts = getattr(value, marker, None)
                if opts is None:
                    opts = getattr(getattr(value, "__func__", None), marker, None)
                if isinstance(opts, dict):
                    hooks[attr] = opts
        marks = _marked[cls] = (hooks, frozenset(slots))
    return marks


def check_device_hooks(device: Any, label: str) -> None:
    """Refuse a device that implements an architecture-only hook (or a misspelt one).

    Arch hooks are firstresult or bound to one implementation: a device answering one would
    silently replace the architecture's answer (its ``handle_exit_io`` would take every
    port, its ``update_kvm_state`` every sync). Devices observe through :data:`DEVICE_HOOKS`.
    """
    bad = []
    for attr, opts in sorted(_class_marks(type(device))[0].items()):
        name = opts.get("specname") or attr
        if name not in DEVICE_HOOKS:
            bad.append(name)
    if bad:
        raise PluginError(
            f"device {label} implements {', '.join(sorted(bad))}: devices may implement only "
            f"{', '.join(sorted(DEVICE_HOOKS))} (the rest belong to the architecture plugin)")


_CLASS_OR_MODULE = (type, types.ModuleType)


class _PluginManager(pluggy.PluginManager):
    """pluggy's manager, answering from the class's marks (:func:`_class_marks`) for the
    methods of a plugin instance, and asking pluggy about the rest: what an instance holds
    itself (in its ``__dict__`` or its slots), classes and modules."""

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        if not isinstance(plugin, _CLASS_OR_MODULE):
            try:
                own = object.__getattribute__(plugin, "__dict__")
            except AttributeError:
                own = {}
            if name not in own:
                hooks, slots = _class_marks(type(plugin))
                if name in hooks:
                    return hooks[name]  # what pluggy reads from the same definition
                if name not in slots:
                    return None
        return super().parse_hookimpl_opts(plugin, name)


def make_plugin_manager() -> pluggy.PluginManager:
    pm = _PluginManager(hookspecs.PROJECT)
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

