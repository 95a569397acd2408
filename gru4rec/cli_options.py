"""Typer options declared once for every command that takes them: the key columns and time unit of the
events, the training settings `train`, `bench train` and `tune` share, and the ONNX Runtime settings of
`score`, `serve` and `bench serve`. An option whose help differs between commands (what --seed seeds,
whose --threads) is made by one function, so its name and range stay declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

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

TrainEvents = Annotated[
    Path,
    typer.Argument(
        metavar="TRAIN",
        help="Training events: a Parquet, TSV or CSV file, a folder (hive welcome) or a quoted glob.",
    ),
]
Device = Annotated[str, typer.Option("--device", help="auto (GPU when present), cuda or cpu.")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress output.")]


def seed_option(help: str) -> Any:
    """--seed: any 32-bit unsigned integer (what numpy's and torch's generators take)."""
    return Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help=help)]


def threads_option(help: str) -> Any:
    """--threads: CPU threads for torch, at least one."""
    return Annotated[int | None, typer.Option("--threads", min=1, help=help)]


def params_option(help: str) -> Any:
    """-p/--param key=value, repeatable."""
    return Annotated[list[str], typer.Option("-p", "--param", help=help)]


Seed = seed_option("Random seed (initialisation, dropout, sampling).")
Threads = threads_option("CPU threads for torch (default: torch's choice).")
Params = params_option("Override one parameter: -p key=value (repeatable).")
ParamsFile = Annotated[
    Path | None, typer.Option("--params", help="TOML file of parameters (applied after --preset, before -p).")
]

OrtProvider = Annotated[
    str,
    typer.Option("--provider", help="ONNX Runtime execution provider: auto (CUDA when usable), cuda or cpu."),
]
OrtThreads = Annotated[
    int, typer.Option("--threads", help="ONNX Runtime intra-op threads (0: ORT's default, one per core).")
]
