"""Typer options declared once for every command that takes them: the key columns and time unit of the
events, the training settings `train`, `bench train` and `tune` share, and the ONNX Runtime settings of
`score`, `serve` and `bench serve`. An option whose help differs between commands (what --seed seeds,
whose --threads) is made by one function, so its name and range stay declared once."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
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


def options_in_place(
    param: str, options: dict[str, Any]
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Typer has no option groups: for a command whose parameter `param` defaults to a dataclass
    instance, typer sees one option per field in its place (`options`: field -> its Annotated
    option, in the order --help lists them), each defaulting to the instance's value, and the
    command gets the instance the given values make. Apply it below `@app.command` (or before
    `app.command(...)(command)`)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(command, include_extras=True)
        signature = inspect.signature(command)
        group = signature.parameters[param]
        params = []
        for p in signature.parameters.values():
            if p is group:
                params += [inspect.Parameter(f"{param}__{field}", p.kind, default=getattr(p.default, field),
                                             annotation=option) for field, option in options.items()]  # fmt: skip
            else:
                params.append(p.replace(annotation=hints.get(p.name, p.annotation)))

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {field: kwargs.pop(f"{param}__{field}") for field in options}
            return command(*args, **{param: type(group.default)(**values)}, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params} | {"return": hints.get("return")}
        return wrapper

    return decorate


# `keys: Keys = Keys()` in a command: --session-key, --item-key, --time-key and --time-unit.
with_event_keys = options_in_place(
    "keys", {"session": SessionKey, "item": ItemKey, "time": TimeKey, "time_unit": TimeUnit}
)

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

ExportedModel = Annotated[
    Path,
    typer.Option(
        "--model", help="Serving graph m.onnx of an export (m.eval.onnx and m.items.parquet beside it)."
    ),
]
BenchSessions = Annotated[
    Path | None,
    typer.Option(
        "--sessions",
        help="Test sessions to replay; default: ../shared/data/diginetica/test.parquet from the current "
        "folder, else synthetic data.",
    ),
]
OrtProvider = Annotated[
    str,
    typer.Option("--provider", help="ONNX Runtime execution provider: auto (CUDA when usable), cuda or cpu."),
]
OrtThreads = Annotated[
    int, typer.Option("--threads", help="ONNX Runtime intra-op threads (0: ORT's default, one per core).")
]
