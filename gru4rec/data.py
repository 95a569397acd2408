"""Read, validate and sort session events into the canonical frame.

Canonical frame: `session_id` int64, `item_id` int64, `time` int64 or float64 (seconds), sorted by
(session_id, time) with ties kept in file order. This module is the one place that knows column
names, dtypes and the error messages for bad input.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from gru4rec.errors import UserError

SESSION, ITEM, TIME = "session_id", "item_id", "time"
# Where the benchmarks look for the real datasets (one folder each) by default: beside the checkout,
# relative to the current folder (make runs from the repository root).
BENCH_DATA_DIR = Path("../shared/data")
# Column names of the official GRU4Rec TSV files, recognised without any option.
OFFICIAL_KEYS = {"SessionId": SESSION, "ItemId": ITEM, "Time": TIME}


@dataclass(frozen=True)
class Keys:
    """Column names in the user's file (renamed to the canonical ones on read)."""

    session: str = SESSION
    item: str = ITEM
    time: str = TIME


def scan_events(path: str | Path, keys: Keys = Keys()) -> pl.LazyFrame:
    """Lazily open Parquet, TSV or CSV and rename the key columns; validation happens on collect."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a Parquet, TSV or CSV file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            lf = pl.scan_parquet(path)
        elif suffix in (".tsv", ".txt", ".dat"):
            lf = pl.scan_csv(path, separator="\t")
        elif suffix == ".csv":
            lf = pl.scan_csv(path)
        else:
            raise UserError(f"{path}: unknown file type '{suffix}' (use .parquet, .tsv/.txt or .csv)")
        columns = lf.collect_schema().names()
    except UserError:
        raise
    except Exception as e:  # polars raises many types for unreadable files
        raise UserError(f"{path}: cannot read file ({_first_line(e)})") from None
    sources = _key_columns(columns, keys, path)
    return lf.select(pl.col(src).alias(dst) for dst, src in sources.items())


def read_events(path: str | Path, keys: Keys = Keys()) -> pl.DataFrame:
    """Read, validate and sort a whole events file."""
    path = Path(path)
    try:
        df = scan_events(path, keys).select(SESSION, ITEM, TIME).collect()
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: cannot read file ({_first_line(e)})") from None
    return validate_events(df, str(path))


def validate_events(df: pl.DataFrame, source: str = "events") -> pl.DataFrame:
    """Check dtypes, nulls and emptiness; return the frame cast and sorted canonically."""
    missing = [c for c in (SESSION, ITEM, TIME) if c not in df.columns]
    if missing:
        raise UserError(f"{source}: missing column(s) {', '.join(missing)} (have: {', '.join(df.columns)})")
    df = df.select(SESSION, ITEM, TIME)
    if df.height == 0:
        raise UserError(f"{source}: no events (the file has a header but no rows)")
    for col in (SESSION, ITEM, TIME):
        n_null = df[col].null_count()
        if n_null:
            raise UserError(f"{source}: column '{col}' has {n_null} null value(s)")
    for col in (SESSION, ITEM):
        dtype = df[col].dtype
        if not dtype.is_integer():
            raise UserError(f"{source}: column '{col}' must hold integer ids, found {dtype}")
    tdtype = df[TIME].dtype
    if tdtype.is_temporal():
        df = df.with_columns(pl.col(TIME).dt.epoch("ms").cast(pl.Float64) / 1000.0)
    elif tdtype.is_float():
        if not df[TIME].is_finite().all():
            raise UserError(f"{source}: column '{TIME}' has NaN or infinite values")
        df = df.with_columns(pl.col(TIME).cast(pl.Float64))
    elif tdtype.is_integer():
        df = df.with_columns(pl.col(TIME).cast(pl.Int64))
    else:
        raise UserError(f"{source}: column '{TIME}' must be numeric seconds or a datetime, found {tdtype}")
    for col in (SESSION, ITEM):  # unsigned 64-bit ids may not fit
        if df[col].dtype == pl.UInt64 and df[col].max() > np.iinfo(np.int64).max:
            raise UserError(f"{source}: column '{col}' has ids larger than 2^63-1")
    df = df.with_columns(pl.col(SESSION).cast(pl.Int64), pl.col(ITEM).cast(pl.Int64))
    return sort_events(df)


def sort_events(df: pl.DataFrame) -> pl.DataFrame:
    """Stable sort by (session, time): events with equal times keep their file order."""
    return df.sort([SESSION, TIME], maintain_order=True)


def session_lengths(df: pl.DataFrame) -> pl.DataFrame:
    """One row per session: session_id, length, start time (sorted input not required)."""
    return df.group_by(SESSION).agg(pl.len().alias("length"), pl.col(TIME).min().alias("start"))


def fingerprint(df: pl.DataFrame) -> str:
    """A short content hash of the canonical frame, stored with models to tie them to their data."""
    h = hashlib.sha256()
    for col in (SESSION, ITEM, TIME):
        h.update(np.ascontiguousarray(df[col].to_numpy()).tobytes())
    return h.hexdigest()[:16]


def _key_columns(columns: list[str], keys: Keys, path: Path) -> dict[str, str]:
    """Canonical name -> the file's column that holds it. An explicitly named key must exist; the
    defaults fall back to the official SessionId/ItemId/Time headers."""
    named = {SESSION: keys.session, ITEM: keys.item, TIME: keys.time}
    if len(set(named.values())) < 3:
        raise UserError(
            f"--session-key, --item-key and --time-key must name three different columns "
            f"(got {keys.session!r}, {keys.item!r}, {keys.time!r})"
        )
    official = {dst: src for src, dst in OFFICIAL_KEYS.items()}
    sources, missing = {}, []
    for dst, src in named.items():
        if src in columns:
            sources[dst] = src
        elif src == dst and official[dst] in columns:
            sources[dst] = official[dst]
        else:
            missing.append(src)
    if missing:
        have = ", ".join(columns)
        have = have if len(have) <= 200 else have[:200] + "..."  # a binary file has one huge "column"
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (have: {have})")
    return sources


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
