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
RECS_SCHEMA = {
    SESSION: pl.Int64,
    "position": pl.Int64,
    ITEM: pl.Int64,
    "next_item_id": pl.Int64,
    "rank": pl.Float64,
    "rec_item_ids": pl.List(pl.Int64),
    "rec_scores": pl.List(pl.Float32),
}


def recs_frame(result: ChunkResult, items: ItemMap, ranks: np.ndarray, k: int) -> pl.DataFrame:
    sched, sessions = result.plan.schedule, result.plan.sessions
    top_ids = items.to_ids(result.topk_idx[:, :k])
    top_scores = np.ascontiguousarray(result.topk_scores[:, :k], dtype=np.float32)
    return pl.DataFrame(
        {
            SESSION: sessions.session_ids[sched.session],
            "position": sched.position,
            ITEM: items.to_ids(sched.inputs),
            "next_item_id": items.to_ids(sched.targets),
            "rank": ranks,
            "rec_item_ids": pl.Series(top_ids, dtype=pl.Array(pl.Int64, k)).cast(pl.List(pl.Int64)),
            "rec_scores": pl.Series(top_scores, dtype=pl.Array(pl.Float32, k)).cast(pl.List(pl.Float32)),
        },
        schema=RECS_SCHEMA,
    ).sort(SESSION, "position")  # replay order interleaves sessions; chunks come in session-id order


class RecsWriter:
    """Appends recommendation frames to one Parquet file as row groups."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
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
            pl.DataFrame(schema=RECS_SCHEMA).write_parquet(self.tmp_path)
        else:
            self._writer.close()


@contextlib.contextmanager
def open_recs(path: str | Path | None) -> Iterator[RecsWriter | None]:
    """A RecsWriter whose file appears at `path` only if the block succeeds; None when no path."""
    if path is None:
        yield None
        return
    with atomic_path(path) as tmp:
        writer = RecsWriter(tmp)
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
