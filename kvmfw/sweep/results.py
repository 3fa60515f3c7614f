"""The results table, written as rows arrive so that a crash loses nothing finished:

* ``rows.jsonl``: the journal, one JSON row per line, flushed and fsync'd per row; the
  truth ``--resume`` reads (a torn last line from a crash is ignored);
* ``results.csv``: appended per row (rewritten from the journal when a sweep resumes);
* ``results.parquet``: rewritten (to a temporary file, then renamed) every few seconds and
  at the end, from every row so far.

A variant retried after a crash has one row: the newest row of a key wins.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Any

JOURNAL = "rows.jsonl"
CSV = "results.csv"
PARQUET = "results.parquet"
PARQUET_EVERY = 5.0
"""Seconds between Parquet rewrites while a sweep runs."""


def read_journal(out: Path) -> dict[str, dict[str, Any]]:
    """Every finished row in ``out``, by variant key (the newest row of a key wins)."""
    rows: dict[str, dict[str, Any]] = {}
    p = out / JOURNAL
    if not p.exists():
        return rows
    with open(p, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash: that variant runs again
            if isinstance(row, dict) and isinstance(row.get("key"), str):
                rows[row["key"]] = row
    return rows


class ResultsWriter:
    """Appends rows to the journal and the CSV; keeps the Parquet file current."""

    def __init__(self, out: Path, columns: list[str],
                 previous: dict[str, dict[str, Any]] | None = None) -> None:
        self.out = out
        self.columns = columns
        self.rows: dict[str, dict[str, Any]] = dict(previous or {})
        self._journal = open(out / JOURNAL, "a", encoding="utf-8")  # noqa: SIM115
        if self._journal.tell() and _last_byte(out / JOURNAL) != b"\n":
            self._journal.write("\n")  # end a line torn by a crash: the next row is whole
        # the CSV holds exactly the journal's rows, in the table's columns, from the start
        tmp = out / (CSV + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, columns, extrasaction="ignore")
            w.writeheader()
            for row in self.rows.values():
                w.writerow(_cells(row))
        os.replace(tmp, out / CSV)
        self._csv_file = open(out / CSV, "a", newline="", encoding="utf-8")  # noqa: SIM115
        self._csv = csv.DictWriter(self._csv_file, columns, extrasaction="ignore")
        self._parquet_at = 0.0
        self.write_parquet()

    def add(self, row: dict[str, Any]) -> None:
        self._journal.write(json.dumps(row, default=str) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())
        self._csv.writerow(_cells(row))
        self._csv_file.flush()
        self.rows[row["key"]] = row
        if time.monotonic() - self._parquet_at > PARQUET_EVERY:
            self.write_parquet()

    def frame(self) -> Any:
        """The table as a pandas DataFrame, ordered by variant and repetition."""
        import pandas as pd

        df = pd.DataFrame([_cells(r) for r in self.rows.values()], columns=self.columns)
        for c in df.columns:  # Parquet needs one type a column: mixed values become text
            kinds = {type(v) for v in df[c] if v is not None and not _isnan(v)}
            if len(kinds) > 1 and not kinds <= {int, float}:
                df[c] = [None if v is None or _isnan(v) else str(v) for v in df[c]]
        if len(df):
            df = df.sort_values(["variant", "rep"], kind="stable").reset_index(drop=True)
        return df

    def write_parquet(self) -> None:
        df = self.frame()
        tmp = self.out / (PARQUET + ".tmp")
        df.to_parquet(tmp, index=False)
        os.replace(tmp, self.out / PARQUET)
        self._parquet_at = time.monotonic()

    def close(self) -> None:
        self.write_parquet()
        self._journal.close()
        self._csv_file.close()


def _cells(row: dict[str, Any]) -> dict[str, Any]:
    """A row with every value a scalar (Parquet needs one type per column: parameters that
    mix types across variants are kept as text)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        out[k] = v if v is None or isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def _last_byte(p: Path) -> bytes:
    with open(p, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and v != v
