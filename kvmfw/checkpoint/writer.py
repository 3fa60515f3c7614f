"""Writing a checkpoint directory atomically.

Everything goes into a temporary sibling directory (``.NAME.tmp-PID-RANDOM``): RAM files,
``state.json``, ``stats.json``, then ``manifest.json`` naming every other file with its size
and checksum; each file and directory is fsynced, then the directory is renamed to ``NAME``
and the parent fsynced. A ``kill -9`` at any moment leaves either no ``NAME`` or a complete
one; a temporary directory without a manifest, or whose files do not match it, is refused by
the reader. On an error the temporary directory is removed; one left by a writer that was
killed is removed by the next checkpoint written beside it (:func:`remove_stale_temps`).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmfw.checkpoint import format as fmt
from kvmfw.checkpoint.state import MachineState, capture, device_key
from kvmfw.errors import CheckpointError

if TYPE_CHECKING:
    from kvmfw.checkpoint.reader import Manifest
    from kvmfw.machine import Machine

HOST_OPTIONS = frozenset({"console_output", "console_input"})
"""Machine options that are host-side objects, given anew at restore (never recorded)."""
HOST_CONFIG = frozenset({"kvm_path", "options"})
_TEMP = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>[0-9]{1,10})-[0-9a-f]{8}")


def _plain(v: Any) -> Any:
    """``v`` as JSON data: scalars and lists/dicts of them; anything else as its text."""
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


def machine_config(machine: Machine) -> dict[str, Any]:
    """The recorded :class:`~kvmfw.machine.MachineConfig`: enough to build the machine
    again (host-side objects such as the console are left out)."""
    cfg = machine.config
    from kvmfw.machine import MachineConfig

    fields = MachineConfig().as_dict()  # its fields only, not attributes a caller added
    out = {k: _plain(getattr(cfg, k)) for k in fields if k not in HOST_CONFIG}
    out["options"] = {k: _plain(v) for k, v in cfg.options.items()
                      if k not in HOST_OPTIONS and (v is None or isinstance(
                          v, bool | int | float | str | list | tuple | dict))}
    return out


def plugins_in_use(machine: Machine) -> list[dict[str, Any]]:
    """The installed distributions that provide this machine's arch and devices, with
    their versions and plugin API (plugins not installed as distributions, e.g. a test's
    arch object, are not listed: a restore must be given them again)."""
    from kvmfw.plugins import ARCH_GROUP, DEVICE_GROUP, _api_of, _dist_of

    found: dict[str, dict[str, Any]] = {}

    def add(group: str, name: str, obj: Any, what: str) -> None:
        dist, version = _dist_of(group, name)
        if dist == "?":
            return
        api = _api_of(obj)
        entry = found.setdefault(dist, {"name": dist, "version": version,
                                        "api": ".".join(map(str, api)) if api else None,
                                        "provides": []})
        if what not in entry["provides"]:
            entry["provides"].append(what)

    arch_plugin = machine.pm.get_plugin(f"arch:{machine.arch}")
    if arch_plugin is not None:
        add(ARCH_GROUP, machine.arch, arch_plugin, f"arch:{machine.arch}")
    reg = machine.registry
    for d in machine.devices:
        if reg is not None and reg._classes.get(d.name) is type(d):
            add(DEVICE_GROUP, d.name, type(d), f"device:{d.name}")
    return sorted(found.values(), key=lambda e: str(e["name"]))


def _write_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _write_region(path: str, region: Any, page: int,
                  dirty: bytearray | None) -> dict[str, Any]:
    """One region's RAM file. ``dirty`` None: every non-zero page (a sparse file of the
    region's size). Otherwise only the pages whose bit is set (incremental), plus a map."""
    size = region.size
    mm = region.view
    ph = fmt.PageHash()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, size)
        if dirty is None:
            cands = _candidates(region, page)
            for a, b in cands:
                for s, e in fmt.nonzero_pages(mm[a * page:b * page], a, page):
                    data = mm[s * page:e * page]
                    _write_all(fd, data, s * page)
                    ph.add(s, data, page)
        else:
            for s, e in _bit_runs(dirty, size // page):
                data = mm[s * page:e * page]
                # zero pages stay holes; the map says they are stored (as zero)
                for zs, ze in fmt.nonzero_pages(data, s, page):
                    _write_all(fd, mm[zs * page:ze * page], zs * page)
                ph.add(s, data, page)
        os.fsync(fd)
    finally:
        os.close(fd)
    out = {"size": size, "pages": ph.pages, "sha256": ph.hexdigest()}
    return out


def _candidates(region: Any, page: int) -> list[tuple[int, int]]:
    """Pages of ``region`` that may be non-zero: resident (or swapped) pages of its
    mapping, plus the data of the file behind a copy-on-write mapping (a restored
    machine's untouched pages read from its checkpoint)."""
    n = region.size // page
    runs = fmt.resident_runs(region.host_addr, region.size, page)
    if runs is None:
        return [(0, n)]
    if region.path is not None:
        try:
            fd = os.open(region.path, os.O_RDONLY)
        except OSError:
            return [(0, n)]
        try:
            runs = runs + fmt.data_runs(fd, region.size, page)
        finally:
            os.close(fd)
    return [(a, min(b, n)) for a, b in fmt.merge_runs(runs) if a < n]


def _bit_runs(bits: bytes | bytearray, n: int) -> list[tuple[int, int]]:
    """Runs ``[start, end)`` of set bits among the first ``n`` (bit i = page i,
    little-endian within bytes, as KVM's dirty log)."""
    from kvmfw.dirty import bitmap_runs

    value = int.from_bytes(bits, "little") & ((1 << n) - 1)
    return [(s, s + c) for s, c in bitmap_runs(value)]


def _write_json(path: str, data: Any) -> dict[str, Any]:
    import hashlib

    raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, raw, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def remove_stale_temps(directory: Path) -> list[Path]:
    """Remove the temporary directories in ``directory`` whose writer is dead (a ``kill
    -9`` mid-write leaves one). A writer still alive, or a process that may be one (a pid
    this user cannot signal), keeps its directory; so does anything not named like ours."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.fullmatch(entry.name)
        if m is None or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            os.kill(int(m["pid"]), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def write(machine: Machine, path: str | os.PathLike[str], *,
          state: MachineState | None = None, parent: Manifest | None = None,
          dirty: dict[Any, bytearray] | None = None) -> Path:
    """Write a checkpoint of the drained ``machine`` to the new directory ``path``.

    ``state``: a capture already taken (default: capture now). ``parent`` and ``dirty``
    (incremental): the checkpoint this one builds on and, per region, the bitmap of pages
    changed since it; only those pages are stored. Raises
    :class:`~kvmfw.errors.CheckpointError` (``path`` exists, a write failed)."""
    import kvmfw
    from kvmfw.hookspecs import PLUGIN_API
    from kvmfw.memory import PAGE_SIZE

    final = Path(path)
    if final.exists():
        raise CheckpointError(f"checkpoint {final} exists already (pick a new directory)")
    if not final.parent.is_dir():
        raise CheckpointError(f"cannot write checkpoint {final}: {final.parent} is not a "
                              "directory")
    if state is None:
        state = capture(machine)
    host_files = _host_files(machine)
    if (parent is None) != (dirty is None):
        raise CheckpointError("an incremental checkpoint needs both its parent and the "
                              "dirty pages since it")
    remove_stale_temps(final.parent)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.mkdir(tmp)
        os.mkdir(tmp / fmt.RAM_DIR)
        files: dict[str, dict[str, Any]] = {}
        memory = []
        page = PAGE_SIZE
        for i, region in enumerate(machine.memory):
            rel = fmt.ram_file(i)
            bits = None
            if dirty is not None:
                bits = dirty.get(region)
                if bits is None:
                    bits = bytearray(-(-region.size // page // 8))
                files[fmt.ram_map(i)] = _write_raw(str(tmp / fmt.ram_map(i)), bits)
            info = _write_region(str(tmp / rel), region, page, bits)
            files[rel] = {"size": info["size"], "sha256": info["sha256"], "hash": "pages"}
            memory.append({"index": i, "gpa": region.gpa, "size": region.size,
                           "name": region.name, "readonly": bool(region.readonly),
                           "file": rel, "pages": info["pages"],
                           "map": fmt.ram_map(i) if bits is not None else None})
        files[fmt.STATE] = _write_json(str(tmp / fmt.STATE), state.as_dict())
        try:
            stats = machine.stats.snapshot()
        except Exception as exc:  # informational: never lose a checkpoint over it
            stats = {"error": {"text": str(exc)}}
        files[fmt.STATS] = _write_json(str(tmp / fmt.STATS), _plain(stats))
        fmt.fsync_dir(str(tmp / fmt.RAM_DIR))
        files.update(_device_files(machine, tmp))
        model = machine.hooks.call("cpu_model", machine=machine)
        manifest = {
            "format": fmt.FORMAT_NAME,
            "version": fmt.version_text(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "kvmfw": {"version": kvmfw.__version__,
                      "plugin_api": f"{PLUGIN_API[0]}.{PLUGIN_API[1]}"},
            "plugins": plugins_in_use(machine),
            "arch": machine.arch,
            "cpu_model": _plain(model),
            "page_size": page,
            "machine": machine_config(machine),
            "board": [{"key": device_key(i, d), "name": d.name, "params": _plain(d.params)}
                      for i, d in enumerate(machine.devices)],
            "memory": memory,
            "time": {"tick": state.time["tick"],
                     "sim_seconds": state.time["tick"] / 10**12},
            "host_files": host_files,
            "parent": None if parent is None else {
                "path": os.path.relpath(parent.path.resolve(), final.resolve()),
                "manifest_sha256": parent.sha256},
            "files": files,
        }
        _write_json(str(tmp / fmt.MANIFEST), manifest)
        fmt.fsync_dir(str(tmp))
        os.rename(tmp, final)
        fmt.fsync_dir(str(final.parent))
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise CheckpointError(f"cannot write checkpoint {final}: {exc.strerror or exc}"
                                  " (check space and permissions)") from None
        raise
    return final


def _device_files(machine: Machine, tmp: Path) -> dict[str, dict[str, Any]]:
    """Each device's :meth:`~kvmfw.device.Device.save_files`, in ``dev/<index>/`` (a
    directory only for a device that wrote something), each file fsynced and listed with
    its size and sha256."""
    out: dict[str, dict[str, Any]] = {}
    for i, d in enumerate(machine.devices):
        rel = fmt.dev_dir(i)
        where = tmp / rel
        where.mkdir(parents=True)
        d.save_files(str(where))
        names = sorted(os.listdir(where))
        if not names:
            where.rmdir()
            continue
        if len(names) > fmt.DEV_FILES_MAX or not all(
                fmt.DEV_FILE_NAME.fullmatch(n) for n in names):
            raise CheckpointError(f"{d.name}: wrote {', '.join(names)} into the checkpoint: "
                                  f"at most {fmt.DEV_FILES_MAX} files named "
                                  f"{fmt.DEV_FILE_NAME.pattern} (a plugin bug)")
        for n in names:
            path = str(where / n)
            if not os.path.isfile(path) or os.path.islink(path):
                raise CheckpointError(f"{d.name}: {rel}/{n} is not a regular file")
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            size, digest = fmt.file_sha256(path, fmt.DEV_FILE_MAX)
            out[f"{rel}/{n}"] = {"size": size, "sha256": digest}
        fmt.fsync_dir(str(where))
    if out:
        fmt.fsync_dir(str(tmp / fmt.DEV_DIR))
    elif (tmp / fmt.DEV_DIR).exists():
        os.rmdir(tmp / fmt.DEV_DIR)
    return out


def _host_files(machine: Machine) -> list[dict[str, Any]]:
    """Every device's :meth:`~kvmfw.device.Device.host_files`, each with its
    :func:`~kvmfw.checkpoint.format.file_identity` now (the machine is drained)."""
    out = []
    for i, d in enumerate(machine.devices):
        for path in d.host_files():
            try:
                ident = fmt.file_identity(path)
            except OSError as exc:
                raise CheckpointError(f"{d.name}: cannot read {path} to record it in the "
                                      f"checkpoint: {exc.strerror}") from None
            out.append({"device": device_key(i, d), "path": path, **ident})
    if len(out) > fmt.HOST_FILES_MAX:
        raise CheckpointError(f"the devices name {len(out)} host files, more than a "
                              f"checkpoint records ({fmt.HOST_FILES_MAX})")
    return out


def _write_raw(path: str, data: bytes | bytearray) -> dict[str, Any]:
    import hashlib

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
