"""Preprocessing protocols: the RSC15 protocol of the papers (spec §8.1) and a generic time split.

Both cut whole sessions at a time boundary (a session goes to test when its LAST event is at or
after the boundary), then remove test events of items unseen in train and the test sessions that
became too short, and split train the same way again into train_tr / train_valid for tuning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from gru4rec.data import ITEM, SESSION, TIME, validate_events
from gru4rec.errors import UserError
from gru4rec.items import drop_short_sessions

DAY = 86_400.0
RAW_COLUMNS = ("session", "timestamp", "item", "category")
OUTPUTS = ("train_full", "test", "train_tr", "train_valid")


# --- reading the raw YooChoose clicks ------------------------------------------------------------


def read_rsc15_clicks(path: str | Path) -> pl.DataFrame:
    """`yoochoose-clicks.dat`: no header, `session,ISO timestamp,item,category`; time -> float seconds.

    Timestamps are read as UTC (the official script reads them as local time; only order matters).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    as_text = {c: pl.String for c in RAW_COLUMNS}
    raw = pl.scan_csv(path, has_header=False, new_columns=list(RAW_COLUMNS), schema_overrides=as_text)
    parsed = raw.select(  # parsed lazily: the 33M raw strings of the real file are never all held
        pl.col("session").str.strip_chars().cast(pl.Int64, strict=False).alias(SESSION),
        pl.col("item").str.strip_chars().cast(pl.Int64, strict=False).alias(ITEM),
        (
            pl.col("timestamp")
            .str.to_datetime("%Y-%m-%dT%H:%M:%S%.fZ", strict=False, time_unit="ms")
            .dt.epoch("ms")
            / 1000.0
        ).alias(TIME),
    )
    try:
        events = parsed.collect()
    except Exception as e:  # polars' error types vary by failure; all mean "not this format"
        raise UserError(
            f"{path}: not a raw RSC15 clicks file (expected 4 comma-separated columns "
            f"session,timestamp,item,category; {str(e).strip().splitlines()[0][:160]})"
        ) from None
    for col, src, what in (
        (SESSION, "session", "an integer session id"),
        (ITEM, "item", "an integer item id"),
        (TIME, "timestamp", "an ISO timestamp like 2014-04-07T10:51:09.277Z"),
    ):
        bad = events[col].is_null()
        if bad.any():
            row = int(bad.arg_max())
            value = raw.select(src).slice(row, 1).collect().item()
            if value is None:
                raise UserError(
                    f"{path}: line {row + 1}: no {src} field (expected 4 comma-separated fields "
                    "session,timestamp,item,category)"
                )
            raise UserError(
                f"{path}: line {row + 1}: {src} {value!r} is not {what} ({int(bad.sum())} bad line(s))"
            )
    return validate_events(events, str(path))


# --- shared steps ----------------------------------------------------------------------------------


def split_whole_sessions(events: pl.DataFrame, boundary: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(train, test): test = sessions whose last event is at or after `boundary`; no session is cut."""
    is_test = pl.col(TIME).max().over(SESSION) >= boundary
    return events.filter(~is_test), events.filter(is_test)


def keep_seen_items(
    test: pl.DataFrame,
    train: pl.DataFrame,
    min_length: int = 2,
    drops: Drops | None = None,
    name: str = "test",
) -> pl.DataFrame:
    """Drop test events of items absent from train, then test sessions left shorter than `min_length`."""
    drops = drops or Drops()
    seen = test.filter(pl.col(ITEM).is_in(train[ITEM].unique().implode()))
    seen = drops.apply(f"{name}: events of items unseen in training", test, seen)
    reason = f"{name}: sessions shorter than {min_length} after unseen items"
    return drops.apply(reason, seen, drop_short_sessions(seen, min_length))


def drop_rare_items(events: pl.DataFrame, min_support: int) -> pl.DataFrame:
    return events.filter(pl.len().over(ITEM) >= min_support)


def drop_consecutive_duplicates(events: pl.DataFrame) -> pl.DataFrame:
    """Drop an event that repeats the previous event's item in the same session (i,i,j -> i,j; i,j,i kept)."""
    repeat = (pl.col(ITEM) == pl.col(ITEM).shift(1)) & (pl.col(SESSION) == pl.col(SESSION).shift(1))
    return events.filter(~repeat.fill_null(False))


def _nonempty(
    frames: tuple[pl.DataFrame, ...], names: tuple[str, ...], hint: str
) -> tuple[pl.DataFrame, ...]:
    for name, df in zip(names, frames, strict=True):
        if df.height == 0:
            raise UserError(f"the split left '{name}' empty ({hint})")
    return frames


# --- RSC15 (spec §8.1) ----------------------------------------------------------------------------


def rsc15_filter(events: pl.DataFrame) -> pl.DataFrame:
    """Sessions of 1 event out, then items with < 5 events, then sessions with < 2 events: one pass."""
    return drop_short_sessions(drop_rare_items(drop_short_sessions(events, 2), 5), 2)


def rsc15_protocol(events: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """train_full / test (last day of the data) and train_tr / train_valid (last day of train_full)."""
    events = rsc15_filter(events)
    if events.height == 0:
        raise UserError("no events left after the RSC15 filters (sessions >= 2 events, items >= 5 events)")
    hint = "the data must span more than one day of sessions"
    train_full, test = _nonempty(_last_day_split(events), ("train_full", "test"), hint)
    train_tr, train_valid = _nonempty(_last_day_split(train_full), ("train_tr", "train_valid"), hint)
    return {"train_full": train_full, "test": test, "train_tr": train_tr, "train_valid": train_valid}


def _last_day_split(events: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    train, test = split_whole_sessions(events, events[TIME].max() - DAY)
    return train, keep_seen_items(test, train, 2)


# --- generic split for a user's own click log ----------------------------------------------------


@dataclass(frozen=True)
class SplitConfig:
    test_days: float | None = 1.0  # test = sessions ending in the last N days ...
    test_fraction: float | None = None  # ... or in the last fraction of the time span (exclusive)
    min_item_support: int = 5
    min_session_length: int = 2
    dedup: bool = False  # remove consecutive repeats of the same item first
    valid: bool = True  # also split train_full into train_tr / train_valid the same way

    def __post_init__(self) -> None:
        if (self.test_days is None) == (self.test_fraction is None):
            raise UserError("give exactly one of --test-days and --test-fraction")
        if self.test_days is not None and not self.test_days > 0:
            raise UserError(f"--test-days must be > 0, got {self.test_days}")
        if self.test_fraction is not None and not 0 < self.test_fraction < 1:
            raise UserError(f"--test-fraction must be between 0 and 1 (exclusive), got {self.test_fraction}")
        if self.min_item_support < 1:
            raise UserError(f"--min-item-support must be >= 1, got {self.min_item_support}")
        if self.min_session_length < 2:
            raise UserError(
                f"--min-session-length must be >= 2 (a session needs a next event), got {self.min_session_length}"
            )


def split_events(events: pl.DataFrame, cfg: SplitConfig) -> dict[str, pl.DataFrame]:
    """Filter (repeated until stable, so every kept item and session meets the minimums), then split."""
    return split_with_report(events, cfg)[0]


def split_with_report(
    events: pl.DataFrame, cfg: SplitConfig, boundary: float | None = None
) -> tuple[dict[str, pl.DataFrame], Drops]:
    """split_events, plus what was dropped and why. `boundary` (epoch seconds) fixes the test cut
    instead of deriving it from the last event (a nightly window ends at midnight, not at its last
    click); train_tr / train_valid are cut by the usual rule."""
    drops = Drops()
    drops.note_one_event_sessions(events)
    if cfg.dedup:
        events = drops.apply("consecutive duplicates", events, drop_consecutive_duplicates(events))
    events = filter_until_stable(events, cfg.min_item_support, cfg.min_session_length, drops)
    if events.height == 0:
        raise UserError(
            f"no events left after filtering (items >= {cfg.min_item_support} events, "
            f"sessions >= {cfg.min_session_length} events)"
        )
    hint = "change --test-days/--test-fraction, or check the time column (and --time-unit)"
    names = ("train_full", "test")
    cut = _time_split(events, cfg, drops, "test", boundary)
    frames = dict(zip(names, _nonempty(cut, names, hint), strict=True))
    if cfg.valid:
        names = ("train_tr", "train_valid")
        cut = _time_split(frames["train_full"], cfg, drops, "train_valid")
        frames.update(zip(names, _nonempty(cut, names, hint), strict=True))
    return frames, drops


@dataclass
class Drops:
    """Events (and sessions) removed per reason, in the order the filters ran."""

    events: dict[str, int] = field(default_factory=dict)
    sessions: dict[str, int] = field(default_factory=dict)
    one_event_sessions: int = 0  # in the input, before any filter

    def note_one_event_sessions(self, events: pl.DataFrame) -> None:
        self.one_event_sessions = int((events.group_by(SESSION).len()["len"] == 1).sum())

    def apply(self, reason: str, before: pl.DataFrame, after: pl.DataFrame) -> pl.DataFrame:
        self.events[reason] = self.events.get(reason, 0) + before.height - after.height
        n_sessions = before[SESSION].n_unique() - after[SESSION].n_unique()
        self.sessions[reason] = self.sessions.get(reason, 0) + n_sessions
        return after

    def lines(self) -> list[str]:
        out = [f"one-event sessions in the input: {self.one_event_sessions:,}"]
        for reason, n in self.events.items():
            out.append(f"dropped {n:,} events ({self.sessions[reason]:,} whole sessions) - {reason}")
        return out


def filter_until_stable(
    events: pl.DataFrame, min_support: int, min_length: int, drops: Drops | None = None
) -> pl.DataFrame:
    drops = drops or Drops()
    while True:
        rare = drops.apply(
            f"items with fewer than {min_support} events", events, drop_rare_items(events, min_support)
        )
        kept = drops.apply(
            f"sessions shorter than {min_length} events", rare, drop_short_sessions(rare, min_length)
        )
        if kept.height == events.height:
            return kept
        events = kept


def _time_split(
    events: pl.DataFrame,
    cfg: SplitConfig,
    drops: Drops | None = None,
    name: str = "test",
    boundary: float | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    if boundary is None:
        t_min, t_max = events[TIME].min(), events[TIME].max()
        span = cfg.test_days * DAY if cfg.test_days is not None else cfg.test_fraction * (t_max - t_min)
        boundary = t_max - span
    train, test = split_whole_sessions(events, boundary)
    return train, keep_seen_items(test, train, cfg.min_session_length, drops, name)
