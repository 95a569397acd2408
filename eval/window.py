"""The nightly rolling window: cut train / test for one day out of a live click log.

    [nightly.window]
    events = "log/**/*.parquet"   # a file, a folder, a glob, or a hive dataset (date=YYYY-MM-DD folders)
    as_of = "latest"              # "latest" (the last day the log covers completely), "today" (UTC)
                                  # or a date "2026-11-28"
    train_days = 30               # train on the days before the test window
    test_days = 1                 # test on the last test_days days up to as_of
    min_test_events = 500         # a smaller test window is refused before any training
    session_key = "session_id"    # the log's own column names and time unit, as on every command
    item_key = "item_id"
    time_key = "time"
    time_unit = "auto"

The window ends at the end of the as_of day (UTC) and starts train_days + test_days days earlier.
"latest" is the last day the log covers completely: the day before the day of its last event (a
live log's last day is still being written; a nightly at 02:30 sees two and a half hours of it).
Only the window's events are read: files under `date=YYYY-MM-DD` folders outside it are never
opened (they may be empty or broken), files outside such folders are read and filtered on time
while scanning. The cut itself is `data split`'s code
(`gru4rec.prepare.split_events`): the same filters (minimum item support and session length,
optional dedup), whole-session test split over the last `test_days` days of the window,
test events of items unseen in training dropped (and counted here).

The log is read by the core reader (any layout, integer or string ids, any time unit); the time
filter is on the user's own column, so it is pushed down to the files. The test cut is at the end
of the as_of day minus test_days (calendar days, not "the last click minus test_days").
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from gru4rec.data import ITEM, SESSION, TIME, Keys, event_files, open_events
from gru4rec.errors import UserError
from gru4rec.prepare import DAY, SplitConfig, split_with_report

AS_OF_WORDS = ("latest", "today")
HIVE_DATE = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")


@dataclass
class WindowSpec:
    events: str
    as_of: str = "latest"
    train_days: int = 30
    test_days: int = 1
    min_item_support: int = 5
    min_session_length: int = 2
    dedup: bool = False
    min_test_events: int = 500  # a test window smaller than this cannot judge a model
    session_key: str = SESSION
    item_key: str = ITEM
    time_key: str = TIME
    time_unit: str = "auto"

    @property
    def keys(self) -> Keys:
        return Keys(self.session_key, self.item_key, self.time_key, self.time_unit)


@dataclass
class Window:
    as_of: dt.date
    start: float  # seconds: first instant of the window
    test_start: float  # seconds: start of the nominal test days
    end: float  # seconds: end of the as_of day (exclusive)
    boundary: float  # seconds: the test cut (end of the as_of day - test_days)
    train: pl.DataFrame
    test: pl.DataFrame
    n_test_dropped: int  # test events dropped: items unseen in training, then sessions left too short
    n_files: int  # files read (after partition pruning)
    train_days: int = 0
    test_days: int = 0
    as_of_reason: str = ""  # how "latest" was resolved, for the console and the report
    empty_test_days: tuple[str, ...] = ()  # test days without a single event in the log

    def info(self) -> dict[str, Any]:
        """The window's dates and sizes, as history columns."""

        def iso(t: float) -> str:
            return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")

        return {
            "as_of": self.as_of.isoformat(),
            "train_days": self.train_days,
            "test_days": self.test_days,
            "window_start": iso(self.start),
            "window_test_start": iso(self.test_start),
            "window_end": iso(self.end),
            "window_boundary": iso(self.boundary),
            "n_train_events": self.train.height,
            "n_train_sessions": self.train[SESSION].n_unique(),
            "n_train_items": self.train[ITEM].n_unique(),
            "n_window_test_events": self.test.height,
            "n_window_test_sessions": self.test[SESSION].n_unique(),
            "n_test_dropped_unseen": self.n_test_dropped,
            "n_files_read": self.n_files,
            "as_of_reason": self.as_of_reason,
            "empty_test_days": ",".join(self.empty_test_days),
        }


def parse_as_of(text: str, where: str) -> str:
    """Check an as_of value (config or --as-of): latest, today or an ISO date."""
    if text in AS_OF_WORDS:
        return text
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        raise UserError(f"{where} must be latest, today or a date YYYY-MM-DD, got {text!r}") from None
    return text


def partition_date(path: Path) -> dt.date | None:
    """The date of a hive `date=YYYY-MM-DD` folder the file lies in, if any."""
    for part in reversed(path.parts[:-1]):
        match = HIVE_DATE.match(part)
        if match:
            return dt.date.fromisoformat(match.group(1))
    return None


def cut_window(spec: WindowSpec, as_of: str | None = None) -> Window:
    """Read the window's events for `as_of` (default: the spec's) and split them as `data split` does."""
    files = event_files(spec.events, check=False)  # names only: nothing is opened before the window is known
    dates = {f: partition_date(f) for f in files}
    day, reason = _resolve_as_of(as_of or spec.as_of, spec, dates)
    end_day = day + dt.timedelta(days=1)
    first_day = end_day - dt.timedelta(days=spec.train_days + spec.test_days)

    def in_window(f: Path) -> bool:  # hive pruning: files of other days are never opened
        return dates.get(f) is None or first_day <= dates[f] < end_day

    try:
        source = open_events(spec.events, spec.keys, in_window)
    except UserError as e:
        raise UserError(f"{e} (window {first_day} .. {day})") from None
    end = _epoch(end_day)
    start = end - (spec.train_days + spec.test_days) * DAY
    events = source.collect(source.scan(source.time_between(start, end)))
    if events.height == 0:
        raise UserError(f"{spec.events}: no events between {first_day} and {day} (as_of {day})")
    events = source.validate(events)
    cfg = SplitConfig(test_days=float(spec.test_days), min_item_support=spec.min_item_support,
                      min_session_length=spec.min_session_length, dedup=spec.dedup, valid=False)  # fmt: skip
    boundary = end - spec.test_days * DAY  # the test days are calendar days up to as_of
    try:
        frames, drops = split_with_report(events, cfg, boundary=boundary)
    except UserError as e:
        raise UserError(f"window {first_day} .. {day} of {spec.events}: {e}") from None
    dropped = sum(n for reason, n in drops.events.items() if reason.startswith("test:"))
    test = frames["test"]
    if test.height < spec.min_test_events:
        raise UserError(
            f"window {first_day} .. {day} of {spec.events}: the test days ({day - dt.timedelta(days=spec.test_days - 1)}"
            f" .. {day}) hold {test.height:,} test event(s) after the cut, fewer than min_test_events = "
            f"{spec.min_test_events:,}: too few to judge a model; choose an earlier as_of, more test_days or "
            "a lower min_test_events"
        )
    return Window(day, start, boundary, end, boundary, frames["train_full"], test, dropped,
                  len(source.files), spec.train_days, spec.test_days, reason,
                  _empty_days(events, boundary, spec.test_days))  # fmt: skip


def _empty_days(events: pl.DataFrame, boundary: float, test_days: int) -> tuple[str, ...]:
    """The test days (ISO dates) on which the log holds no event at all."""
    from gru4rec.data import time_seconds

    seconds = time_seconds(events[TIME], "window", "s").to_numpy()
    seen = {int((t - boundary) // DAY) for t in seconds[seconds >= boundary]}
    return tuple(
        dt.datetime.fromtimestamp(boundary + i * DAY, dt.UTC).date().isoformat()
        for i in range(test_days)
        if i not in seen
    )


def _epoch(day: dt.date) -> float:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


def _resolve_as_of(text: str, spec: WindowSpec, dates: dict[Path, dt.date | None]) -> tuple[dt.date, str]:
    """(the as_of day, how it was chosen)."""
    if text == "today":
        return dt.datetime.now(dt.UTC).date(), "today (UTC)"
    if text != "latest":
        return dt.date.fromisoformat(text), "given"
    known = [d for d in dates.values() if d is not None]
    last_day = max(known) if known else None

    def last_partitions(f: Path) -> bool:  # the last date= partition and any file outside one
        return dates.get(f) is None or dates[f] == last_day

    source = open_events(spec.events, spec.keys, last_partitions if last_day else None)
    last = dt.datetime.fromtimestamp(source.last_time(), dt.UTC)
    day = last.date() - dt.timedelta(days=1)
    return day, (
        f"latest: {day}, the last day the log covers completely (its last event, "
        f"{last.isoformat(timespec='minutes')}, lies in a day that may still be in progress)"
    )
