"""The item map: original item id <-> contiguous index 0..N-1, owned by a model.

Ids keep the user's type end to end: integers (int64) or strings; a model trained on one type refuses
data of the other instead of silently finding every item unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import polars as pl

from gru4rec.data import ITEM, SESSION
from gru4rec.errors import UserError

INDEX = "item_idx"


@dataclass(frozen=True)
class ItemMap:
    ids: np.ndarray  # [N]: ids[index] = original item id; int64, or object holding str

    def __post_init__(self) -> None:
        if self.ids.dtype != np.int64 and self.ids.dtype != object:
            object.__setattr__(self, "ids", np.asarray(self.ids, dtype=np.int64))
        if len(pl.Series(self.ids).unique()) != len(self.ids):
            raise UserError("item map has duplicate item ids")

    @classmethod
    def from_series(cls, s: pl.Series) -> ItemMap:
        if s.dtype == pl.String:
            return cls(np.array(s.to_list(), dtype=object))
        return cls(s.cast(pl.Int64).to_numpy().astype(np.int64))

    @classmethod
    def from_events(cls, events: pl.DataFrame) -> ItemMap:
        """Index items in order of first appearance in the (canonically ordered) training frame."""
        return cls.from_series(events[ITEM].unique(maintain_order=True))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def kind(self) -> str:
        """'int' or 'str': the type of the ids."""
        return "str" if self.ids.dtype == object else "int"

    @property
    def dtype(self) -> pl.DataType:
        return pl.String if self.kind == "str" else pl.Int64

    def series(self, name: str = ITEM) -> pl.Series:
        return pl.Series(name, self.ids, dtype=self.dtype)

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame([self.series(), pl.Series(INDEX, np.arange(len(self.ids), dtype=np.int64))])

    def check_kind(self, kind: str, source: str = "events") -> None:
        """Refuse data whose item ids ('int' or 'str') are of the other type than the model's."""
        if kind != self.kind:
            words = {"str": "string (String)", "int": "integer (Int64)"}
            raise UserError(
                f"{source}: item ids are {words[kind]} but the model was trained on {words[self.kind]} "
                "ids; give the ids as they were in the training data"
            )

    def translate(self, events: pl.DataFrame, source: str = "events") -> tuple[pl.DataFrame, int]:
        """Add `item_idx`; drop events of unknown items (the spec's protocol). Returns (frame, n_dropped).

        Events are dropped, not sessions: the neighbours of a removed event become consecutive.
        Row order is kept.
        """
        self.check_kind("str" if events[ITEM].dtype == pl.String else "int", source)
        out = events.join(self.frame(), on=ITEM, how="left", maintain_order="left")
        known = out.filter(pl.col(INDEX).is_not_null())
        return known, out.height - known.height

    @cached_property
    def index(self) -> dict:
        """id -> index as a dict, built once: one event's lookup (online serving) without a join."""
        return {x: i for i, x in enumerate(self.ids.tolist())}

    def to_ids(self, idx: np.ndarray) -> np.ndarray:
        return self.ids[idx]

    def to_series(self, idx: np.ndarray, name: str = ITEM) -> pl.Series:
        return pl.Series(name, self.ids[np.asarray(idx).ravel()], dtype=self.dtype)


def drop_short_sessions(events: pl.DataFrame, min_length: int = 2) -> pl.DataFrame:
    """Drop sessions with fewer than `min_length` events, keeping row order."""
    return events.filter(pl.len().over(SESSION) >= min_length)
