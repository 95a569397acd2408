"""`gru4rec-cli train` and `gru4rec-cli bench train`. torch is imported inside the commands."""

from __future__ import annotations

from pathlib import Path

import typer


def _params_epilog() -> str:
    from rich.markup import escape

    from gru4rec.train.params import params_help

    lines = ["Parameters (set with -p key=value or a --params TOML; --preset sets several):"]
    return "\n\n".join(escape(line) for line in lines + [f"  {p}" for p in params_help()])


def register(app: typer.Typer) -> None:
    @app.command("train", epilog=_params_epilog())
    def train_cmd(
        train_path: Path = typer.Argument(
            ..., metavar="TRAIN", help="Training events (Parquet, TSV or CSV)."
        ),
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
        param: list[str] = typer.Option(
            [], "-p", "--param", help="Override one parameter: -p key=value (repeatable)."
        ),
        params_file: Path = typer.Option(
            None, "--params", help="TOML file of parameters (applied after --preset, before -p)."
        ),
        epochs: int = typer.Option(
            None, "--epochs", help="Shortcut for -p n_epochs=N (default: the preset's, else 10)."
        ),
        device: str = typer.Option("auto", "--device", help="auto (GPU when present), cuda or cpu."),
        seed: int = typer.Option(
            42, "--seed", min=0, max=2**32 - 1, help="Random seed (initialisation, dropout, sampling)."
        ),
        resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run saved in --out."),
        dwell_boost: float = typer.Option(
            None,
            "--dwell-boost",
            help="Dwell-time boosting threshold T in seconds: repeat an event 1 + floor(dwell/T) times (capped by dwell_cap); default: off.",
        ),
        session_key: str = typer.Option(
            "session_id", "--session-key", help="Session id column in the input files."
        ),
        item_key: str = typer.Option("item_id", "--item-key", help="Item id column in the input files."),
        time_key: str = typer.Option("time", "--time-key", help="Timestamp column in the input files."),
        threads: int = typer.Option(
            None, "--threads", min=1, help="CPU threads for torch (default: torch's choice)."
        ),
        quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
    ) -> None:
        """Train a GRU4Rec model (session-parallel, sampled negatives, official optimiser)."""
        import torch

        from gru4rec.data import Keys, read_events
        from gru4rec.io import check_output_file
        from gru4rec.train.params import resolve
        from gru4rec.train.trainer import train

        overrides = {}
        if epochs is not None:
            overrides["n_epochs"] = epochs
        if dwell_boost is not None:
            overrides["dwell_boost"] = dwell_boost
        cfg = resolve(preset, params_file, param, overrides)
        check_output_file(out, inputs=(train_path, valid, params_file))
        if threads is not None:
            torch.set_num_threads(threads)
        keys = Keys(session_key, item_key, time_key)
        events = read_events(train_path, keys)
        valid_events = read_events(valid, keys) if valid is not None else None
        train(events, cfg, valid_events, device=device, seed=seed, progress=not quiet, out=out, resume=resume)

    from gru4rec.train import tune_cli

    tune_cli.register(app)


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
        device: str = typer.Option("auto", "--device", help="auto, cuda or cpu."),
        datasets: str = typer.Option(
            "rsc15_100k,diginetica", "--datasets", help="Comma-separated datasets under --data-dir."
        ),
        seed: int = typer.Option(42, "--seed", min=0, max=2**32 - 1, help="Random seed."),
        params: list[str] = typer.Option(
            [], "-p", "--param", help="Extra parameter override for every run, e.g. -p tf32=true."
        ),
    ) -> None:
        """Training speed (events/s per epoch) and final Recall@20/MRR@20 per dataset, as JSON."""
        from gru4rec.train.bench import run_bench

        run_bench(data_dir, out, epochs, device, [d for d in datasets.split(",") if d], seed, params)
