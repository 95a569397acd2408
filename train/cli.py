"""`gru4rec-cli train` and `gru4rec-cli bench train`. torch is imported inside the commands."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from gru4rec.cli_options import (
    Device,
    Params,
    ParamsFile,
    Quiet,
    Seed,
    Threads,
    TrainEvents,
    with_event_keys,
)
from gru4rec.data import Keys
from gru4rec.errors import EXIT_INTERRUPTED


def _params_epilog() -> str:
    from rich.markup import escape

    from gru4rec.train.params import params_help

    lines = ["Parameters (set with -p key=value or a --params TOML; --preset sets several):"]
    return "\n\n".join(escape(line) for line in lines + [f"  {p}" for p in params_help()])


def register(app: typer.Typer) -> None:
    app.command("train", epilog=_params_epilog())(train_cmd)

    from gru4rec.train.tune import cli as tune_cli

    tune_cli.register(app)


@with_event_keys
def train_cmd(
    ctx: typer.Context,
    train_path: TrainEvents,
    out: Path = typer.Option(
        ..., "--out", help="Model checkpoint to write (rewritten atomically after every epoch)."
    ),
    valid: Path = typer.Option(
        None, "--valid", help="Validation events: Recall@20/MRR@20 after every epoch."
    ),
    preset: str = typer.Option(
        None,
        "--preset",
        help="Named parameter set: rsc15, yoochoose, diginetica, retailrocket, rees46, coveo, demo.",
    ),
    param: Params = [],  # noqa: B006  (typer copies the default)
    params_file: ParamsFile = None,
    epochs: int = typer.Option(
        None, "--epochs", help="Shortcut for -p n_epochs=N (default: the preset's, else 10)."
    ),
    device: Device = "auto",
    seed: Seed = 42,
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run saved in --out."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace the file at --out (kept intact until the first new epoch is saved). Without it, "
        "or --resume, an existing --out is refused.",
    ),
    dwell_boost: float = typer.Option(
        None,
        "--dwell-boost",
        help="Dwell-time boosting threshold T in seconds: repeat an event 1 + floor(dwell/T) times (capped by dwell_cap); default: off.",
    ),
    keys: Keys = Keys(),  # --session-key, --item-key, --time-key, --time-unit (with_event_keys)
    threads: Threads = None,
    quiet: Quiet = False,
) -> None:
    """Train a GRU4Rec model (session-parallel, sampled negatives, official optimiser)."""
    import torch

    from gru4rec.cli import invocation
    from gru4rec.data import check_same_id_types, read_training_events
    from gru4rec.train.params import resolve
    from gru4rec.train.safety import TrainingInterrupted, check_train_output
    from gru4rec.train.trainer import train

    overrides = {}
    if epochs is not None:
        overrides["n_epochs"] = epochs
    if dwell_boost is not None:
        overrides["dwell_boost"] = dwell_boost
    cfg = resolve(preset, params_file, param, overrides)
    check_train_output(out, resume, overwrite, inputs=(train_path, valid, params_file))
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        events = read_training_events(train_path, keys, "training")
        valid_events = read_training_events(valid, keys, "validation") if valid is not None else None
        if valid_events is not None:
            check_same_id_types(events, valid_events, str(train_path), str(valid))
        train(events, cfg, valid_events, device=device, seed=seed, progress=not quiet, out=out,
              resume=resume, overwrite=overwrite)  # fmt: skip
    except TrainingInterrupted as e:
        print(_interrupted_line(e, invocation(ctx)), file=sys.stderr, flush=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:  # while reading or preparing the data: nothing was written
        print(f"interrupted before training started: {out} not written", file=sys.stderr, flush=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _interrupted_line(e, argv: list[str]) -> str:
    """One line for Ctrl-C: which epoch --out holds, and the command that continues from it."""
    args = [a for a in argv if a != "--overwrite"]
    if e.saved_epochs == 0:  # nothing of this run on disk: the same command starts it again
        return (
            f"interrupted in epoch {e.epoch}/{e.n_epochs}, before any epoch was saved ({e.out} not "
            f"written by this run); start again with: {shlex.join(['gru4rec-cli', *argv])}"
        )
    resume = ["gru4rec-cli", *args, *([] if "--resume" in args else ["--resume"])]
    return (
        f"interrupted in epoch {e.epoch}/{e.n_epochs}: {e.out} holds the checkpoint saved after epoch "
        f"{e.saved_epochs}/{e.n_epochs}; resume with: {shlex.join(resume)}"
    )


def register_bench(bench_app: typer.Typer) -> None:
    @bench_app.command("train")
    def bench_train_cmd(
        data_dir: Path = typer.Option(
            None,
            "--data-dir",
            help="Folder holding one sub-folder per dataset (train.parquet, test.parquet); default: ../shared/data from the current folder, or synthetic data when that is absent.",
        ),
        out: Path = typer.Option(Path("bench/results/train-latest.json"), "--out", help="JSON result file."),
        epochs: int = typer.Option(10, "--epochs", help="Epochs per dataset."),
        device: Device = "auto",
        datasets: str = typer.Option(
            "rsc15_100k,diginetica", "--datasets", help="Comma-separated datasets under --data-dir."
        ),
        seed: Seed = 42,
        params: Params = [],  # noqa: B006  (typer copies the default)
        preset: str = typer.Option(
            None,
            "--preset",
            help="Train every dataset with this preset (default: each dataset's own, rsc15 for rsc15_100k, diginetica for diginetica), e.g. the diginetica preset on rsc15_100k.",
        ),
        runs: int = typer.Option(1, "--runs", min=1, help="Runs per dataset (seeds SEED, SEED+1, ...)."),
        threads: Threads = None,
    ) -> None:
        """Training speed (events/s per epoch) and final Recall@20/MRR@20 per dataset, as JSON."""
        from gru4rec.train.bench import run_bench

        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        run_bench(
            data_dir,
            out,
            epochs,
            device,
            [d for d in datasets.split(",") if d],
            seed,
            params,
            preset=preset,
            runs=runs,
        )
