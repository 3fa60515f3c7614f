"""Sweeps: many variants of one checkpointed guest, each a task on Dask, results in one
table (see README "Sweeps" and :mod:`kvmfw.sweep.spec` for the spec).

::

    import kvmfw.sweep
    df = kvmfw.sweep.run("examples/sweep/sweep.toml", out="results")

The spec and the task need only the core; running a sweep needs the ``sweep`` extra
(``pip install 'kvmfw[sweep]'``: Dask distributed, pandas, pyarrow, tqdm).
"""

from __future__ import annotations

from .runner import run
from .spec import SweepSpec, Variant, load, parse

__all__ = ["SweepSpec", "Variant", "load", "parse", "run"]
