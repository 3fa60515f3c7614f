"""What a Dask task runs, in a worker process: restore the base checkpoint (copy-on-write:
guest RAM is mapped ``MAP_PRIVATE`` from the checkpoint's files, so every task shares the
page cache and writes only its own copies), hand the guest its parameters, run, collect one
row. Nothing here imports Dask: a task is a plain function of plain data, so it also runs
in-process (tests, the benchmark) and under any other executor.

The seam for running several variants from one restore (``Machine.fork()``): a task is
:func:`run_variants` over a list; today it restores once per variant, and with fork it can
restore once and fork a child machine per variant without changing its callers.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import time
from pathlib import Path
from typing import Any

from kvmfw.config import Source, check_run_config
from kvmfw.errors import KvmfwError, RunTimeoutError

from .spec import CONSOLE_TEXT, MAX_FILE_BYTES, PARAM_PREFIX


def variant_dir(out: str, key: str) -> Path:
    """The variant's own directory: its parameter files (the guest's pseudo-op readfile
    directory) and the files the guest writes."""
    return Path(out) / "variants" / key


def prepare_dir(out: str, key: str, params: dict[str, Any]) -> Path:
    """Create the variant's directory afresh and write a file per ``param.NAME``."""
    d = variant_dir(out, key)
    d.mkdir(parents=True, exist_ok=True)
    for f in d.iterdir():  # a retried task starts from its parameters only
        if f.is_file() or f.is_symlink():
            f.unlink()
    for k, v in params.items():
        if k.startswith(PARAM_PREFIX):
            text = str(v).lower() if isinstance(v, bool) else str(v)
            (d / k[len(PARAM_PREFIX):]).write_text(text)
    return d


def run_variants(job: dict[str, Any], variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``variants`` (dicts with ``variant``, ``rep``, ``key``, ``params``); one row
    each. The fork seam: see the module docstring."""
    return [run_variant(job, v) for v in variants]


def run_variant(job: dict[str, Any], v: dict[str, Any]) -> dict[str, Any]:
    """Run one variant and return its row; every failure is a row, never an exception."""
    row: dict[str, Any] = {"variant": v["variant"], "rep": v["rep"], "key": v["key"],
                           "host": socket.gethostname(), "pid": os.getpid(),
                           "error": "", "status": "error", "exit_status": None, "end": "",
                           "reason": ""}
    for k, val in v["params"].items():
        row[k] = val
    t0 = time.monotonic()
    try:
        _run(job, v, row)
    except KvmfwError as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a task never raises: the sweep goes on, the row says why
        row["error"] = f"internal error: {type(exc).__name__}: {exc}"
    row["host_seconds"] = round(time.monotonic() - t0, 6)
    return row


def _run(job: dict[str, Any], v: dict[str, Any], row: dict[str, Any]) -> None:
    from kvmfw.api import Console
    from kvmfw.machine import Machine

    params = v["params"]
    d = prepare_dir(job["out"], v["key"], params)
    raw = {k: val for k, val in params.items() if not k.startswith(PARAM_PREFIX)}
    # as `kvmfw run` reads the same keys from a TOML file (sizes, paths relative to the spec)
    run_opts = check_run_config(raw, set(raw), Source(job.get("spec_path")))
    timeout = float(run_opts.get("timeout", job["timeout"]))
    max_ticks = run_opts.get("max_ticks", job["max_ticks"])
    if run_opts.get("debug_flags"):
        from kvmfw import debug

        debug.enable(run_opts["debug_flags"])
    console = Console()
    host = {"console_output": console, "pseudo_op_dir": str(d)}
    t0 = time.monotonic()
    if job.get("checkpoint"):
        machine = Machine.restore(job["checkpoint"], options=host,
                                  verify_ram=job.get("verify_ram", False))
    else:
        machine = build_fresh(job["run"], run_opts, host)
    row["restore_seconds"] = round(time.monotonic() - t0, 6)
    with machine:
        # a guest's checkpoint request in a fresh boot goes to the variant's directory
        machine.checkpoint_dir = str(d)
        try:
            # hard: a run stuck past its timeout (a device blocked in a host call) ends the
            # worker process rather than hang the sweep; Dask retries it once, then the
            # row says KilledWorker
            result = machine.run(timeout=timeout, max_ticks=max_ticks, hard_timeout=True)
            row["exit_status"] = result.status
            row["end"] = result.end.value
            row["reason"] = result.reason
            row["status"] = "ok" if result.status in job["ok_status"] else "failed"
        except RunTimeoutError as exc:
            row["status"] = "timeout"
            row["end"] = "timeout"
            row["reason"] = str(exc)
        row["sim_seconds"] = machine.eventq.cur_tick / 1e12
        _collect(job, machine, console, d, row)


def build_fresh(base: dict[str, Any], run_opts: dict[str, Any], host: dict[str, Any]
                ) -> Any:
    """A machine booted from the kernel with the base's ``kvmfw run`` keys, overridden by
    the variant's (what ``kvmfw run`` would build from the same keys)."""
    from kvmfw.config import parse_options
    from kvmfw.machine import Machine, MachineConfig
    from kvmfw.plugins import host_arch, load_arch

    cfg = {**base, **run_opts}
    arch, plugin = load_arch(cfg.get("arch") or host_arch())
    options: dict[str, Any] = parse_options(cfg.get("option", []), arch, plugin)
    for k in ("cmdline", "initrd", "fw_cfg", "load_addr"):
        if cfg.get(k) is not None:
            options[k] = cfg[k]
    if cfg.get("no_reboot"):
        options["reboot"] = False
    options.update(host)
    mc = MachineConfig.from_run(cfg, arch, options)
    machine = Machine(mc, arch_plugin=plugin, arch_name=arch)
    try:
        machine.load_guest(str(cfg["kernel"]), **options)
    except BaseException:
        machine.close()
        raise
    return machine


def _collect(job: dict[str, Any], machine: Any, console: Any, d: Path,
             row: dict[str, Any]) -> None:
    if job["stats"]:
        machine.dump_stats()
        snap = machine.stats_dumps[-1]
        for key in job["stats"]:
            group, _, name = key.rpartition(".")
            row[f"stats.{key}"] = snap.get(group, {}).get(name)
    text = console.text
    for name, pat in job["console"].items():
        m = re.search(pat, text)
        row[f"console.{name}"] = None if m is None else (m.group(1) if m.groups()
                                                         else m.group(0))
    if job["console_text"]:
        row["console"] = text[-CONSOLE_TEXT:]
    for f in job["files"]:
        row[f"file.{f}"] = read_guest_file(d / f)


def read_guest_file(p: Path) -> str | None:
    """A file the guest wrote: at most :data:`MAX_FILE_BYTES`, regular files only (the
    guest named it; a symlink or FIFO there is not followed)."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    text = data[:MAX_FILE_BYTES].decode("utf-8", "replace")
    return text + ("\n[cut]" if len(data) > MAX_FILE_BYTES else "")


def boot_base(job: dict[str, Any]) -> str:
    """Boot the base kernel once and checkpoint it under ``out/base``: at the guest's
    checkpoint request (pseudo-op 0x43), at ``checkpoint_at``, or when the console shows
    ``until``. Returns the checkpoint directory."""
    from kvmfw.api import Console
    from kvmfw.checkpoint.api import next_path
    from kvmfw.errors import ConfigError

    base = job["base"]
    outdir = Path(job["out"]) / "base"
    outdir.mkdir(parents=True, exist_ok=True)
    console = Console()
    host: dict[str, Any] = {"console_output": console}
    if base["run"].get("pseudo_op_dir") is None:
        host["pseudo_op_dir"] = str(outdir)
    machine = build_fresh(base["run"], {}, host)
    with machine:
        machine.checkpoint_dir = str(outdir)
        machine.exit_after_checkpoint = True
        until = base.get("until")
        at = base.get("checkpoint_at")
        try:
            result = machine.run(timeout=base["boot_timeout"],
                                 max_ticks=at if at else None, until=until)
        except RunTimeoutError:
            raise ConfigError(f"booting the sweep's base took longer than boot_timeout "
                              f"{base['boot_timeout']} s without a checkpoint; console "
                              f"ends: {console.text[-200:]!r}") from None
        if machine.checkpoints_taken:
            return str(machine.checkpoints_taken[-1])
        if (until and result.end.value == "until") or (at and result.end.value ==
                                                       "tick-limit"):
            return str(machine.checkpoint(next_path(outdir, machine.eventq.cur_tick)))
        raise ConfigError(f"the sweep's base guest ended ({result.reason}, status "
                          f"{result.status}) before a checkpoint: make it ask for one "
                          "(pseudo-op checkpoint) or give [base] until/checkpoint_at")
