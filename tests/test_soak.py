"""A small soak (benchmarks/soak.py runs the full 10^6 exits): 2 vCPUs in parallel mode,
several runs; open fds, mappings and threads stay flat, memory does not grow with exits."""

from __future__ import annotations

import sys
from pathlib import Path

from kvmtest import needs_kvm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from soak import soak  # noqa: E402

pytestmark = needs_kvm


def test_parallel_runs_leave_fds_mappings_and_threads_flat() -> None:
    r = soak(20_000, 5, cpus=2)
    assert r["exits"] >= 20_000
    start = r["start"]
    for after in r["per_run"]:  # (a thread or fd left by an earlier test may go away)
        assert after["fds"] <= start["fds"], r["per_run"]
        assert after["threads"] <= start["threads"], r["per_run"]
        assert after["maps"] <= start["maps"] + 4, r["per_run"]  # (allocator arenas)
    assert r["end"]["rss_kib"] - start["rss_kib"] < 8 * 1024
