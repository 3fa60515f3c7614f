"""The sweep spec (TOML): what to run, which variants, what to collect. Everything is
checked here, in the process that starts the sweep, before any task is submitted: a bad
spec is one :class:`~kvmfw.errors.ConfigError` line, never a half-started sweep.

::

    [base]                      # where every variant starts: one of
    checkpoint = "ckpts/cpt.X"  #   an existing checkpoint directory (on a shared path), or
    kernel = "guest.elf"        #   a kernel booted once (with these kvmfw run keys) until
    options = { memory = "64M" }#   the guest asks for a checkpoint (pseudo-op 0x43), or
    checkpoint_at = 5000000     #   this simulated tick, or
    until = "ready"             #   this console text; then checkpointed under --out
    boot = "checkpoint"         # "fresh": no checkpoint, every variant boots the kernel

    [grid]                      # the cartesian product of these lists ...
    "param.n" = [1, 2, 3]       # param.NAME: a file NAME the guest reads (pseudo-op readfile)
    timeout = [5, 10]           # any other name: a `kvmfw run` key (cmdline, max_ticks, ...)
    [[variant]]                 # ... and/or these variants, one table each
    "param.n" = 7

    [collect]
    stats = ["system.cpu0.vm_exits"]            # statistics keys (group.key)
    console = { square = 'square=(\\d+)' }      # regular expressions: group 1 (or the match)
    files = ["result.txt"]                      # files the guest wrote (pseudo-op writefile)
    console_text = false                        # the whole console (newest 4 KiB) too

    [limits]
    timeout = 60                # host seconds per variant (a run option may override it)
    max_ticks = 0               # simulated ticks per variant (0: none)
    repetitions = 1
    ok_status = [0]             # guest exit statuses that count as "ok"
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmfw.config import RESTORE_KEYS, RUN_KEYS, Source, check_run_config
from kvmfw.errors import ConfigError, KvmfwError

MAX_VARIANTS = 1_000_000
"""Variants (times repetitions) one sweep may hold: a typo in a grid must not make a
host allocation the size of a galaxy."""
MAX_PARAM_BYTES = 1 << 20
"""Bytes of one guest parameter value (it is written to a file the guest reads)."""
MAX_FILE_BYTES = 64 << 10
"""Bytes of one collected guest file kept in its row (more is cut, and the row says so)."""
CONSOLE_TEXT = 4096
"""Bytes of console text kept in a row with ``console_text``."""

PARAM_PREFIX = "param."
_PARAM_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
SWEEP_KEYS = ("base", "grid", "variant", "collect", "limits")
BASE_KEYS = ("checkpoint", "kernel", "options", "checkpoint_at", "until", "boot",
             "boot_timeout")
COLLECT_KEYS = ("stats", "console", "files", "console_text")
LIMIT_KEYS = ("timeout", "max_ticks", "repetitions", "ok_status")
# run keys a variant may not set: the sweep owns them (console, stats file, checkpoints, gdb)
_SWEEP_OWNED = {"console", "stats", "restore", "pseudo_op_dir", "gdb", "gdb_default",
                "gdb_wait", "checkpoint_at", "checkpoint_on", "checkpoint_dir",
                "exit_after_checkpoint", "checkpoint_incremental", "no_summary"}


@dataclass
class Variant:
    """One run: its index in the sweep, repetition, parameters, and the stable key that
    names its row (so ``--resume`` finds it whatever the order)."""

    index: int
    rep: int
    params: dict[str, Any]
    key: str


@dataclass
class SweepSpec:
    path: Path | None
    base: dict[str, Any]
    variants: list[Variant]
    stats: list[str] = field(default_factory=list)
    console: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    console_text: bool = False
    timeout: float = 60.0
    max_ticks: int | None = None
    repetitions: int = 1
    ok_status: list[int] = field(default_factory=lambda: [0])
    param_names: list[str] = field(default_factory=list)

    @property
    def fresh(self) -> bool:
        """Every variant boots the kernel (no checkpoint)."""
        return self.base.get("boot") == "fresh"

    def columns(self) -> list[str]:
        """The table's columns, in order (fixed by the spec: the CSV is appended to)."""
        cols = ["variant", "rep", "key"] + self.param_names
        cols += ["status", "exit_status", "end", "reason", "error"]
        cols += [f"stats.{k}" for k in self.stats]
        cols += [f"console.{k}" for k in self.console]
        if self.console_text:
            cols.append("console")
        cols += [f"file.{f}" for f in self.files]
        cols += ["sim_seconds", "host_seconds", "restore_seconds", "host", "pid"]
        return cols


def _err(where: str, text: str) -> ConfigError:
    return ConfigError(f"sweep spec {where}: {text}")


def load(path: str | os.PathLike[str]) -> SweepSpec:
    """Read and check the spec file at ``path`` (relative paths in it are relative to it)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"sweep spec {p} does not exist (give a TOML file)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read sweep spec {p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"sweep spec {p}: not valid TOML: {exc}") from None
    return parse(raw, p)


def parse(raw: dict[str, Any], path: Path | None = None) -> SweepSpec:
    """Check a spec given as a dict (as :func:`tomllib.load` gives it)."""
    where = str(path) if path is not None else "<dict>"
    root = path.parent if path is not None else Path.cwd()
    if not isinstance(raw, dict):
        raise _err(where, "must be a table")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise _err(where, f"unknown section(s) {', '.join(unknown)} (known: "
                          f"{', '.join(SWEEP_KEYS)})")
    base = _base(raw.get("base"), where, root)
    collect = _table(raw, "collect", where, COLLECT_KEYS)
    limits = _table(raw, "limits", where, LIMIT_KEYS)
    spec = SweepSpec(path=path, base=base, variants=[])
    spec.stats = _strings(collect.get("stats", []), f"{where} [collect] stats")
    cons = collect.get("console", {})
    if not isinstance(cons, dict):
        raise _err(where, "[collect] console must be a table name = 'regular expression'")
    for name, pat in cons.items():
        if not isinstance(pat, str):
            raise _err(where, f"[collect] console.{name} must be a string")
        try:
            re.compile(pat)
        except re.error as exc:
            raise _err(where, f"[collect] console.{name}: bad regular expression: "
                              f"{exc}") from None
    spec.console = dict(cons)
    spec.files = _strings(collect.get("files", []), f"{where} [collect] files")
    for f in spec.files:
        if not _PARAM_NAME.match(f) or f in (".", ".."):
            raise _err(where, f"[collect] files: {f!r} is not a plain file name in the "
                              "variant's directory")
    spec.console_text = _bool(collect.get("console_text", False), f"{where} console_text")
    spec.timeout = _positive(limits.get("timeout", 60), f"{where} [limits] timeout", float)
    mt = limits.get("max_ticks", 0)
    spec.max_ticks = int(_positive(mt, f"{where} [limits] max_ticks", int, zero=True)) or None
    spec.repetitions = int(_positive(limits.get("repetitions", 1),
                                     f"{where} [limits] repetitions", int))
    ok = limits.get("ok_status", [0])
    if not isinstance(ok, list) or not all(isinstance(x, int) and not isinstance(x, bool)
                                           for x in ok):
        raise _err(where, "[limits] ok_status must be a list of whole numbers")
    spec.ok_status = ok
    spec.variants, spec.param_names = _variants(raw, where, root, spec)
    return spec


def _table(raw: dict[str, Any], name: str, where: str, keys: tuple[str, ...]
           ) -> dict[str, Any]:
    t = raw.get(name, {})
    if not isinstance(t, dict):
        raise _err(where, f"[{name}] must be a table")
    unknown = sorted(set(t) - set(keys))
    if unknown:
        raise _err(where, f"[{name}]: unknown key(s) {', '.join(unknown)} (known: "
                          f"{', '.join(keys)})")
    return t


def _strings(v: Any, what: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"sweep spec {what} must be a list of strings")
    return list(v)


def _bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"sweep spec {what} must be true or false")
    return v


def _positive(v: Any, what: str, kind: type, zero: bool = False) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and
                                                                   not isinstance(v, int)):
        raise ConfigError(f"sweep spec {what} must be a {'whole ' if kind is int else ''}"
                          "number")
    if v < 0 or (v == 0 and not zero) or v > (1 << 63) - 1:
        raise ConfigError(f"sweep spec {what} {v} is out of range (> 0)")
    return kind(v)


def _base(b: Any, where: str, root: Path) -> dict[str, Any]:
    if not isinstance(b, dict):
        raise _err(where, "needs a [base] table: checkpoint = DIR, or kernel = FILE")
    unknown = sorted(set(b) - set(BASE_KEYS))
    if unknown:
        raise _err(where, f"[base]: unknown key(s) {', '.join(unknown)} (known: "
                          f"{', '.join(BASE_KEYS)})")
    out: dict[str, Any] = {}
    boot = b.get("boot", "checkpoint")
    if boot not in ("checkpoint", "fresh"):
        raise _err(where, f"[base] boot {boot!r}: give \"checkpoint\" or \"fresh\"")
    out["boot"] = boot
    if "checkpoint" in b:
        if "kernel" in b or "options" in b:
            raise _err(where, "[base] checkpoint and kernel/options exclude each other (the "
                              "checkpoint holds the machine and the guest)")
        if not isinstance(b["checkpoint"], str) or not b["checkpoint"]:
            raise _err(where, "[base] checkpoint must be a directory path")
        ck = root / os.path.expanduser(b["checkpoint"])
        if not (ck / "manifest.json").is_file():
            raise _err(where, f"[base] checkpoint {ck} is not a checkpoint (no "
                              "manifest.json; take one with kvmfw run --checkpoint-dir)")
        out["checkpoint"] = str(ck.resolve())
        if boot == "fresh":
            raise _err(where, "[base] boot = \"fresh\" needs a kernel, not a checkpoint")
        return out
    if "kernel" not in b:
        raise _err(where, "[base] needs checkpoint = DIR or kernel = FILE")
    opts = b.get("options", {})
    if not isinstance(opts, dict):
        raise _err(where, "[base] options must be a table of kvmfw run keys")
    raw = {**opts, "kernel": b["kernel"]}
    owned = sorted(set(raw) & _SWEEP_OWNED)
    if owned:
        raise _err(where, f"[base] options: {', '.join(owned)} is set by the sweep itself")
    src = Source(where if where != "<dict>" else str(root / "spec.toml"))
    try:
        out["run"] = check_run_config(raw, set(raw), src)
    except KvmfwError as exc:  # a missing kernel (ImageError) is a bad spec too
        raise _err(where, f"[base] {exc}") from None
    for k in ("checkpoint_at", "until", "boot_timeout"):
        if k in b:
            out[k] = b[k]
    if "checkpoint_at" in b:
        out["checkpoint_at"] = int(_positive(b["checkpoint_at"], f"{where} [base] "
                                             "checkpoint_at", int, zero=True))
    if "until" in b and (not isinstance(b["until"], str) or not b["until"]):
        raise _err(where, "[base] until must be non-empty console text")
    out["boot_timeout"] = _positive(b.get("boot_timeout", 600), f"{where} [base] "
                                    "boot_timeout", float)
    return out


def _variants(raw: dict[str, Any], where: str, root: Path, spec: SweepSpec
              ) -> tuple[list[Variant], list[str]]:
    grid = raw.get("grid", None)
    listed = raw.get("variant", None)
    if grid is None and listed is None:
        raise _err(where, "no variants: give a [grid] of lists or [[variant]] tables")
    combos: list[dict[str, Any]] = []
    if grid is not None:
        if not isinstance(grid, dict):
            raise _err(where, "[grid] must be a table of name = [values]")
        if not grid:
            raise _err(where, "[grid] is empty: give name = [values, ...]")
        n = 1
        for k, vals in grid.items():
            if not isinstance(vals, list) or not vals:
                raise _err(where, f"[grid] {k}: give a non-empty list of values")
            n *= len(vals)
            if n * spec.repetitions > MAX_VARIANTS:
                raise _err(where, f"[grid] has more than {MAX_VARIANTS} variants")
        keys = list(grid)
        combos += [dict(zip(keys, vs, strict=True)) for vs in itertools.product(*grid.values())]
    if listed is not None:
        if not isinstance(listed, list) or not all(isinstance(v, dict) for v in listed):
            raise _err(where, "[[variant]] must be tables")
        if not listed:
            raise _err(where, "[[variant]] is empty")
        combos += [dict(v) for v in listed]
    if len(combos) * spec.repetitions > MAX_VARIANTS:
        raise _err(where, f"more than {MAX_VARIANTS} variants")
    names: list[str] = []
    for c in combos:
        for k in c:
            if k not in names:
                names.append(k)
    for k in names:
        _check_param(k, where, spec)
    src = Source(where if where != "<dict>" else str(root / "spec.toml"))
    out: list[Variant] = []
    seen: set[str] = set()
    for i, c in enumerate(combos):
        for k, v in c.items():
            _check_value(k, v, where, src)
        for rep in range(spec.repetitions):
            key = variant_key(c, rep)
            if key in seen:
                raise _err(where, f"variant {c} appears twice (give each once; use "
                                  "[limits] repetitions to repeat)")
            seen.add(key)
            out.append(Variant(i, rep, c, key))
    return out, names


def _check_param(k: str, where: str, spec: SweepSpec) -> None:
    if k.startswith(PARAM_PREFIX):
        name = k[len(PARAM_PREFIX):]
        if not _PARAM_NAME.match(name) or name in (".", ".."):
            raise _err(where, f"{k}: a guest parameter is written to a file of that name; "
                              "use letters, digits, '_', '-', '.'")
        if name in spec.files:
            raise _err(where, f"{k}: also a collected file; give them different names")
        return
    if k in _SWEEP_OWNED:
        raise _err(where, f"{k} is set by the sweep itself and cannot vary")
    if k not in RUN_KEYS:
        raise _err(where, f"unknown option {k!r}: not a kvmfw run key (known: "
                          f"{', '.join(x for x in RUN_KEYS if x not in _SWEEP_OWNED)}) and "
                          f"not {PARAM_PREFIX}NAME (a value for the guest)")
    if not spec.fresh and k not in RESTORE_KEYS:
        raise _err(where, f"{k} is fixed by the checkpoint every variant restores; vary it "
                          "with [base] boot = \"fresh\" (each variant boots the kernel)")


def _check_value(k: str, v: Any, where: str, src: Source) -> None:
    if k.startswith(PARAM_PREFIX):
        if isinstance(v, (dict, list)):
            raise _err(where, f"{k}: give a string, number or boolean, not {type(v).__name__}")
        if len(str(v).encode()) > MAX_PARAM_BYTES:
            raise _err(where, f"{k}: value longer than {MAX_PARAM_BYTES} bytes")
        return
    try:
        check_run_config({k: v}, {k}, src)
    except KvmfwError as exc:
        raise _err(where, str(exc)) from None


def variant_key(params: dict[str, Any], rep: int) -> str:
    """A stable name for (parameters, repetition): the same on every run of the spec."""
    text = json.dumps([sorted((k, repr(v)) for k, v in params.items()), rep])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
