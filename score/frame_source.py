"""Sessions already in memory (one shard of a distributed run) served like a `SessionSource`.

`score.scorer.replay_source` reads `stats`, `path` and `chunks()`; here the frame is validated and
sorted once and cut, at session boundaries, into chunks of about `chunk_events` events, so a large
shard replays in bounded memory exactly as a large file does. The session id's dtype does not matter.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from gru4rec.data import ITEM, SESSION
from gru4rec.score.source import DEFAULT_CHUNK_EVENTS, SourceStats


class FrameSource:
    def __init__(self, events: pl.DataFrame, name: str, chunk_events: int = DEFAULT_CHUNK_EVENTS):
        """`events`: the canonical frame (validated, sorted by session then time)."""
        self.path = name  # what messages call it
        self.events = events
        if events.height:
            starts = np.flatnonzero(np.r_[True, (events[SESSION][1:] != events[SESSION][:-1]).to_numpy()])
        else:
            starts = np.zeros(0, dtype=np.int64)
        lengths = np.diff(np.r_[starts, events.height])
        self.stats = SourceStats(
            n_events=events.height,
            n_sessions=len(starts),
            n_multi_sessions=int((lengths >= 2).sum()),
            max_length=int(lengths.max()) if len(lengths) else 0,
        )
        # chunk boundaries: the first session start at or past each multiple of chunk_events
        chunk = starts // max(1, chunk_events)
        first = np.flatnonzero(np.r_[True, chunk[1:] != chunk[:-1]]) if len(starts) else np.zeros(0, int)
        self._bounds = [int(b) for b in starts[first]] + [events.height]

    @property
    def item_kind(self) -> str:
        return "str" if self.events[ITEM].dtype == pl.String else "int"

    @property
    def session_dtype(self) -> pl.DataType:
        return self.events[SESSION].dtype

    def chunks(self):
        for lo, hi in zip(self._bounds[:-1], self._bounds[1:]):
            yield self.events.slice(lo, hi - lo)
