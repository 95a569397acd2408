"""Read a sessions file lazily, in chunks of whole sessions, so a file larger than memory scores.

One streaming pass counts events per session (one row per session is all that is held); sessions
are then cut, in session-id order, into id ranges of about `chunk_events` events, and each range
is collected on its own. A range filter on the session id is exact whatever the file's order, and
on a file sorted by session (the canonical layout) Parquet row-group statistics skip the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from gru4rec.data import ITEM, SESSION, TIME, Keys, scan_events, validate_events
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
        self.path = Path(path)
        self.lf = scan_events(self.path, keys).select(SESSION, ITEM, TIME)
        self._check_sample_and_nulls()
        lengths = self._collect(self.lf.group_by(SESSION).agg(pl.len().alias("n")).sort(SESSION))
        n = lengths["n"].to_numpy()
        self.stats = SourceStats(
            n_events=int(n.sum()),
            n_sessions=len(n),
            n_multi_sessions=int((n >= 2).sum()),
            max_length=int(n.max()),
        )
        if self.stats.n_multi_sessions == 0:
            raise UserError(
                f"{self.path}: every session has a single event; nothing to score (need >= 2 per session)"
            )
        self.ranges = _id_ranges(lengths[SESSION].to_numpy(), n, chunk_events)

    def chunks(self) -> Iterator[pl.DataFrame]:
        for lo, hi in self.ranges:
            df = self._collect(self.lf.filter(pl.col(SESSION).is_between(lo, hi)))
            yield validate_events(df, str(self.path))

    # ----------------------------------------------------------------------------------------------
    def _check_sample_and_nulls(self) -> None:
        # Dtype and emptiness errors come from the shared validator, on the first rows only.
        validate_events(self._collect(self.lf.head(1000)), str(self.path))
        # A null session id would escape every id range: count nulls over the whole file up front.
        nulls = self._collect(self.lf.select(pl.all().null_count())).row(0, named=True)
        for col, n_null in nulls.items():
            if n_null:
                raise UserError(f"{self.path}: column '{col}' has {n_null} null value(s)")

    def _collect(self, lf: pl.LazyFrame) -> pl.DataFrame:
        try:
            return lf.collect(engine="streaming")
        except UserError:
            raise
        except Exception as e:  # polars raises many types for unreadable or mistyped files
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"{self.path}: cannot read file ({first})") from None


def _id_ranges(ids: np.ndarray, lengths: np.ndarray, chunk_events: int) -> list[tuple[int, int]]:
    """Consecutive (first id, last id) ranges of sorted session ids, each about chunk_events events."""
    chunk = (np.cumsum(lengths) - 1) // chunk_events
    starts = np.flatnonzero(np.r_[True, chunk[1:] != chunk[:-1]])
    ends = np.r_[starts[1:], len(ids)] - 1
    return [(int(ids[s]), int(ids[e])) for s, e in zip(starts, ends, strict=True)]
