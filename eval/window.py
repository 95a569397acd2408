"""The nightly rolling window: cut train / test for one day out of a live click log.

    [nightly.window]
    events = "log/**/*.parquet"   # a file, a folder, a glob, or a hive dataset (date=YYYY-MM-DD folders)
    as_of = "latest"              # "latest" (the log's last day), "today" (UTC) or a date "2026-11-28"
    train_days = 30               # train on the days before the test window
    test_days = 1                 # test on the last test_days days up to as_of

The window ends at the end of the as_of day (UTC) and starts train_days + test_days days earlier.
Only the window's events are read: files under `date=YYYY-MM-DD` folders outside it are never
opened, and the rest is filtered on time while scanning. The cut itself is `data split`'s code
(`gru4rec.prepare.split_events`): the same filters (minimum item support and session length,
optional dedup), whole-session test split over the last `test_days` days of the window's events,
test events of items unseen in training dropped (and counted here).

Note to the core: `split_events` places the boundary at (last filtered event - test_days), and
returns neither the boundary nor the count of dropped test events; a `boundary=` argument (here: the
end of the as_of day minus test_days) and a returned `SplitReport(boundary, n_test_dropped, ...)`
would make this module a read, a filter and one call.
"""

from __future__ import annotations

import datetime as dt
import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from gru4rec.data import ITEM, OFFICIAL_KEYS, SESSION, TIME, validate_events
from gru4rec.errors import UserError
from gru4rec.prepare import DAY, SplitConfig, filter_until_stable, split_events

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


@dataclass
class Window:
    as_of: dt.date
    start: float  # seconds: first instant of the window
    test_start: float  # seconds: start of the nominal test days
    end: float  # seconds: end of the as_of day (exclusive)
    boundary: float  # seconds: the split's actual boundary (last event - test_days, as `data split`)
    train: pl.DataFrame
    test: pl.DataFrame
    n_test_dropped: int  # test events dropped: items unseen in training, then sessions left too short
    n_files: int  # files read (after partition pruning)
    train_days: int = 0
    test_days: int = 0

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


def log_files(events: str) -> list[Path]:
    """The Parquet files of a log given as a file, a folder (searched recursively) or a glob."""
    path = Path(events)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    else:
        files = sorted(Path(p) for p in glob.glob(events, recursive=True) if Path(p).is_file())
    if not files:
        raise UserError(
            f"{events}: no Parquet files found (a file, a folder or a glob such as log/**/*.parquet)"
        )
    return files


def partition_date(path: Path) -> dt.date | None:
    """The date of a hive `date=YYYY-MM-DD` folder the file lies in, if any."""
    for part in reversed(path.parts[:-1]):
        match = HIVE_DATE.match(part)
        if match:
            return dt.date.fromisoformat(match.group(1))
    return None


def cut_window(spec: WindowSpec, as_of: str | None = None) -> Window:
    """Read the window's events for `as_of` (default: the spec's) and split them as `data split` does."""
    files = log_files(spec.events)
    dates = [partition_date(f) for f in files]
    hive = all(d is not None for d in dates)
    day = _resolve_as_of(as_of or spec.as_of, files, dates if hive else None)
    end_day = day + dt.timedelta(days=1)
    first_day = end_day - dt.timedelta(days=spec.train_days + spec.test_days)
    if hive:  # partition pruning: files of other days are never opened
        files = [f for f, d in zip(files, dates, strict=True) if first_day <= d < end_day]
        if not files:
            raise UserError(f"{spec.events}: no date= partition between {first_day} and {day}")
    end = _epoch(end_day)
    start = end - (spec.train_days + spec.test_days) * DAY
    events = _read(files, start, end, spec.events)
    if events.height == 0:
        raise UserError(f"{spec.events}: no events between {first_day} and {day} (as_of {day})")
    cfg = SplitConfig(test_days=float(spec.test_days), min_item_support=spec.min_item_support,
                      min_session_length=spec.min_session_length, dedup=spec.dedup, valid=False)  # fmt: skip
    try:
        frames = split_events(events, cfg)
    except UserError as e:
        raise UserError(f"window {first_day} .. {day} of {spec.events}: {e}") from None
    train, test = frames["train_full"], frames["test"]
    boundary, dropped = _boundary_and_dropped(events, cfg, test)
    return Window(day, start, end - spec.test_days * DAY, end, boundary, train, test, dropped, len(files),
                  spec.train_days, spec.test_days)  # fmt: skip


def _boundary_and_dropped(events: pl.DataFrame, cfg: SplitConfig, test: pl.DataFrame) -> tuple[float, int]:
    """The split's boundary (last event after the filters, minus test_days) and the test events that
    the unseen-item step removed. `split_events` returns neither, so its first steps are repeated here
    with the core's own functions (see the note to the core in the module doc)."""
    from gru4rec.prepare import drop_consecutive_duplicates, split_whole_sessions

    kept = filter_until_stable(drop_consecutive_duplicates(events) if cfg.dedup else events,
                               cfg.min_item_support, cfg.min_session_length)  # fmt: skip
    boundary = float(kept[TIME].max()) - cfg.test_days * DAY
    return boundary, split_whole_sessions(kept, boundary)[1].height - test.height


def _epoch(day: dt.date) -> float:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


def _resolve_as_of(text: str, files: list[Path], dates: list[dt.date] | None) -> dt.date:
    if text == "today":
        return dt.datetime.now(dt.UTC).date()
    if text != "latest":
        return dt.date.fromisoformat(text)
    if dates is not None:
        return max(dates)
    last = _scan(files).select(pl.col(TIME).max()).collect().item()
    if last is None:
        raise UserError(f"{files[0]}: the log has no events")
    seconds = last.timestamp() if isinstance(last, dt.datetime) else float(last)
    return dt.datetime.fromtimestamp(seconds, dt.UTC).date()


def _scan(files: list[Path]) -> pl.LazyFrame:
    """The log's files as one lazy frame with the canonical key columns.

    Until the core reader (`gru4rec.data.scan_events`) takes a list, folder or hive dataset, the
    files are scanned here; names are the canonical ones or the official GRU4Rec headers."""
    lf = pl.scan_parquet([str(f) for f in files], hive_partitioning=False)
    try:
        columns = lf.collect_schema().names()
    except Exception as e:
        raise UserError(f"{files[0]}: cannot read the log ({str(e).splitlines()[0][:160]})") from None
    official = {v: k for k, v in OFFICIAL_KEYS.items()}
    select = []
    for name in (SESSION, ITEM, TIME):
        source = name if name in columns else official[name] if official[name] in columns else None
        if source is None:
            raise UserError(f"{files[0]}: missing column {name} (have: {', '.join(columns)})")
        select.append(pl.col(source).alias(name))
    return lf.select(select)


def _read(files: list[Path], start: float, end: float, source: str) -> pl.DataFrame:
    lf = _scan(files)
    dtype = lf.collect_schema()[TIME]
    if dtype.is_temporal():
        lo = dt.datetime.fromtimestamp(start, dt.UTC).replace(tzinfo=None)
        hi = dt.datetime.fromtimestamp(end, dt.UTC).replace(tzinfo=None)
        in_window = (pl.col(TIME) >= lo) & (pl.col(TIME) < hi)
    else:
        in_window = (pl.col(TIME) >= start) & (pl.col(TIME) < end)
    try:
        events = lf.filter(in_window).collect()
    except Exception as e:
        raise UserError(f"{source}: cannot read the log ({str(e).splitlines()[0][:160]})") from None
    return validate_events(events, source) if events.height else events
