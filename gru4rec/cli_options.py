"""Typer options declared once for every command that takes them: the key columns and time unit of the
events, and the training settings `train`, `bench train` and `tune` share."""

from __future__ import annotations

from pathlib import Path
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

Device = Annotated[str, typer.Option("--device", help="auto (GPU when present), cuda or cpu.")]
Seed = Annotated[
    int, typer.Option("--seed", min=0, max=2**32 - 1, help="Random seed (initialisation, dropout, sampling).")
]
Threads = Annotated[
    int | None, typer.Option("--threads", min=1, help="CPU threads for torch (default: torch's choice).")
]
Params = Annotated[
    list[str], typer.Option("-p", "--param", help="Override one parameter: -p key=value (repeatable).")
]
ParamsFile = Annotated[
    Path | None, typer.Option("--params", help="TOML file of parameters (applied after --preset, before -p).")
]
