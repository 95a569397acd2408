"""`gru4rec-cli data ...`: synthetic data, preprocessing protocols, statistics."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from gru4rec.cli_options import EVENTS_HELP, with_event_keys
from gru4rec.data import Keys

data_app = typer.Typer(
    help="Data: synthetic sessions, preprocessing protocols, statistics.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


SPLIT_FILES = ("train_full", "test", "train_tr", "train_valid")  # what split and prepare-rsc15 write
SplitOutDir = Annotated[
    Path,
    typer.Argument(
        metavar="OUTDIR", help="Folder for train_full/test/train_tr/train_valid Parquet and stats."
    ),
]


@data_app.command()
def synth(
    outdir: Annotated[
        Path, typer.Argument(metavar="OUTDIR", help="Folder to write train.parquet and test.parquet into.")
    ],
    sessions: Annotated[
        int,
        typer.Option(help="Number of sessions to generate (before the test filter); 10 to 10,000,000."),
    ] = 20000,
    items: Annotated[int, typer.Option(help="Number of distinct items; 10 to 1,000,000.")] = 2000,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Random seed: same seed, same files.")] = 7,
) -> None:
    """Generate seeded synthetic sessions (Zipf items, persistent session intents, transitions)."""
    from gru4rec.io import check_output_dir
    from gru4rec.synth import generate

    check_output_dir(outdir)
    train, test = generate(sessions, items, seed)
    _write(outdir, {"train": train, "test": test})


@data_app.command("prepare-rsc15")
def prepare_rsc15(
    raw_clicks: Annotated[
        Path,
        typer.Argument(
            metavar="RAW_CLICKS", help="yoochoose-clicks.dat: session,ISO timestamp,item,category lines."
        ),
    ],
    outdir: SplitOutDir,
) -> None:
    """The RSC15 protocol of the GRU4Rec papers: filters, last-day test split, train_tr/train_valid."""
    from gru4rec.prepare import read_rsc15_clicks, rsc15_protocol

    _split_to(
        outdir,
        raw_clicks,
        "RSC15 protocol",
        "clicks",
        lambda: read_rsc15_clicks(raw_clicks),
        lambda ev: (rsc15_protocol(ev), None),
    )


@data_app.command()
@with_event_keys
def split(
    events_file: Annotated[Path, typer.Argument(metavar="EVENTS", help=EVENTS_HELP)],
    outdir: SplitOutDir,
    test_days: Annotated[
        float | None, typer.Option(help="Test = sessions whose last event is in the last N days (default 1).")
    ] = None,
    test_fraction: Annotated[
        float | None, typer.Option(help="Instead of --test-days: the last fraction (0..1) of the time span.")
    ] = None,
    min_item_support: Annotated[
        int,
        typer.Option(help="Drop items with fewer events (repeated with the session filter until stable)."),
    ] = 5,
    min_session_length: Annotated[
        int,
        typer.Option(help="Drop sessions with fewer events (also test sessions after unseen-item removal)."),
    ] = 2,
    dedup: Annotated[
        bool,
        typer.Option(
            "--dedup/--no-dedup", help="Remove consecutive repeats of the same item in a session first."
        ),
    ] = False,
    valid: Annotated[
        bool,
        typer.Option(
            "--valid/--no-valid", help="Also split train_full into train_tr/train_valid the same way."
        ),
    ] = True,
    keys: Keys = Keys(),  # --session-key, --item-key, --time-key, --time-unit (with_event_keys)
) -> None:
    """Time split of your own click log: filters, whole-session test split, unseen test items removed."""
    from gru4rec.data import open_events
    from gru4rec.prepare import SplitConfig, split_with_report

    if test_days is None and test_fraction is None:
        test_days = 1.0
    cfg = SplitConfig(test_days, test_fraction, min_item_support, min_session_length, dedup, valid)
    source = open_events(events_file, keys)
    _say_ignored(source)
    _split_to(outdir, events_file, "split", "events", source.read, lambda ev: split_with_report(ev, cfg))


def _say_ignored(source) -> None:
    if source.ignored:
        print(f"note: columns not used: {', '.join(source.ignored)}", file=sys.stderr)


def _split_to(outdir: Path, source: Path, title: str, noun: str, read, cut) -> None:
    """read -> cut into the SPLIT_FILES frames -> write them; the outputs are checked before reading
    (never over, inside or among the inputs)."""
    from gru4rec.io import check_output_file

    for name in (*(f"{n}.parquet" for n in SPLIT_FILES), "stats.json", "stats.md", "dropped.json"):
        check_output_file(outdir / name, inputs=(source,))
    with _Steps(3) as step:
        step(f"reading {noun}")
        events = read()
        step(f"filtering and splitting {events.height:,} {noun}")
        frames, drops = cut(events)
        step("writing")
        _write(outdir, frames, title=title, owned=SPLIT_FILES, drops=drops)


@data_app.command()
@with_event_keys
def stats(
    file: Annotated[Path, typer.Argument(metavar="EVENTS", help=EVENTS_HELP)],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the statistics as JSON here.")
    ] = None,
    keys: Keys = Keys(),  # --session-key, --item-key, --time-key, --time-unit (with_event_keys)
) -> None:
    """Sessions, events, items, predictions and the session-length distribution of an events file."""
    from rich.console import Console

    from gru4rec.data import open_events
    from gru4rec.io import check_output_file, write_text_atomic
    from gru4rec.stats import dataset_stats, histogram_table, stats_table

    if json_out is not None:
        check_output_file(json_out, inputs=(file,))
    source = open_events(file, keys)
    s = dataset_stats(source.read())
    s["id_types"] = {"session": _kind(source, "session_id"), "item": _kind(source, "item_id")}
    s["ignored_columns"] = source.ignored
    console = Console()
    console.print(stats_table({file.name: s}, title=str(file)))
    console.print(histogram_table(s))
    console.print(
        f"one-event sessions (no prediction, skipped by train and score): {s['length']['histogram'].get('1', 0):,}; "
        f"ids: session {s['id_types']['session']}, item {s['id_types']['item']}; "
        f"columns not used: {', '.join(source.ignored) or 'none'}"
    )
    if json_out is not None:
        write_text_atomic(json_out, json.dumps({"file": str(file), **s}, indent=2) + "\n")


def _kind(source, col: str) -> str:
    from gru4rec.data import id_dtype

    return {"int": "integer", "str": "string"}[id_dtype(source.schema[source.names[col]])]


def _write(
    outdir: Path, frames: dict, title: str = "dataset statistics", owned: tuple = (), drops=None
) -> None:
    """Each frame as OUTDIR/<name>.parquet, their statistics as stats.json and stats.md; print the table.

    Files of an earlier run named in `owned` but not written now are removed, so the folder never
    mixes two runs (stats.json lists exactly the Parquet files beside it)."""
    from rich.console import Console

    from gru4rec.io import write_parquet_atomic, write_text_atomic
    from gru4rec.stats import dataset_stats, stats_table

    stats = {}
    for name, df in frames.items():
        write_parquet_atomic(df, outdir / f"{name}.parquet")
        stats[name] = dataset_stats(df)
    write_text_atomic(outdir / "stats.json", json.dumps(stats, indent=2) + "\n")
    write_text_atomic(outdir / "stats.md", _markdown(stats) + "".join(f"\n- {x}" for x in _lines(drops)))
    if drops is not None:  # what the filters removed and why, per reason
        report = {"one_event_sessions_in_input": drops.one_event_sessions, "events": drops.events}
        write_text_atomic(
            outdir / "dropped.json", json.dumps({**report, "sessions": drops.sessions}, indent=2)
        )
    for name in set(owned) - set(frames):
        (outdir / f"{name}.parquet").unlink(missing_ok=True)
    console = Console()
    console.print(stats_table(stats, title=f"{title}: {outdir}"))
    for line in _lines(drops):
        console.print(line)


def _lines(drops) -> list[str]:
    return drops.lines() if drops is not None else []


def _markdown(stats: dict[str, dict]) -> str:
    rows = [
        "| file | sessions | events | items | predictions | mean len | median len | min/max len |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in stats.items():
        ln = s["length"]
        rows.append(
            f"| {name} | {s['sessions']:,} | {s['events']:,} | {s['items']:,} | {s['predictions']:,} "
            f"| {ln['mean']:.2f} | {ln['median']:g} | {ln['min']}/{ln['max']} |"
        )
    return "\n".join(rows) + "\n"


class _Steps:
    """A rich progress bar over a few named steps (on stderr, so stdout keeps only the results)."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        # Off when stderr is not a terminal: logs and `error:` lines stay clean.
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self._task = self._progress.add_task("", total=total)
        self._started = False

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def __call__(self, description: str) -> None:
        if self._started:
            self._progress.advance(self._task)
        self._started = True
        self._progress.update(self._task, description=description)
