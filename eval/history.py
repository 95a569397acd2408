"""The nightly history: one Parquet row per run (metrics and latency figures), appended atomically.

A history that cannot be read is never rewritten: the run stops with a UserError (exit 2) and the
file stays exactly as it was, so a bad disk or a stray edit cannot silently erase past runs.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from gru4rec.errors import UserError
from gru4rec.io import write_parquet_atomic

KEYS = ("run_id", "time", "status")


def read_history(path: str | Path) -> pl.DataFrame:
    """All past runs in file order; an empty frame when the file does not exist yet."""
    path = Path(path)
    if not path.exists():
        return pl.DataFrame(schema={k: pl.String for k in KEYS})
    hint = "it was left untouched; restore it from a backup or move it away to start a new history"
    try:
        df = pl.read_parquet(path)
    except Exception as e:  # polars/arrow raise several types for a damaged file
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: history file is not readable Parquet ({msg}); {hint}") from None
    missing = [k for k in KEYS if k not in df.columns]
    if missing:
        raise UserError(f"{path}: not a nightly history (missing column(s) {', '.join(missing)}); {hint}")
    return df


def append_run(path: str | Path, history: pl.DataFrame, row: dict) -> pl.DataFrame:
    """`history` plus `row`, written over `path` atomically; columns new to either side are filled with null."""
    new = pl.DataFrame([row])
    combined = pl.concat([history, new], how="diagonal_relaxed") if history.height else new
    write_parquet_atomic(combined, path)
    return combined


def upsert_runs(path: str | Path, history: pl.DataFrame, rows: list[dict],
                key: tuple[str, ...] | None = None) -> pl.DataFrame:  # fmt: skip
    """`history` plus `rows`, written atomically. With `key` (window runs: as_of, role) a row replaces
    the earlier row with the same key values instead of adding one, and rows are kept in key order,
    so a backfill or a re-run of a day leaves exactly one row per day and role."""
    new = pl.DataFrame(rows)
    if key is None:
        combined = pl.concat([history, new], how="diagonal_relaxed") if history.height else new
    else:
        old = history
        if history.height and all(k in history.columns for k in key):
            same = pl.lit(False)
            for r in rows:
                match = pl.lit(True)
                for k in key:
                    match = match & (pl.col(k).fill_null("") == r.get(k, ""))
                same = same | match
            old = history.filter(~same)
        combined = pl.concat([old, new], how="diagonal_relaxed") if old.height else new
        combined = combined.sort([pl.col(k).fill_null("") for k in key], maintain_order=True)
    write_parquet_atomic(combined, path)
    return combined
