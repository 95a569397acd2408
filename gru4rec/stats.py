"""Dataset statistics: the numbers papers report for a session dataset, plus a length histogram."""

from __future__ import annotations

import polars as pl

from gru4rec.data import ITEM, TIME, session_lengths

# Session-length histogram bins: (label, lo, hi) with lo <= length <= hi.
LENGTH_BINS = (
    ("1", 1, 1),
    ("2", 2, 2),
    ("3", 3, 3),
    ("4", 4, 4),
    ("5-9", 5, 9),
    ("10-19", 10, 19),
    ("20-49", 20, 49),
    ("50+", 50, None),
)


def dataset_stats(events: pl.DataFrame) -> dict:
    """sessions, events, items, predictions (= events - sessions), time range, length distribution."""
    lengths = session_lengths(events)["length"]
    n_sessions, n_events = lengths.len(), events.height
    hist = {}
    for label, lo, hi in LENGTH_BINS:
        count = int(lengths.is_between(lo, hi if hi is not None else lengths.max()).sum())
        if count or lo >= 2:  # length-1 sessions only show up when present
            hist[label] = count
    return {
        "sessions": n_sessions,
        "events": n_events,
        "items": events[ITEM].n_unique(),
        "predictions": n_events - n_sessions,
        "time_min": _plain(events[TIME].min()),
        "time_max": _plain(events[TIME].max()),
        "length": {
            "min": int(lengths.min()),
            "median": float(lengths.median()),
            "mean": float(lengths.mean()),
            "max": int(lengths.max()),
            "histogram": hist,
        },
    }


def stats_table(named: dict[str, dict], title: str = "dataset statistics"):
    """A rich table with one row per dataset (e.g. train/test), columns as in the paper's table."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("file", "sessions", "events", "items", "predictions", "len min/median/mean/max"):
        table.add_column(col, justify="left" if col == "file" else "right")
    for name, s in named.items():
        ln = s["length"]
        table.add_row(
            name,
            f"{s['sessions']:,}",
            f"{s['events']:,}",
            f"{s['items']:,}",
            f"{s['predictions']:,}",
            f"{ln['min']}/{ln['median']:g}/{ln['mean']:.2f}/{ln['max']}",
        )
    return table


def histogram_table(stats: dict):
    from rich.table import Table

    hist = stats["length"]["histogram"]
    total = max(stats["sessions"], 1)
    table = Table(title="session lengths")
    table.add_column("length", justify="right")
    table.add_column("sessions", justify="right")
    table.add_column("share", justify="right")
    table.add_column("")
    for label, count in hist.items():
        share = count / total
        table.add_row(label, f"{count:,}", f"{share:.1%}", "█" * round(40 * share))
    return table


def _plain(x):
    return float(x) if isinstance(x, float) else int(x)
