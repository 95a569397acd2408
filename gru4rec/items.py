"""The item map: original item id <-> contiguous index 0..N-1, owned by a model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from gru4rec.data import ITEM, SESSION
from gru4rec.errors import UserError

INDEX = "item_idx"


@dataclass(frozen=True)
class ItemMap:
    ids: np.ndarray  # int64 [N]: ids[index] = original item id

    def __post_init__(self) -> None:
        if len(np.unique(self.ids)) != len(self.ids):
            raise UserError("item map has duplicate item ids")

    @classmethod
    def from_events(cls, events: pl.DataFrame) -> ItemMap:
        """Index items in order of first appearance in the (sorted) training frame, as the official code."""
        return cls(events[ITEM].unique(maintain_order=True).to_numpy().astype(np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame({ITEM: self.ids, INDEX: np.arange(len(self.ids), dtype=np.int64)})

    def translate(self, events: pl.DataFrame) -> tuple[pl.DataFrame, int]:
        """Add `item_idx`; drop events of unknown items (the spec's protocol). Returns (frame, n_dropped).

        Events are dropped, not sessions: the neighbours of a removed event become consecutive.
        Row order is kept.
        """
        out = events.join(self.frame(), on=ITEM, how="left", maintain_order="left")
        known = out.filter(pl.col(INDEX).is_not_null())
        return known, out.height - known.height

    def to_ids(self, idx: np.ndarray) -> np.ndarray:
        return self.ids[idx]


def drop_short_sessions(events: pl.DataFrame, min_length: int = 2) -> pl.DataFrame:
    """Drop sessions with fewer than `min_length` events, keeping row order."""
    return events.filter(pl.len().over(SESSION) >= min_length)
