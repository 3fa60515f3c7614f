"""Run a sweep on Dask: one task per variant (and repetition), rows written as they come.

By default a ``LocalCluster`` on this machine: one single-threaded worker *process* per
core (a machine's KVM file descriptors, vCPU threads and kick signals belong to one
process; processes also keep one guest's crash from taking the others with it). With
``scheduler`` an existing cluster (``dask-scheduler``/``dask-jobqueue``); its workers need
kvmfw and /dev/kvm and must see ``--out`` and the checkpoint at the same path.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvmfw.errors import ConfigError

from . import spec as specmod
from .results import JOURNAL, ResultsWriter, read_journal
from .task import boot_base, run_variant

ALLOWED_FAILURES = 1
"""Times a task may lose its worker before its row says so: retried once (Dask's
``distributed.scheduler.allowed-failures``)."""


def need_dask() -> None:
    """Raise a one-line :class:`ConfigError` when the ``sweep`` extra is missing."""
    try:
        import distributed  # noqa: F401
        import pandas  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"kvmfw sweep needs Dask, pandas and pyarrow ({exc.name} is "
                          "missing): pip install 'kvmfw[sweep]'") from None


def run(spec: Any, *, out: str | os.PathLike[str], resume: bool = False,
        retry_failed: bool = False, scheduler: str | None = None, client: Any = None,
        workers: int | None = None,
        progress: bool = True, on_row: Callable[[dict[str, Any]], None] | None = None,
        echo: Callable[[str], None] | None = None) -> Any:
    """Run ``spec`` (a path, a dict as TOML gives it, or a :class:`SweepSpec`) and return
    the results table (a pandas DataFrame, also written under ``out``).

    ``resume``: keep ``out``'s finished rows and run only the variants without one;
    with ``retry_failed`` also those whose row is not ``ok`` (failed, timeout, error: the
    new row replaces it).
    ``scheduler``: the address of an existing Dask scheduler; ``client``: a
    ``distributed.Client`` to use as is; neither: a LocalCluster of ``workers`` processes
    (default: one per core). ``on_row(row)`` is called in this process for every new row.
    """
    need_dask()
    s = _spec(spec)
    outdir = Path(out)
    say = echo or (lambda text: print(text, file=sys.stderr, flush=True))
    if s.base.get("checkpoint"):
        verify_once(s.base["checkpoint"])
    if (outdir / JOURNAL).exists() and not resume:
        raise ConfigError(f"--out {outdir} already holds a sweep's results: add --resume to "
                          "continue it, or give another directory")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create --out {outdir}: {exc.strerror}") from None
    previous = read_journal(outdir) if resume else {}
    todo = [v for v in s.variants if v.key not in previous
            or (retry_failed and previous[v.key].get("status") != "ok")]
    writer = ResultsWriter(outdir, s.columns(), {k: r for k, r in previous.items()
                                                 if k in {v.key for v in s.variants}})
    try:
        if not todo:
            say(f"sweep: all {len(s.variants)} variants already have rows in {outdir}; "
                "nothing to run")
            return writer.frame()
        with _client(client, scheduler, workers) as c:
            link = _dashboard(c)
            if link:
                say(f"sweep: Dask dashboard at {link}")
            job = _job(s, outdir, c, resume)
            _sweep(c, job, todo, writer, progress, on_row, say)
        return writer.frame()
    finally:
        writer.close()


def _spec(spec: Any) -> specmod.SweepSpec:
    if isinstance(spec, specmod.SweepSpec):
        return spec
    if isinstance(spec, dict):
        return specmod.parse(spec)
    return specmod.load(spec)


@contextlib.contextmanager
def _client(client: Any, scheduler: str | None, workers: int | None) -> Any:
    from distributed import Client

    if client is not None:
        yield client
        return
    if scheduler is not None:
        try:
            c = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {scheduler}: {exc} "
                              "(is dask-scheduler running there?)") from None
        with c:
            yield c
        return
    with local_client(workers) as c:
        yield c


@contextlib.contextmanager
def local_client(workers: int | None = None) -> Any:
    """A client of a new LocalCluster: ``workers`` single-threaded worker processes
    (default one per core), a task retried once when its worker dies."""
    import dask
    from distributed import Client, LocalCluster

    n = workers or os.cpu_count() or 1
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
                          "distributed.worker.daemon": False}):
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address="127.0.0.1:0",
                               silence_logs=40)
        with cluster, Client(cluster) as c:
            yield c


def _dashboard(c: Any) -> str | None:
    with contextlib.suppress(Exception):
        if c.scheduler_info().get("services", {}).get("dashboard"):
            return str(c.dashboard_link)
    return None


def _job(s: specmod.SweepSpec, outdir: Path, c: Any, resume: bool) -> dict[str, Any]:
    """What every task needs (plain data): the checkpoint (booting the base once first if
    the spec gives a kernel), where to write, limits, what to collect."""
    job: dict[str, Any] = {"out": str(outdir.resolve()), "timeout": s.timeout,
                           "max_ticks": s.max_ticks, "ok_status": s.ok_status,
                           "stats": s.stats, "console": s.console, "files": s.files,
                           "console_text": s.console_text, "base": s.base,
                           "spec_path": str(s.path) if s.path is not None else None}
    if s.base.get("checkpoint"):
        job["checkpoint"] = s.base["checkpoint"]  # verified in run(), before a cluster
    elif s.fresh:
        job["run"] = s.base["run"]
    else:
        done = sorted((outdir / "base").glob("cpt.*/manifest.json")) if resume else []
        if done:
            job["checkpoint"] = str(done[-1].parent)
        else:
            fut = c.submit(boot_base, job, pure=False, key="kvmfw-sweep-base")
            job["checkpoint"] = fut.result()
    return job


def verify_once(path: str) -> None:
    """Check the checkpoint (every file's size and checksum, guest RAM included) here,
    once: a broken one is one line before any task, and the tasks restore it trusting its
    RAM (``verify_ram=False``) instead of hashing it once per variant."""
    from kvmfw.checkpoint.reader import chain, verify

    for link in chain(path):
        verify(link, ram=True)


def _sweep(c: Any, job: dict[str, Any], todo: list[specmod.Variant], writer: ResultsWriter,
           progress: bool, on_row: Callable[[dict[str, Any]], None] | None,
           say: Callable[[str], None]) -> None:
    from distributed import as_completed

    t0 = time.monotonic()
    futures = {}
    for v in todo:
        vd = {"variant": v.index, "rep": v.rep, "key": v.key, "params": v.params}
        f = c.submit(run_variant, job, vd, pure=False, key=f"kvmfw-sweep-{v.key}")
        futures[f] = vd
    slots = max(1, sum(c.nthreads().values()))
    counts = {"ok": 0, "failed": 0, "timeout": 0, "error": 0}
    bar = _bar(len(todo), progress)
    try:
        for f in as_completed(futures):
            vd = futures[f]
            try:
                row = f.result()
            except Exception as exc:  # the task's worker died twice: KilledWorker
                row = _error_row(vd, exc)
            writer.add(row)
            counts[row["status"] if row["status"] in counts else "error"] += 1
            if on_row is not None:
                on_row(row)
            if bar is not None:
                done = sum(counts.values())
                bar.set_postfix_str(f"ok {counts['ok']} failed "
                                    f"{done - counts['ok']} running "
                                    f"{min(slots, len(todo) - done)}", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    dt = time.monotonic() - t0
    n = sum(counts.values())
    say(f"sweep: {n} variants in {dt:.1f} s ({n / dt if dt else 0:.2f}/s): "
        f"{counts['ok']} ok, {counts['failed']} failed, {counts['timeout']} timeout, "
        f"{counts['error']} error; table: {writer.out / 'results.parquet'} (and .csv)")


def _error_row(vd: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    import socket

    name = type(exc).__name__
    why = ("its worker died twice (retried once on another worker)"
           if name == "KilledWorker" else str(exc))
    return {"variant": vd["variant"], "rep": vd["rep"], "key": vd["key"], **vd["params"],
            "status": "error", "exit_status": None, "end": "", "reason": "",
            "error": f"{name}: {why}", "host": socket.gethostname(), "pid": None}


def _bar(total: int, progress: bool) -> Any:
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="variant", desc="sweep", file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)
