"""Dwell-time item boosting (Bogina & Kuflik 2017): long-viewed items repeat in the training sequence.

An event with dwell time d (seconds to the next event of the same session) is repeated
1 + floor(d / T) times, at most `cap` times; a session's last event has no dwell and stays single.
The repeats sit next to the original, so the model sees extra (item -> same item) pairs weighted
by attention. Training only; evaluation data is never boosted.
"""

from __future__ import annotations

import polars as pl

from gru4rec.data import SESSION, TIME


def boost(events: pl.DataFrame, threshold: float, cap: int) -> pl.DataFrame:
    """Repeat events by dwell time; `events` sorted by (session, time). threshold <= 0: unchanged."""
    if threshold <= 0:
        return events
    dwell = (pl.col(TIME).shift(-1).over(SESSION) - pl.col(TIME)).cast(pl.Float64)
    reps = (1 + (dwell / threshold).floor()).fill_null(1).clip(1, cap).cast(pl.Int64)
    out = events.with_columns(reps.alias("_reps"))
    return out.select(pl.exclude("_reps").repeat_by(out["_reps"]).explode())
