"""Typer options shared by every command that reads events: the user's key columns and time unit."""

from __future__ import annotations

from typing import Annotated

import typer

SessionKey = Annotated[str, typer.Option("--session-key", help="Name of the session id column in the input.")]
ItemKey = Annotated[str, typer.Option("--item-key", help="Name of the item id column in the input.")]
TimeKey = Annotated[
    str,
    typer.Option(
        "--time-key",
        help="Name of the time column: numbers (see --time-unit), a datetime/date, or ISO-8601 text.",
    ),
]
TimeUnit = Annotated[
    str,
    typer.Option(
        "--time-unit",
        help="Unit of a numeric time column: s, ms, us, ns, or auto (epoch ms/us/ns are recognised by "
        "magnitude, converted and said on stderr).",
    ),
]
EVENTS_HELP = (
    "Events: a Parquet, TSV or CSV file, a folder of them (hive key=value folders welcome) or a quoted glob."
)
