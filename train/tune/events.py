"""The events a study searches on: TRAIN, its validation part and what evaluating on it drops."""

from __future__ import annotations

import polars as pl

from gru4rec.data import check_same_id_types, read_events
from gru4rec.errors import UserError
from gru4rec.train.tune.options import TuneOptions


def read_data(o: TuneOptions) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, str]:
    """(all of TRAIN, the trials' training part, validation, a note on where validation comes from)."""
    train_events = read_events(o.train, o.keys)
    if o.valid is not None:
        valid_events = read_events(o.valid, o.keys)
        check_same_id_types(train_events, valid_events, str(o.train), str(o.valid))
        search_train, valid_note = train_events, f"validation set {o.valid}"
    else:
        search_train, valid_events, valid_note = split_validation(train_events, o.valid_days)
    if o.final_test is not None:
        check_same_id_types(train_events, read_events(o.final_test, o.keys), str(o.train), str(o.final_test))
    return train_events, search_train, valid_events, valid_note


def split_validation(events: pl.DataFrame, days: float) -> tuple[pl.DataFrame, pl.DataFrame, str]:
    """train_tr / train_valid as `data split` cuts them: whole sessions ending in the last `days` days
    are validation; their events of items absent from train_tr go, then sessions left shorter than 2."""
    from gru4rec.data import TIME
    from gru4rec.prepare import DAY, keep_seen_items, split_whole_sessions

    boundary = events[TIME].max() - days * DAY
    train_tr, valid = split_whole_sessions(events, boundary)
    valid = keep_seen_items(valid, train_tr, 2)
    if train_tr.height == 0 or valid.height == 0:
        empty = "training" if train_tr.height == 0 else "validation"
        raise UserError(
            f"splitting TRAIN by time left the {empty} part empty (validation = sessions ending in the last "
            f"{days:g} day(s)); change --valid-days or give --valid"
        )
    note = (
        f"last {days:g} day(s) of TRAIN (sessions ending at or after t={boundary:.0f}), cut as `data split` "
        f"cuts train_tr/train_valid: {train_tr.height:,} training and {valid.height:,} validation events"
    )
    return train_tr, valid, note


def unseen_notes(train_events: pl.DataFrame, events: pl.DataFrame, what: str) -> list[str]:
    """What evaluating `events` on a model of `train_events` drops, in `train`'s and `score`'s words:
    events of items not in the training data, then sessions left with fewer than 2 events."""
    from gru4rec.data import ITEM, SESSION
    from gru4rec.items import drop_short_sessions

    known = events.filter(pl.col(ITEM).is_in(train_events[ITEM].unique().implode()))
    lines = []
    if known.height < events.height:
        lines.append(
            f"{what}: dropped {events.height - known.height:,} event(s) of items not in the training data"
        )
    n_short = events[SESSION].n_unique() - drop_short_sessions(known)[SESSION].n_unique()  # as `score` counts
    if n_short:
        lines.append(f"{what}: skipped {n_short:,} session(s) with fewer than 2 known events")
    return lines
