"""Reading a checkpoint back: the manifest checked in full, every file's size and checksum
verified, the machine rebuilt from the manifest, guest RAM mapped copy-on-write from the
checkpoint's files, then the state applied.

Every refusal is a :class:`~kvmfw.errors.CheckpointError` of one line naming the file and
the field; a machine that was being built for the restore is closed first, so nothing
half-restored exists.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmfw.checkpoint import format as fmt
from kvmfw.checkpoint.state import MachineState, apply, device_key
from kvmfw.debug import get_logger
from kvmfw.errors import CheckpointError, KvmfwError

if TYPE_CHECKING:
    from kvmfw.machine import Machine

log = get_logger("kvmfw.checkpoint")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_RAM_NAME = re.compile(r"ram/(\d{1,4})\.(bin|map)")
_DEV_NAME = re.compile(rf"{fmt.DEV_DIR}/(\d{{1,4}})/({fmt.DEV_FILE_NAME.pattern})")
_U64 = (1 << 64) - 1


class Manifest:
    """A checked ``manifest.json``: ``path`` (the checkpoint directory), ``data`` and the
    manifest file's ``sha256`` (an incremental child names its parent by it)."""

    def __init__(self, path: Path, data: dict[str, Any], sha256: str) -> None:
        self.path = path
        self.data = data
        self.sha256 = sha256

    @property
    def tick(self) -> int:
        return int(self.data["time"]["tick"])

    @property
    def memory(self) -> list[dict[str, Any]]:
        return list(self.data["memory"])

    def file(self, rel: str) -> str:
        return str(self.path / rel)


def _regular(path: str) -> None:
    """Refuse anything but a regular file before opening it (a FIFO would block)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file")


def _bad(where: str, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: {why}")


def _int(v: Any, where: str, lo: int = 0, hi: int = _U64) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _bad(where, f"must be an integer in [{lo}, {hi}]")
    return v


def _str(v: Any, where: str, limit: int = 4096) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise _bad(where, f"must be a string of at most {limit} characters")
    return v


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and check ``path/manifest.json`` (shape, bounds, format version); the files it
    names are checked by :func:`verify`."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a checkpoint directory (it does not exist or is "
                              "not a directory)")
    mpath = d / fmt.MANIFEST
    where = str(mpath)
    try:
        _regular(where)
        with open(mpath, "rb") as f:
            raw = f.read(fmt.MANIFEST_MAX + 1)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: missing (an incomplete checkpoint: the manifest is "
                              "written last)") from None
    except OSError as exc:
        raise CheckpointError(f"{where}: cannot read: {exc.strerror}") from None
    if len(raw) > fmt.MANIFEST_MAX:
        raise _bad(where, f"larger than {fmt.MANIFEST_MAX} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _bad(where, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _bad(where, "not a JSON object")
    _check_manifest(data, where)
    return Manifest(d, data, hashlib.sha256(raw).hexdigest())


def _need(data: dict[str, Any], key: str, where: str, types: type | tuple[type, ...]) -> Any:
    if key not in data:
        raise _bad(where, f"field {key!r} is missing")
    v = data[key]
    if not isinstance(v, types) or isinstance(v, bool) and bool not in (
            types if isinstance(types, tuple) else (types,)):
        raise _bad(where, f"field {key!r} has the wrong type")
    return v


def _check_manifest(data: dict[str, Any], where: str) -> None:
    if data.get("format") != fmt.FORMAT_NAME:
        raise _bad(where, f"field 'format' is not {fmt.FORMAT_NAME!r} (not a kvmfw "
                          "checkpoint)")
    major, minor = fmt.parse_version(data.get("version"), f"{where}: field 'version'")
    if major != fmt.FORMAT_VERSION[0]:
        raise _bad(where, f"field 'version' is {major}.{minor}; this kvmfw reads format "
                          f"{fmt.FORMAT_VERSION[0]}.x (use a kvmfw of that format major)")
    _str(_need(data, "arch", where, str), f"{where}: field 'arch'", 64)
    kv = _need(data, "kvmfw", where, dict)
    _str(kv.get("version"), f"{where}: field 'kvmfw.version'", 64)
    plugins = _need(data, "plugins", where, list)
    if len(plugins) > 256:
        raise _bad(where, "field 'plugins' lists more than 256 plugins")
    for i, p in enumerate(plugins):
        w = f"{where}: field 'plugins'[{i}]"
        if not isinstance(p, dict):
            raise _bad(w, "not a mapping")
        _str(p.get("name"), f"{w}.name", 200)
        _str(p.get("version"), f"{w}.version", 64)
    page = _need(data, "page_size", where, int)
    if page not in fmt.PAGE_SIZES:
        raise _bad(where, f"field 'page_size' {page} is not one of {fmt.PAGE_SIZES}")
    _need(data, "machine", where, dict)
    board = _need(data, "board", where, list)
    if len(board) > 1024:
        raise _bad(where, "field 'board' lists more than 1024 devices")
    for i, b in enumerate(board):
        if not isinstance(b, dict) or not isinstance(b.get("key"), str) \
                or not isinstance(b.get("name"), str):
            raise _bad(where, f"field 'board'[{i}] must have a key and a name")
    time = _need(data, "time", where, dict)
    _int(time.get("tick"), f"{where}: field 'time.tick'", 0, (1 << 63) - 1)
    files = _need(data, "files", where, dict)
    per_device: dict[int, int] = {}
    for rel, info in files.items():
        w = f"{where}: field 'files'[{rel!r}]"
        dev = _DEV_NAME.fullmatch(rel) if isinstance(rel, str) else None
        if dev is not None:
            i = int(dev.group(1))
            per_device[i] = per_device.get(i, 0) + 1
            if i >= len(board) or per_device[i] > fmt.DEV_FILES_MAX:
                raise _bad(w, f"names a file of no device on the board, or more than "
                              f"{fmt.DEV_FILES_MAX} for one")
        elif rel not in (fmt.STATE, fmt.STATS) and not _RAM_NAME.fullmatch(rel):
            raise _bad(w, "names a file that is not part of a checkpoint")
        if not isinstance(info, dict):
            raise _bad(w, "not a mapping")
        _int(info.get("size"), f"{w}.size")
        if not isinstance(info.get("sha256"), str) or not _HEX64.fullmatch(info["sha256"]):
            raise _bad(w, "sha256 is not 64 hex digits")
    for rel in (fmt.STATE, fmt.STATS):
        if rel not in files:
            raise _bad(where, f"field 'files' does not list {rel}")
    memory = _need(data, "memory", where, list)
    if not 0 < len(memory) <= fmt.REGIONS_MAX:
        raise _bad(where, f"field 'memory' must list 1 to {fmt.REGIONS_MAX} regions")
    hosts = data.get("host_files", [])  # (format 1.1; a 1.0 checkpoint has none)
    if not isinstance(hosts, list) or len(hosts) > fmt.HOST_FILES_MAX:
        raise _bad(where, f"field 'host_files' must list at most {fmt.HOST_FILES_MAX} files")
    for i, h in enumerate(hosts):
        w = f"{where}: field 'host_files'[{i}]"
        if not isinstance(h, dict):
            raise _bad(w, "not a mapping")
        _str(h.get("device"), f"{w}.device", 200)
        _str(h.get("path"), f"{w}.path")
        _int(h.get("size"), f"{w}.size", 0, _U64)
        _int(h.get("mtime_ns"), f"{w}.mtime_ns", -(1 << 63), (1 << 63) - 1)
    parent = data.get("parent")
    if parent is not None:
        if not isinstance(parent, dict):
            raise _bad(where, "field 'parent' must be null or a mapping")
        _str(parent.get("path"), f"{where}: field 'parent.path'")
        if not isinstance(parent.get("manifest_sha256"), str) \
                or not _HEX64.fullmatch(parent["manifest_sha256"]):
            raise _bad(where, "field 'parent.manifest_sha256' is not 64 hex digits")
    end = -1
    for i, r in enumerate(memory):
        w = f"{where}: field 'memory'[{i}]"
        if not isinstance(r, dict):
            raise _bad(w, "not a mapping")
        if r.get("index") != i:
            raise _bad(w, f"index must be {i}")
        gpa = _int(r.get("gpa"), f"{w}.gpa", 0, _U64)
        size = _int(r.get("size"), f"{w}.size", 1, 1 << 48)
        if gpa % page or size % page or gpa <= end:
            raise _bad(w, "not page-aligned or overlapping/out of order")
        end = gpa + size - 1
        _str(r.get("name"), f"{w}.name", 200)
        if r.get("file") != fmt.ram_file(i) or fmt.ram_file(i) not in files:
            raise _bad(w, f"file must be {fmt.ram_file(i)} and listed in 'files'")
        want_map = fmt.ram_map(i) if parent is not None else None
        if r.get("map") != want_map or (want_map is not None and want_map not in files):
            raise _bad(w, f"map must be {want_map!r}"
                       + (" and listed in 'files'" if want_map else " (a full checkpoint)"))
        if want_map is not None and files[want_map]["size"] != -(-size // page // 8):
            raise _bad(w, "its map's size does not match the region")
        if files[fmt.ram_file(i)]["size"] != size:
            raise _bad(w, "its file's size is not the region's size")
        _int(r.get("pages"), f"{w}.pages", 0, size // page)


# --- verification -----------------------------------------------------------------------

def chain(path: str | os.PathLike[str]) -> list[Manifest]:
    """The checkpoint at ``path`` and its parents, oldest (the full checkpoint) first;
    each parent is the one the child names (by its manifest's sha256)."""
    out = [load_manifest(path)]
    seen = {out[0].path.resolve()}
    while out[0].data.get("parent") is not None:
        if len(out) > fmt.CHAIN_MAX:
            raise CheckpointError(f"{out[-1].path}: more than {fmt.CHAIN_MAX} incremental "
                                  "checkpoints in the chain")
        link = out[0].data["parent"]
        ppath = (out[0].path / link["path"]).resolve()
        where = f"{out[0].file(fmt.MANIFEST)}: field 'parent'"
        if ppath in seen:
            raise _bad(where, "the chain loops")
        if not ppath.is_dir():
            raise _bad(where, f"parent checkpoint {ppath} is missing (an incremental "
                              "checkpoint needs every one before it)")
        parent = load_manifest(ppath)
        if parent.sha256 != link["manifest_sha256"]:
            raise _bad(where, f"parent {ppath} is not the checkpoint it was taken after "
                              "(its manifest's checksum differs)")
        if parent.memory and [(r["gpa"], r["size"]) for r in parent.memory] != \
                [(r["gpa"], r["size"]) for r in out[0].memory]:
            raise _bad(where, f"parent {ppath} has another memory layout")
        seen.add(ppath)
        out.insert(0, parent)
    return out


def verify(m: Manifest, *, ram: bool = True) -> None:
    """Check every file the manifest names: present, of its size, with its checksum
    (RAM files by their stored pages, so a sparse file is read only where it has data;
    ``ram`` False skips hashing RAM, for a checkpoint this process trusts). Also refuses
    files the manifest does not name in ``ram/``."""
    files = m.data["files"]
    page = m.data["page_size"]
    for rel, info in files.items():
        where = m.file(rel)
        try:
            st = os.stat(where)
        except FileNotFoundError:
            raise CheckpointError(f"{where}: missing (named in the manifest)") from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{where}: not a regular file")
        if st.st_size != info["size"]:
            raise CheckpointError(f"{where}: size {st.st_size} is not {info['size']} "
                                  "(truncated or changed)")
        ram_name = _RAM_NAME.fullmatch(rel)
        if _DEV_NAME.fullmatch(rel):
            _size, digest = fmt.file_sha256(where, fmt.DEV_FILE_MAX)
        elif ram_name is not None and rel.endswith(".bin"):
            if not ram:
                continue
            index = int(ram_name.group(1))
            mapping = m.memory[index].get("map")
            digest, pages = _ram_hash(where, info["size"], page,
                                      m.file(mapping) if mapping else None)
            if pages != m.memory[index]["pages"]:
                raise CheckpointError(f"{where}: holds {pages} pages, the manifest says "
                                      f"{m.memory[index]['pages']} (a corrupt file)")
        else:
            _size, digest = fmt.file_sha256(where, fmt.STATE_MAX)
        if digest != info["sha256"]:
            raise CheckpointError(f"{where}: checksum mismatch (the file was changed or "
                                  "corrupted after it was written)")


def _ram_hash(path: str, size: int, page: int, map_path: str | None) -> tuple[str, int]:
    ph = fmt.PageHash()
    fd = os.open(path, os.O_RDONLY)
    try:
        if map_path is None:
            for a, b in fmt.data_runs(fd, size, page):
                for off in range(a * page, b * page, fmt.CHUNK):
                    n = min(fmt.CHUNK, b * page - off)
                    buf = os.pread(fd, n, off)
                    if len(buf) != n:
                        raise CheckpointError(f"{path}: truncated while reading")
                    for s, e in fmt.nonzero_pages(buf, off // page, page):
                        k = s - off // page
                        ph.add(s, buf[k * page:(e - s + k) * page], page)
        else:
            for s, e in _map_runs(map_path, size // page):
                for off in range(s * page, e * page, fmt.CHUNK):
                    n = min(fmt.CHUNK, e * page - off)
                    buf = os.pread(fd, n, off)
                    if len(buf) != n:
                        raise CheckpointError(f"{path}: truncated while reading")
                    ph.add(off // page, buf, page)
    finally:
        os.close(fd)
    return ph.hexdigest(), ph.pages


def _map_runs(map_path: str, npages: int) -> list[tuple[int, int]]:
    with open(map_path, "rb") as f:
        bits = f.read(-(-npages // 8) + 1)
    if len(bits) != -(-npages // 8):
        raise CheckpointError(f"{map_path}: not {-(-npages // 8)} bytes")
    from kvmfw.checkpoint.writer import _bit_runs

    return _bit_runs(bytearray(bits), npages)


def load_state(m: Manifest) -> MachineState:
    where = m.file(fmt.STATE)
    try:
        _regular(where)
        with open(where, "rb") as f:
            raw = f.read(fmt.STATE_MAX + 1)
        if len(raw) > fmt.STATE_MAX:
            raise CheckpointError(f"{where}: larger than {fmt.STATE_MAX} bytes")
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{where}: cannot read: {exc.strerror}") from None
    return MachineState.from_dict(data, where)


# --- compatibility ---------------------------------------------------------------------------

def check_plugins(m: Manifest) -> None:
    """Every plugin the checkpoint used is installed, of the same major version."""
    import importlib.metadata

    for i, p in enumerate(m.data["plugins"]):
        where = f"{m.file(fmt.MANIFEST)}: field 'plugins'[{i}]"
        try:
            have = importlib.metadata.version(p["name"])
        except importlib.metadata.PackageNotFoundError:
            raise CheckpointError(f"{where}: plugin {p['name']} {p['version']} is not "
                                  "installed (install it to restore this checkpoint)") \
                from None
        if _major(have) != _major(p["version"]):
            raise CheckpointError(f"{where}: plugin {p['name']} is {have} here, the "
                                  f"checkpoint needs major {_major(p['version'])} "
                                  f"({p['version']})")


def _major(version: str) -> str:
    return version.split(".", 1)[0]


def machine_config(m: Manifest, options: dict[str, Any] | None = None) -> Any:
    """The :class:`~kvmfw.machine.MachineConfig` recorded in the manifest, with host-side
    ``options`` (console, pseudo-op directory, ...) given anew."""
    from kvmfw.machine import MachineConfig

    where = f"{m.file(fmt.MANIFEST)}: field 'machine'"
    rec = m.data["machine"]
    known = MachineConfig().as_dict()
    kwargs: dict[str, Any] = {}
    for key, value in rec.items():
        if key not in known or key in ("kvm_path",):
            raise _bad(where, f"unknown key {key!r}")
        kwargs[key] = value
    for key, types in (("memory", int), ("cpus", int), ("devices", list),
                       ("default_devices", bool), ("options", dict)):
        if key not in kwargs or not isinstance(kwargs[key], types):
            raise _bad(where, f"key {key!r} is missing or of the wrong type")
    for key in ("default_devices", "always_sync", "use_perf", "use_coalesced_mmio"):
        if key in kwargs and not isinstance(kwargs[key], bool):
            raise _bad(where, f"key {key!r} must be true or false")
    for key in ("host_factor", "host_frequency_hz"):
        v = kwargs.get(key, 1.0)
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1e15:
            raise _bad(where, f"key {key!r} must be a positive number")
    if kwargs.get("unclaimed", "ignore") not in ("ignore", "fatal"):
        raise _bad(where, "key 'unclaimed' must be ignore or fatal")
    if kwargs.get("arch") not in (None, m.data["arch"]):
        raise _bad(where, "key 'arch' differs from the manifest's arch")
    _int(kwargs["cpus"], f"{where}.cpus", 1, 4096)
    _int(kwargs["memory"], f"{where}.memory", 1, 1 << 48)
    if not all(isinstance(s, str) for s in kwargs["devices"]):
        raise _bad(where, "devices must be device specifications (strings)")
    kwargs["options"] = {**kwargs["options"], **(options or {})}
    kwargs["arch"] = m.data["arch"]
    return MachineConfig(**kwargs)


def check_machine(machine: Machine, m: Manifest) -> None:
    """The rebuilt machine is the one checkpointed: its memory layout and board."""
    where = m.file(fmt.MANIFEST)
    regions = list(machine.memory)
    if [(r.gpa, r.size) for r in regions] != [(r["gpa"], r["size"]) for r in m.memory]:
        raise _bad(where, "field 'memory': the rebuilt machine has another memory layout "
                          "(another arch plugin version or configuration)")
    keys = [device_key(i, d) for i, d in enumerate(machine.devices)]
    if keys != [b["key"] for b in m.data["board"]]:
        raise _bad(where, "field 'board': the rebuilt machine has other devices "
                          f"({', '.join(keys) or 'none'})")
    from kvmfw.checkpoint.writer import _plain

    for i, (d, b) in enumerate(zip(machine.devices, m.data["board"], strict=True)):
        if "params" in b and _plain(d.params) != b["params"]:
            raise _bad(where, f"field 'board'[{i}].params: the rebuilt {d.name} is "
                              "configured differently (another plugin version?)")


def check_host_files(machine: Machine, m: Manifest, trust: bool = False) -> None:
    """The host files the rebuilt devices read (a disk image) are the ones checkpointed
    and unchanged since (:meth:`~kvmfw.device.Device.host_files`): the guest's RAM holds
    its view of each. ``trust``: a changed file is only logged."""
    where = f"{m.file(fmt.MANIFEST)}: field 'host_files'"
    if "host_files" not in m.data:  # format 1.0: nothing recorded, nothing to compare
        log.info("%s: a format %s checkpoint records no host files: its disk images are "
                 "not checked", m.file(fmt.MANIFEST), m.data["version"])
        return
    recorded = m.data["host_files"]
    now = [(device_key(i, d), path) for i, d in enumerate(machine.devices)
           for path in d.host_files()]
    if [(h["device"], h["path"]) for h in recorded] != now:
        raise _bad(where, "the rebuilt devices read other host files ("
                          + (", ".join(f"{k}: {p}" for k, p in now) or "none") + ")")
    for i, h in enumerate(recorded):
        try:
            ident = fmt.file_identity(h["path"])
        except OSError as exc:
            raise _bad(f"{where}[{i}]", f"{h['device']}'s {h['path']}: {exc.strerror}") \
                from None
        if ident == {"size": h["size"], "mtime_ns": h["mtime_ns"]}:
            continue
        what = (f"{h['device']}'s {h['path']} changed since the checkpoint (size "
                f"{h['size']} -> {ident['size']} bytes, modified {h['mtime_ns']} -> "
                f"{ident['mtime_ns']} ns)")
        if trust:
            log.warning("%s; restoring anyway (trusted)", what)
            continue
        raise _bad(f"{where}[{i}]", f"{what}: the guest's RAM holds its view of that file, "
                   "which the file no longer matches. Put the file back as it was (a copy "
                   "made with the checkpoint: cp -p keeps its time), or restore with "
                   "--trust-host-files (Python: trust_host_files=True) to take it as it is")


def load_device_files(machine: Machine, m: Manifest) -> None:
    """Each device's files (:meth:`~kvmfw.device.Device.load_files`), verified already:
    the directory must hold exactly the files the manifest names for it."""
    named: dict[int, set[str]] = {}
    for rel in m.data["files"]:
        dev = _DEV_NAME.fullmatch(rel)
        if dev is not None:
            named.setdefault(int(dev.group(1)), set()).add(dev.group(2))
    for i, d in enumerate(machine.devices):
        where = m.file(fmt.dev_dir(i))
        try:
            present = set(os.listdir(where))
        except FileNotFoundError:
            present = set()
        except OSError as exc:
            raise CheckpointError(f"{where}: cannot read: {exc.strerror}") from None
        if present != named.get(i, set()):
            raise CheckpointError(f"{where}: holds {', '.join(sorted(present)) or 'nothing'}"
                                  f", the manifest names "
                                  f"{', '.join(sorted(named.get(i, ()))) or 'nothing'}")
        if present:
            d.load_files(where)


# --- mapping RAM ----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
MAP_FIXED = 0x10


def map_ram(machine: Machine, links: list[Manifest]) -> None:
    """Replace every region's pages with the checkpoint's: the full checkpoint's file
    mapped copy-on-write over the region (``MAP_PRIVATE | MAP_FIXED`` at the same host
    address, so the KVM memory slot stays valid and nothing is copied), then the pages of
    each incremental checkpoint copied in."""
    base = links[0]
    for i, region in enumerate(machine.memory):
        path = base.file(fmt.ram_file(i))
        fd = os.open(path, os.O_RDONLY)
        try:
            prot = mmap.PROT_READ | (0 if region.readonly else mmap.PROT_WRITE)
            got = _libc.mmap(region.host_addr, region.size, prot,
                             mmap.MAP_PRIVATE | MAP_FIXED, fd, 0)
            if got != region.host_addr:
                err = ctypes.get_errno()
                raise CheckpointError(f"{path}: cannot map it over guest RAM "
                                      f"({os.strerror(err)})")
        finally:
            os.close(fd)
        region.path, region.private = Path(path), True
    page = base.data["page_size"]
    for link in links[1:]:
        for i, region in enumerate(machine.memory):
            fd = os.open(link.file(fmt.ram_file(i)), os.O_RDONLY)
            try:
                view = region.view
                for s, e in _map_runs(link.file(fmt.ram_map(i)), region.size // page):
                    n = os.preadv(fd, [view[s * page:e * page]], s * page)
                    if n != (e - s) * page:
                        raise CheckpointError(f"{link.file(fmt.ram_file(i))}: truncated")
            finally:
                os.close(fd)


# --- restore -----------------------------------------------------------------------------------

def restore(path: str | os.PathLike[str], *, options: dict[str, Any] | None = None,
            arch_plugin: Any = None, device_registry: Any = None, kvm: Any = None,
            verify_ram: bool = True, setup: Callable[[Machine], None] | None = None,
            trust_host_files: bool = False) -> Machine:
    """Build a machine from the checkpoint at ``path`` and load its state; it continues
    at the next :meth:`~kvmfw.machine.Machine.run` as if never stopped.

    ``options``: host-side machine options given anew (``console_output``,
    ``console_input``, ``pseudo_op_dir``, ...). ``arch_plugin``: the arch plugin object
    when it is not installed as an entry point (tests). ``verify_ram`` False skips hashing
    guest RAM (sizes are still checked): for a checkpoint this process wrote and trusts.
    ``setup(machine)``: called on the rebuilt machine before any check, to add again what
    the original added in code rather than through its configuration
    (:meth:`~kvmfw.machine.Machine.add_device`, :meth:`~kvmfw.machine.Machine.map_device`).
    ``trust_host_files``: restore even when a device's host file (a disk image) changed
    since the checkpoint (:func:`check_host_files`; refused by default).
    """
    from kvmfw.machine import Machine
    from kvmfw.memory import PAGE_SIZE
    from kvmfw.plugins import host_arch

    links = chain(path)
    m = links[-1]
    arch = m.data["arch"]
    where = m.file(fmt.MANIFEST)
    if m.data["page_size"] != PAGE_SIZE:
        raise _bad(where, f"field 'page_size': {m.data['page_size']}-byte pages; this host "
                          f"maps guest RAM in {PAGE_SIZE}-byte pages")
    if arch_plugin is None and arch != host_arch():
        raise _bad(where, f"field 'arch': a checkpoint of a {arch} guest; this host's KVM "
                          f"runs {host_arch()} guests")
    given = getattr(arch_plugin, "arch_name", None)
    if callable(given) and given() != arch:
        raise _bad(where, f"field 'arch': a checkpoint of a {arch} guest, not {given()}")
    for link in links:
        verify(link, ram=verify_ram)
        check_plugins(link)
    state = load_state(m)
    cfg = machine_config(m, options)
    model = m.data.get("cpu_model")
    try:
        # the vCPUs get the checkpointed CPU, not this host's (the arch checks it first)
        machine = Machine(cfg, arch_plugin=arch_plugin, arch_name=arch,
                          device_registry=device_registry, kvm=kvm,
                          cpu_model=model if isinstance(model, dict) else None)
    except CheckpointError:
        raise
    except KvmfwError as exc:
        raise _bad(where, f"cannot rebuild the machine: {exc}") from exc
    except (TypeError, ValueError) as exc:  # a recorded value no part of kvmfw accepts
        raise _bad(where, f"field 'machine': cannot rebuild the machine: {exc}") from exc
    try:
        if setup is not None:
            setup(machine)
        if machine.arch != arch:
            raise _bad(where, f"field 'arch': a checkpoint of a {arch} guest, not "
                              f"{machine.arch}")
        check_machine(machine, m)
        check_host_files(machine, m, trust_host_files)
        if model is not None:
            why = machine.hooks.call("check_cpu_model", machine=machine, model=model)
            if why:
                raise _bad(where, f"field 'cpu_model': this host cannot give the guest its "
                                  f"CPU: {why}")
        map_ram(machine, links)
        load_device_files(machine, m)
        apply(machine, state, rollback=False)
    except BaseException as exc:
        machine.close()
        if isinstance(exc, KvmfwError) and not isinstance(exc, CheckpointError):
            raise CheckpointError(f"{m.file(fmt.STATE)}: {exc}") from exc
        raise
    machine._ckpt_parent = m  # type: ignore[attr-defined]  # an incremental chain's base
    return machine
