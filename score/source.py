"""Read sessions lazily, in chunks of whole sessions, so an input larger than memory scores.

Any layout `gru4rec.data` reads (file, folder, glob, hive dataset). One streaming pass counts events
per session (one row per session is all that is held); sessions are then cut, in session-id order,
into id ranges of about `chunk_events` events, and each range is collected on its own. A range filter
on the session id (integer or string) is exact whatever the files' order, and on files sorted by
session (the canonical layout) Parquet row-group statistics skip the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from gru4rec.data import ITEM, SESSION, Keys, id_dtype, open_events
from gru4rec.errors import UserError

DEFAULT_CHUNK_EVENTS = 1_000_000


@dataclass(frozen=True)
class SourceStats:
    n_events: int
    n_sessions: int
    n_multi_sessions: int  # sessions with >= 2 events (before unknown items are dropped)
    max_length: int


class SessionSource:
    """A sessions file opened lazily; `chunks()` yields validated, sorted frames of whole sessions."""

    def __init__(self, path: str | Path, keys: Keys = Keys(), chunk_events: int = DEFAULT_CHUNK_EVENTS):
        if chunk_events < 1:
            raise UserError(f"--chunk-events must be at least 1, got {chunk_events}")
        self.path = str(path)
        self.events = open_events(path, keys)
        self.lf = self.events.scan()
        self._check_sample_and_nulls()
        self.events.resolve_time_unit()  # one unit for every chunk
        if self.session_dtype == pl.Int64:
            self.ranges, self.stats = self._bucket_ranges(chunk_events)
        else:  # text ids have no cheap order-preserving buckets: exact per-session counts
            self.ranges, self.stats = self._exact_ranges(chunk_events)
        if self.stats.n_multi_sessions == 0:
            raise UserError(
                f"{self.path}: every session has a single event; nothing to score (need >= 2 per session)"
            )

    def chunks(self) -> Iterator[pl.DataFrame]:
        for lo, hi in self.ranges:
            df = self._collect(self.lf.filter(pl.col(SESSION).is_between(pl.lit(lo), pl.lit(hi))))
            if df.height:
                df = self.events.validate(df)
                yield df
            del df  # before the next range is read: one chunk alive at a time

    @property
    def item_kind(self) -> str:
        """'int' or 'str': the type of the item ids (checked against the model before any work)."""
        return id_dtype(self.lf.collect_schema()[ITEM])

    @property
    def session_dtype(self) -> pl.DataType:
        return pl.String if id_dtype(self.lf.collect_schema()[SESSION]) == "str" else pl.Int64

    # ----------------------------------------------------------------------------------------------
    def _exact_ranges(self, chunk_events: int) -> tuple[list[tuple], SourceStats]:
        """Ranges from the event count of every session (memory grows with the number of sessions)."""
        lengths = self._collect(self.lf.group_by(SESSION).agg(pl.len().alias("n")).sort(SESSION))
        n = lengths["n"].to_numpy()
        return _id_ranges(lengths[SESSION], n, chunk_events), _stats(n)

    def _bucket_ranges(self, chunk_events: int) -> tuple[list[tuple], SourceStats]:
        """Integer ids: events counted per bucket of equal id width (a few thousand buckets, not one
        row per session), consecutive buckets merged into ranges of about `chunk_events` events; the
        session statistics are then counted one range at a time. Memory is bounded by a range."""
        top = self._collect(
            self.lf.select(pl.col(SESSION).min().alias("lo"), pl.col(SESSION).max().alias("hi"), pl.len())
        ).row(0, named=True)
        lo, hi, n_events = int(top["lo"]), int(top["hi"]), int(top["len"])
        n_buckets = min(hi - lo + 1, max(4096, 64 * -(-n_events // chunk_events)))
        width = -(-(hi - lo + 1) // n_buckets)
        bucket = (pl.col(SESSION) // width).alias("b")  # floor division: no id - lo overflow
        counts = self._collect(self.lf.group_by(bucket).agg(pl.len().alias("n")).sort("b"))
        # each bucket holds the ids [b * width, b * width + width - 1], clipped to the ids present
        first = pl.Series([max(lo, int(b) * width) for b in counts["b"]])
        ranges = _id_ranges(first, counts["n"].to_numpy(), chunk_events)
        ranges = [(a, min(hi, (b // width) * width + width - 1)) for a, b in ranges]
        parts = [
            self._collect(
                self.lf.filter(pl.col(SESSION).is_between(a, b)).group_by(SESSION).len().select("len")
            )["len"].to_numpy()
            for a, b in ranges
        ]
        return ranges, _stats(np.concatenate(parts))

    def _check_sample_and_nulls(self) -> None:
        # Dtype and emptiness errors come from the shared validator, on the first rows only.
        self.events.validate(self._collect(self.lf.head(1000)))
        # A null session id would escape every id range: count nulls over the whole input up front.
        nulls = self._collect(self.lf.select(pl.all().null_count())).row(0, named=True)
        for col, n_null in nulls.items():
            if n_null:
                raise UserError(f"{self.path}: column {self.events.names[col]!r} has {n_null} null value(s)")

    def _collect(self, lf: pl.LazyFrame) -> pl.DataFrame:
        return self.events.collect(lf, streaming=True)


def _stats(n: np.ndarray) -> SourceStats:
    return SourceStats(
        n_events=int(n.sum()),
        n_sessions=len(n),
        n_multi_sessions=int((n >= 2).sum()),
        max_length=int(n.max()),
    )


def _id_ranges(ids: pl.Series, lengths: np.ndarray, chunk_events: int) -> list[tuple]:
    """Consecutive (first id, last id) ranges of sorted session ids (int or str), each about
    chunk_events events."""
    chunk = (np.cumsum(lengths) - 1) // chunk_events
    starts = np.flatnonzero(np.r_[True, chunk[1:] != chunk[:-1]])
    ends = np.r_[starts[1:], len(ids)] - 1
    return [(ids[int(s)], ids[int(e)]) for s, e in zip(starts, ends, strict=True)]
