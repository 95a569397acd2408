"""The item map: first-appearance order, translation dropping unknown events, round trips."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from gru4rec.errors import UserError
from gru4rec.items import INDEX, ItemMap, drop_short_sessions


def events(rows):
    return pl.DataFrame(rows, schema=["session_id", "item_id", "time"], orient="row")


TRAIN = events([(1, 50, 1), (1, 7, 2), (1, 50, 3), (2, 9, 1), (2, 7, 2), (3, 1000, 5)])


def test_first_appearance_order_and_frame():
    m = ItemMap.from_events(TRAIN)
    assert m.ids.tolist() == [50, 7, 9, 1000] and m.ids.dtype == np.int64 and len(m) == 4
    assert m.frame().rows() == [(50, 0), (7, 1), (9, 2), (1000, 3)]
    assert m.to_ids(np.array([3, 0, 0, 1])).tolist() == [1000, 50, 50, 7]


def test_translate_drops_unknown_events_keeps_order_and_counts():
    m = ItemMap.from_events(TRAIN)
    test = events([(5, 9, 1), (5, 123, 2), (5, 50, 3), (6, 123, 1), (6, 456, 2), (4, 7, 9), (4, 1000, 10)])
    out, n_dropped = m.translate(test)
    # Reference: a dict lookup per row.
    lookup = {int(i): k for k, i in enumerate(m.ids)}
    want = [(s, i, t, lookup[i]) for s, i, t in test.rows() if i in lookup]
    assert out.select("session_id", "item_id", "time", INDEX).rows() == want
    assert n_dropped == 3
    assert m.to_ids(out[INDEX].to_numpy()).tolist() == out["item_id"].to_list()


def test_translate_large_random_matches_dict():
    rng = np.random.default_rng(1)
    ids = rng.choice(10**9, 5000, replace=False)
    m = ItemMap(ids.astype(np.int64))
    query = np.concatenate([rng.choice(ids, 3000), rng.integers(0, 10**9, 500)])
    rng.shuffle(query)
    df = pl.DataFrame(
        {"session_id": np.arange(len(query)) // 4, "item_id": query, "time": np.arange(len(query))}
    )
    out, n_dropped = m.translate(df)
    lookup = {int(i): k for k, i in enumerate(ids)}
    assert out[INDEX].to_list() == [lookup[int(q)] for q in query if int(q) in lookup]
    assert n_dropped == sum(int(q) not in lookup for q in query)


def test_duplicate_ids_rejected():
    with pytest.raises(UserError, match="duplicate"):
        ItemMap(np.array([1, 2, 1], dtype=np.int64))


def test_drop_short_sessions():
    df = events([(1, 1, 1), (2, 1, 1), (2, 2, 2), (3, 1, 1), (3, 2, 2), (3, 3, 3), (1, 5, 0)])
    assert drop_short_sessions(df).rows() == df.rows()  # session 1 has 2 events (not contiguous)
    assert drop_short_sessions(df, 3).rows() == [(3, 1, 1), (3, 2, 2), (3, 3, 3)]
    assert drop_short_sessions(df.head(1)).height == 0
