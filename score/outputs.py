"""What scoring writes: the recommendations Parquet (streamed, chunk by chunk) and the metrics JSON.

Both appear atomically: the Parquet is written to a temporary file that is renamed over the
target only when every chunk has been written, so a failed run leaves no half file behind.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl

from gru4rec.data import ITEM, SESSION
from gru4rec.io import atomic_path, write_text_atomic
from gru4rec.items import ItemMap
from gru4rec.score.replay import ChunkResult


# One row per scored event, sorted by (session_id, position). `position` is the 0-based position of the input event in its session
# (after unknown items are dropped); `rank` is the target's rank under the run's tie mode.
# Ids are written in the user's dtype (Int64 or String), as they came in.
def recs_schema(session_dtype: pl.DataType = pl.Int64, item_dtype: pl.DataType = pl.Int64) -> dict:
    return {
        SESSION: session_dtype,
        "position": pl.Int64,
        ITEM: item_dtype,
        "next_item_id": item_dtype,
        "rank": pl.Float64,
        "rec_item_ids": pl.List(item_dtype),
        "rec_scores": pl.List(pl.Float32),
    }


RECS_SCHEMA = recs_schema()


def recs_frame(result: ChunkResult, items: ItemMap, ranks: np.ndarray, k: int) -> pl.DataFrame:
    sched, sessions = result.plan.schedule, result.plan.sessions
    top_idx = np.ascontiguousarray(result.topk_idx[:, :k])
    top_ids = items.to_series(top_idx, "rec_item_ids").reshape((len(top_idx), k)).arr.to_list()
    top_scores = np.ascontiguousarray(result.topk_scores[:, :k], dtype=np.float32)
    session_ids = pl.Series(SESSION, sessions.session_ids[sched.session])
    return pl.DataFrame(
        [
            session_ids,
            pl.Series("position", sched.position, dtype=pl.Int64),
            items.to_series(sched.inputs, ITEM),
            items.to_series(sched.targets, "next_item_id"),
            pl.Series("rank", ranks, dtype=pl.Float64),
            top_ids,
            pl.Series("rec_scores", top_scores, dtype=pl.Array(pl.Float32, k)).cast(pl.List(pl.Float32)),
        ]
    ).sort(SESSION, "position")  # replay order interleaves sessions; chunks come in session-id order


class RecsWriter:
    """Appends recommendation frames to one Parquet file as row groups."""

    def __init__(self, tmp_path: Path, schema: dict):
        self.tmp_path, self.schema = tmp_path, schema
        self._writer = None
        self.n_rows = 0

    def write(self, frame: pl.DataFrame) -> None:
        import pyarrow.parquet as pq

        table = frame.to_arrow()
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp_path, table.schema, compression="zstd")
        self._writer.write_table(table)
        self.n_rows += frame.height

    def close(self) -> None:
        if self._writer is None:  # nothing scored: still a valid, empty file
            pl.DataFrame(schema=self.schema).write_parquet(self.tmp_path)
        else:
            self._writer.close()


@contextlib.contextmanager
def open_recs(path: str | Path | None, schema: dict = RECS_SCHEMA) -> Iterator[RecsWriter | None]:
    """A RecsWriter whose file appears at `path` only if the block succeeds; None when no path."""
    if path is None:
        yield None
        return
    with atomic_path(path) as tmp:
        writer = RecsWriter(tmp, schema)
        try:
            yield writer
        finally:
            writer.close()


def _finite(x):
    """NaN/inf -> None so the JSON stays standard."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return x


def write_metrics_json(path: str | Path, report: dict) -> None:
    write_text_atomic(path, json.dumps(_finite(report), indent=2) + "\n")
