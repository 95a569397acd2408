"""Read, validate and order session events into the canonical frame: the one reader of every command.

Input: a Parquet, TSV or CSV file, a folder of them (searched recursively; hive `key=value/` folders
become columns), or a glob (`events/**/*.parquet`). Files are opened lazily (projection to the three
key columns, predicate pushdown for partition filters); their schemas are checked against each other
up front, so a dataset of mismatching files is refused with the two files named.

Canonical frame: `session_id` and `item_id` Int64 or String (the user's ids, Categorical/Enum read
as String), `time` in seconds (Int64, or Float64 when converted from another unit or a datetime).

Id policy: ids are labels, never compared as numbers, so a log gives the same model whether its ids
are written as integers or strings. Sessions are ordered by their first appearance in the input
(files in path order), events within a session by time with ties in input order; the item map
indexes items by first appearance in that order. For a file sorted by session id (the official
preprocessing output) this is the session-id order of the official code.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from gru4rec.errors import UserError

SESSION, ITEM, TIME = "session_id", "item_id", "time"
# Where the benchmarks look for the real datasets (one folder each) by default: beside the checkout,
# relative to the current folder (make runs from the repository root).
BENCH_DATA_DIR = Path("../shared/data")
# Column names of the official GRU4Rec TSV files, recognised without any option.
OFFICIAL_KEYS = {"SessionId": SESSION, "ItemId": ITEM, "Time": TIME}
FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".tsv": "tsv",
    ".txt": "tsv",
    ".dat": "tsv",
    ".csv": "csv",
}
# Seconds per unit of an integer/float time column.
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
# Epoch times in seconds stay below this (year 5138); ms / us / ns epochs are 1e3 / 1e6 / 1e9 larger.
MAX_EPOCH_SECONDS = 1e11
YEAR = 365.25 * 86_400.0


@dataclass(frozen=True)
class Keys:
    """How to read the user's columns: their names (renamed to the canonical ones) and time unit."""

    session: str = SESSION
    item: str = ITEM
    time: str = TIME
    time_unit: str = "auto"  # auto | s | ms | us | ns (numeric time columns only)

    def __post_init__(self) -> None:
        if self.time_unit not in ("auto", *TIME_UNITS):
            raise UserError(f"--time-unit must be one of auto, s, ms, us, ns; got {self.time_unit!r}")


@dataclass
class EventSource:
    """An opened events input: its files, format and the user's names for the key columns."""

    path: str  # as the user gave it (file, folder or glob)
    files: list[Path]
    fmt: str  # parquet | tsv | csv
    names: dict[str, str]  # canonical name -> the user's column
    ignored: list[str]  # the user's columns that are not read
    schema: dict  # the first file's column -> dtype
    partitions: list[str] = field(default_factory=list)  # hive partition columns (filterable)
    time_unit: str = "auto"

    def scan(self, where: pl.Expr | None = None) -> pl.LazyFrame:
        """The key columns renamed to the canonical ones, optionally filtered (partition pruning)."""
        lf = self._scan_raw()
        if where is not None:
            lf = lf.filter(where)
        return lf.select(self._key_expr(dst, src) for dst, src in self.names.items())

    def _key_expr(self, dst: str, src: str) -> pl.Expr:
        expr = pl.col(src)
        if dst != TIME and id_dtype(self.schema[src]) == "str":  # Categorical / Enum ids as plain strings
            expr = expr.cast(pl.String)
        return expr.alias(dst)

    def read(self, where: pl.Expr | None = None) -> pl.DataFrame:
        """All events, validated and in canonical order (loaded into memory)."""
        return self.validate(self.collect(self.scan(where)))

    def validate(self, df: pl.DataFrame) -> pl.DataFrame:
        """Validate a frame collected from this source (messages name the user's columns)."""
        return validate_events(df, self.path, self.names, self.time_unit)

    def collect(self, lf: pl.LazyFrame, streaming: bool = False) -> pl.DataFrame:
        """Collect a query of this source; a failure names the file at fault when one can be found."""
        try:
            return lf.collect(engine="streaming") if streaming else lf.collect()
        except UserError:
            raise
        except Exception as e:  # polars raises many types for unreadable or mistyped files
            raise UserError(self._failure(e)) from None

    def resolve_time_unit(self, where: pl.Expr | None = None) -> str:
        """Fix the unit of a numeric time column once for the whole source (guessed from the largest
        value when auto), so that chunks read one at a time all agree."""
        dtype = self.schema[self.names[TIME]]
        if self.time_unit == "auto" and (dtype.is_integer() or dtype.is_float()):
            top = self.collect(self.scan(where).select(pl.col(TIME).abs().max()), streaming=True)
            self.time_unit = guess_time_unit(top[TIME], f"{self.path}: column {self.names[TIME]!r}")
        return self.time_unit

    def time_between(self, lo: float, hi: float) -> pl.Expr:
        """lo <= time < hi (epoch seconds) on the user's own time column, so the filter is pushed
        down to the files: numbers in the source's unit, datetimes as instants, ISO text parsed."""
        raw, dtype = pl.col(self.names[TIME]), self.schema[self.names[TIME]]
        if dtype == pl.String:
            raw, dtype = raw.str.to_datetime(time_zone="UTC", strict=False), pl.Datetime("us", "UTC")
        if dtype == pl.Date:
            return (raw >= pl.lit(lo / 86_400).cast(pl.Int64).cast(pl.Date)) & (
                raw.cast(pl.Int64) * 86_400 < hi
            )
        if dtype.is_temporal():
            seconds = raw.dt.epoch("us") / 1e6
            return (seconds >= lo) & (seconds < hi)
        unit = TIME_UNITS[self.resolve_time_unit()]
        return (raw >= lo / unit) & (raw < hi / unit)

    def last_time(self) -> float:
        """The latest event time in seconds (one streaming pass over the time column)."""
        top = self.collect(self.scan().select(pl.col(TIME).max()), streaming=True)[TIME]
        return float(
            time_seconds(top, f"{self.path}: column {self.names[TIME]!r}", self.resolve_time_unit())[0]
        )

    # ----------------------------------------------------------------------------------------------
    def _scan_raw(self) -> pl.LazyFrame:
        files = [str(f) for f in self.files]
        if self.fmt == "parquet":
            return pl.scan_parquet(files, hive_partitioning=bool(self.partitions))
        return pl.scan_csv(files, separator="\t" if self.fmt == "tsv" else ",")

    def _failure(self, e: Exception) -> str:
        if len(self.files) > 1:  # find the file at fault: each one read on its own
            for f in self.files:
                try:
                    _scan_one(f, self.fmt).select(pl.col(c) for c in self.names.values()).collect()
                except Exception as e1:
                    return f"{f}: cannot read file ({_first_line(e1)})"
        return f"{self.path}: cannot read ({_first_line(e)})"


def open_events(source: str | Path, keys: Keys = Keys(), keep_file=None) -> EventSource:
    """Resolve the files of `source`, check that their schemas agree and that the keys exist.

    `keep_file(path) -> bool` prunes files before any is opened (e.g. hive partitions outside a
    time window); a source left with no file is an error."""
    path = str(source)
    files = event_files(path, keep_file)
    fmt = _one_format(files)
    schemas = [(f, _schema(f, fmt)) for f in files]
    columns = list(schemas[0][1])
    names = key_columns(columns, keys, files[0])
    for f, schema in schemas[1:]:
        for src in names.values():
            a, b = schemas[0][1].get(src), schema.get(src)
            if b is None:
                raise UserError(
                    f"{f}: missing column {src!r} that {files[0]} has (files of one dataset differ)"
                )
            if (_time_kind(a), _id_kind(a)) != (_time_kind(b), _id_kind(b)):
                raise UserError(
                    f"column {src!r} is {a} in {files[0]} but {b} in {f}: the files of one dataset must agree"
                )
    partitions = _hive_columns(files) if fmt == "parquet" else []
    ignored = [c for c in columns if c not in names.values()]
    return EventSource(path, files, fmt, names, ignored, schemas[0][1], partitions, keys.time_unit)


def event_files(path: str, keep_file=None, check: bool = True) -> list[Path]:
    """The data files a source names: itself, a folder's files (recursive), or a glob's matches.

    `keep_file(path) -> bool` prunes them before any is checked or opened: what it drops (another
    day's partition) may be empty or broken without stopping the run. `check=False` only lists them."""
    if any(ch in path for ch in "*?["):
        matched = [Path(p) for p in sorted(globlib.glob(path, recursive=True))]
        files = [p for p in matched if p.is_file() and not _hidden(p)]
        if not files:
            raise UserError(f"{path}: the pattern matches no file")
    else:
        p = Path(path)
        if not p.exists():
            raise UserError(f"{p}: file not found")
        if p.is_dir():
            files = sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FORMATS and not _hidden(f, p)
            )
            if not files:
                raise UserError(f"{p}: folder holds no Parquet, TSV or CSV files")
        else:
            files = [p]
    if keep_file is not None:
        files = [f for f in files if keep_file(f)]
        if not files:
            raise UserError(f"{path}: no file left after partition pruning")
    for f in files if check else ():
        if f.suffix.lower() not in FORMATS:
            raise UserError(f"{f}: unknown file type '{f.suffix}' (use .parquet, .tsv/.txt or .csv)")
        if f.stat().st_size == 0:
            raise UserError(f"{f}: file is empty")
    return files


def scan_events(source: str | Path, keys: Keys = Keys()) -> pl.LazyFrame:
    """Lazily open any source and rename the key columns; validation happens on collect."""
    return open_events(source, keys).scan()


def read_events(source: str | Path, keys: Keys = Keys(), where: pl.Expr | None = None) -> pl.DataFrame:
    """Read, validate and order all events of a file, folder, glob or hive dataset."""
    return open_events(source, keys).read(where)


def read_training_events(source: str | Path, keys: Keys, role: str) -> pl.DataFrame:
    """read_events, saying on stderr what training will not use: other columns, one-event sessions."""
    src = open_events(source, keys)
    events = src.read()
    n_single = int((events.group_by(SESSION).len()["len"] == 1).sum())
    if src.ignored:
        notice(f"{role} data: columns not used: {', '.join(src.ignored)}")
    if n_single:
        notice(f"{role} data: {n_single:,} one-event session(s) skipped (nothing to predict)")
    return events


def check_same_id_types(a: pl.DataFrame, b: pl.DataFrame, name_a: str, name_b: str) -> None:
    """Two frames that must share item ids (train and validation) hold item ids of one type."""
    if a[ITEM].dtype != b[ITEM].dtype:
        raise UserError(
            f"{name_b}: item ids are {b[ITEM].dtype} but {a[ITEM].dtype} in {name_a}; give both with one id type"
        )


def validate_events(
    df: pl.DataFrame, source: str = "events", names: dict[str, str] | None = None, time_unit: str = "auto"
) -> pl.DataFrame:
    """Check dtypes, nulls and emptiness; return the canonical frame (ids as given, time in seconds).

    `names` maps canonical names to the user's, so messages name the user's columns."""
    names = names or {}

    def col(c: str) -> str:
        return repr(names.get(c, c))

    missing = [c for c in (SESSION, ITEM, TIME) if c not in df.columns]
    if missing:
        raise UserError(f"{source}: missing column(s) {', '.join(missing)} (have: {', '.join(df.columns)})")
    df = df.select(SESSION, ITEM, TIME)
    if df.height == 0:
        raise UserError(f"{source}: no events (the file has a header but no rows)")
    for c in (SESSION, ITEM, TIME):
        n_null = df[c].null_count()
        if n_null:
            raise UserError(f"{source}: column {col(c)} has {n_null} null value(s)")
    df = df.with_columns(_id_column(df[c], f"{source}: column {col(c)}") for c in (SESSION, ITEM))
    df = df.with_columns(time_seconds(df[TIME], f"{source}: column {col(TIME)}", time_unit))
    return sort_events(df)


def _id_column(s: pl.Series, what: str) -> pl.Series:
    kind = _id_kind(s.dtype)
    if kind == "int":
        if s.dtype == pl.UInt64 and s.max() > np.iinfo(np.int64).max:  # unsigned 64-bit ids may not fit
            raise UserError(f"{what} has ids larger than 2^63-1")
        return s.cast(pl.Int64)
    if kind == "str":
        return s.cast(pl.String)
    raise UserError(f"{what} must hold integer or string ids, found {s.dtype}")


def time_seconds(s: pl.Series, what: str, unit: str = "auto") -> pl.Series:
    """A time column in seconds: numbers in `unit` (guessed by magnitude when auto), datetimes and
    dates of any unit and time zone, or ISO-8601 text. A result beyond year 5138 is refused."""
    if s.dtype == pl.String:
        parsed = s.str.to_datetime(time_zone="UTC", strict=False)
        bad = parsed.is_null()
        if bad.any():
            raise UserError(
                f"{what} holds text that is not an ISO-8601 time, e.g. {s.filter(bad)[0]!r} "
                f"({int(bad.sum())} value(s); one format per column, e.g. 2026-11-28T10:00:00Z)"
            )
        s = parsed
    if s.dtype == pl.Date:
        return (s.cast(pl.Int64) * 86_400).alias(s.name)
    if s.dtype.is_temporal() and s.dtype != pl.Duration and s.dtype != pl.Time:
        return (s.dt.epoch("us").cast(pl.Float64) / 1e6).alias(s.name)
    if s.dtype.is_float() and not s.is_finite().all():
        raise UserError(f"{what} has NaN or infinite values")
    if not (s.dtype.is_integer() or s.dtype.is_float()):
        raise UserError(f"{what} must hold numbers (seconds), datetimes or ISO-8601 text, found {s.dtype}")
    if unit == "auto":
        unit = guess_time_unit(s, what)
    top = float(s.abs().max()) * TIME_UNITS[unit]
    if top >= MAX_EPOCH_SECONDS:
        guess = guess_time_unit(s, announce=False)
        hint = f"pass --time-unit {guess}" if guess != unit else "check the column"
        raise UserError(
            f"{what} read as {unit} gives times up to {top:.3g} s (year {1970 + top / YEAR:,.0f}): "
            f"the values look like {_UNIT_NAMES[guess]}; {hint}"
        )
    if unit == "s":
        return s.cast(pl.Int64) if s.dtype.is_integer() else s.cast(pl.Float64)
    return (s.cast(pl.Float64) * TIME_UNITS[unit]).alias(s.name)


_UNIT_NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}


def guess_time_unit(s: pl.Series, what: str | None = None, announce: bool = True) -> str:
    """s, ms, us or ns by the magnitude of the largest value (epoch seconds stay below 1e11); a
    unit other than seconds is announced, so it is never silent."""
    top = s.abs().max()
    top = 0.0 if top is None else float(top)
    unit = "s"
    for candidate in ("ms", "us", "ns"):
        if top >= MAX_EPOCH_SECONDS:
            unit, top = candidate, top / 1000.0
    if unit != "s" and announce:
        where = what or "the time column"
        notice(
            f"{where} looks like epoch {_UNIT_NAMES[unit]}: converted to seconds (set --time-unit to override)"
        )
    return unit


_NOTICES: set[str] = set()


def notice(message: str) -> None:
    """A `note:` line on stderr, once per message per process."""
    if message not in _NOTICES:
        _NOTICES.add(message)
        print(f"note: {message}", file=sys.stderr)


def sort_events(df: pl.DataFrame) -> pl.DataFrame:
    """Sessions in order of first appearance, events by time; equal times keep their input order."""
    first = pl.col("_row").min().over(SESSION)
    return df.with_row_index("_row").sort([first, TIME], maintain_order=True).drop("_row")


def id_dtype(s: pl.Series | pl.DataType) -> str:
    """'int' or 'str': the id kind a column or dtype holds ('other' for anything else)."""
    return _id_kind(s if isinstance(s, pl.DataType) or isinstance(s, type) else s.dtype)


def session_lengths(df: pl.DataFrame) -> pl.DataFrame:
    """One row per session: session_id, length, start time (sorted input not required)."""
    return df.group_by(SESSION).agg(pl.len().alias("length"), pl.col(TIME).min().alias("start"))


def fingerprint(df: pl.DataFrame) -> str:
    """A short content hash of the canonical frame, stored with models to tie them to their data."""
    h = hashlib.sha256()
    for col in (SESSION, ITEM, TIME):
        s = df[col]
        if s.dtype == pl.String:  # length-prefixed utf-8, so ("ab","c") and ("a","bc") differ
            h.update(b"str")
            h.update(np.ascontiguousarray(s.str.len_bytes().to_numpy()).tobytes())
            h.update("".join(s.to_list()).encode())
        else:
            h.update(np.ascontiguousarray(s.to_numpy()).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
def _id_kind(dtype) -> str:
    if dtype is None:
        return "none"
    if dtype.is_integer():
        return "int"
    if (
        dtype == pl.String
        or isinstance(dtype, pl.Categorical | pl.Enum)
        or dtype in (pl.Categorical, pl.Enum)
    ):
        return "str"
    return "other"


def _time_kind(dtype) -> str:
    if dtype.is_integer() or dtype.is_float():
        return "number"
    return "temporal" if dtype.is_temporal() else str(dtype)


def _hidden(f: Path, root: Path | None = None) -> bool:
    """Dot and underscore files (_SUCCESS, .crc, temporary writes) are not data."""
    parts = f.relative_to(root).parts if root is not None else (f.name,)
    return any(p.startswith((".", "_")) for p in parts)


def _one_format(files: list[Path]) -> str:
    fmts = {FORMATS[f.suffix.lower()]: f for f in files}
    if len(fmts) > 1:
        a, b = list(fmts.values())[:2]
        raise UserError(f"{a} and {b}: one dataset must hold files of one format")
    return next(iter(fmts))


def _scan_one(f: Path, fmt: str) -> pl.LazyFrame:
    if fmt == "parquet":
        return pl.scan_parquet(f, hive_partitioning=False)
    return pl.scan_csv(f, separator="\t" if fmt == "tsv" else ",")


def _schema(f: Path, fmt: str) -> dict:
    try:
        return dict(_scan_one(f, fmt).collect_schema())
    except Exception as e:  # a corrupt footer, a binary file, ...
        raise UserError(f"{f}: cannot read file ({_first_line(e)})") from None


def _hive_columns(files: list[Path]) -> list[str]:
    keys = [p.split("=", 1)[0] for p in files[0].parent.parts if "=" in p]
    return keys if all(sum("=" in p for p in f.parent.parts) == len(keys) for f in files) else []


def key_columns(columns: list[str], keys: Keys, path: Path) -> dict[str, str]:
    """Canonical name -> the file's column that holds it. An explicitly named key must exist; the
    defaults fall back to the official SessionId/ItemId/Time headers."""
    named = {SESSION: keys.session, ITEM: keys.item, TIME: keys.time}
    if len(set(named.values())) < 3:
        raise UserError(
            f"--session-key, --item-key and --time-key must name three different columns "
            f"(got {keys.session!r}, {keys.item!r}, {keys.time!r})"
        )
    official = {dst: src for src, dst in OFFICIAL_KEYS.items()}
    sources, missing = {}, []
    for dst, src in named.items():
        if src in columns:
            sources[dst] = src
        elif src == dst and official[dst] in columns:
            sources[dst] = official[dst]
        else:
            missing.append(src)
    if missing:
        have = ", ".join(columns)
        have = have if len(have) <= 200 else have[:200] + "..."  # a binary file has one huge "column"
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (have: {have})")
    return sources


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
