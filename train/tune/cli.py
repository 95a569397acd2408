"""`gru4rec-cli tune`: the command line of train/tune/ (torch and optuna are imported inside)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from gru4rec.cli_options import (
    Device,
    Quiet,
    TrainEvents,
    params_option,
    seed_option,
    threads_option,
    with_event_keys,
)
from gru4rec.data import Keys
from gru4rec.errors import EXIT_INTERRUPTED

EPILOG = (
    "Outputs in DIR: best.toml (gru4rec-cli train TRAIN --params best.toml), trials.parquet, report.md "
    "with plots/, study.json (which study they are of), study.db (the default storage) and, with "
    "--final-test, final/. One study per DIR: a run of another study there (another --space, --study or "
    "--storage) is refused before anything is written. Re-running the same command resumes the study "
    "with new proposals: a configuration the study already has is never trained again (a proposal that "
    "repeats one is skipped and said). A trial interrupted by a crash or kill is marked failed and not "
    "counted."
)
TuneSeed = seed_option(
    "Random seed of every trial's training and of the sampler; a resumed, topped-up or parallel start "
    "continues with its own stream from it (the same commands give the same trials)."
)
TuneThreads = threads_option("CPU threads per worker (default: cores / n-jobs).")
FixedParams = params_option(
    "Fix a parameter for every trial (repeatable): -p key=value, also embedding_mode=shared|separate|onehot; "
    "a searched one leaves the search."
)


def register(app: typer.Typer) -> None:
    app.command("tune", epilog=EPILOG)(tune_cmd)


@with_event_keys
def tune_cmd(
    train_path: TrainEvents,
    out: Path = typer.Option(
        ...,
        "--out",
        help="Output folder DIR (created if needed), for one study: another study there is refused.",
    ),
    valid: Path = typer.Option(
        None,
        "--valid",
        help="Validation events. Default: the last --valid-days of TRAIN, cut as `data split` cuts train_tr/train_valid.",
    ),
    valid_days: float = typer.Option(
        1.0,
        "--valid-days",
        help="Without --valid: validation = sessions ending in the last N days of TRAIN.",
    ),
    space: str = typer.Option(
        "xe",
        "--space",
        help="Search space: xe, bpr-max (the official ones) or a TOML file of the same form.",
    ),
    preset: str = typer.Option(
        None,
        "--preset",
        help="Preset for the parameters the space leaves alone; with --final-test it is also trained and scored for comparison.",
    ),
    param: FixedParams = [],  # noqa: B006  (typer copies the default)
    n_trials: int = typer.Option(
        100, "--n-trials", help="Target number of finished (complete + pruned) trials in the study."
    ),
    timeout: float = typer.Option(None, "--timeout", help="Start no new trial after this many seconds."),
    metric: str = typer.Option(
        "mrr@20", "--metric", help="Validation metric to maximise: mrr@20 or recall@20."
    ),
    storage: str = typer.Option(
        None,
        "--storage",
        help="Optuna RDB storage URL (e.g. postgresql://user@host/db) shared by several processes or machines; default: sqlite in DIR.",
    ),
    study: str = typer.Option(None, "--study", help="Study name (default: the space's name)."),
    pruner: str = typer.Option(
        "median", "--pruner", help="Prune on the per-epoch validation metric: median, hyperband or none."
    ),
    device: Device = "auto",
    seed: TuneSeed = 42,
    n_jobs: int = typer.Option(
        1,
        "--n-jobs",
        help="Trials at once: extra worker processes on the same study (one per GPU in turn; on the CPU each gets cores/K threads).",
    ),
    threads: TuneThreads = None,
    final_test: Path = typer.Option(
        None,
        "--final-test",
        help="Test events: retrain the best parameters (and --preset) on the whole TRAIN, export to ONNX and score.",
    ),
    keys: Keys = Keys(),  # --session-key, --item-key, --time-key, --time-unit (with_event_keys)
    mlflow_uri: str = typer.Option(
        None,
        "--mlflow-uri",
        help="Also log the search to MLflow (any tracking URI, e.g. sqlite:///mlruns.db), with the "
        "keys eval nightly uses; needs gru4rec\\[mlflow]. A tracking failure is a warning.",
    ),
    mlflow_experiment: str = typer.Option(
        "gru4rec-tune", "--mlflow-experiment", help="MLflow experiment of --mlflow-uri."
    ),
    quiet: Quiet = False,
) -> None:
    """Search hyperparameters with Optuna (pruning, resumable, parallel); write best.toml and a report."""
    from gru4rec.train.tune import TuneOptions, run_tune

    opts = TuneOptions(
        train=train_path,
        out=out,
        valid=valid,
        space=space,
        preset=preset,
        params=list(param),
        n_trials=n_trials,
        timeout=timeout,
        metric=metric.strip().lower(),
        storage=storage,
        study=study,
        pruner=pruner.strip().lower(),
        device=device,
        seed=seed,
        n_jobs=n_jobs,
        threads=threads,
        final_test=final_test,
        valid_days=valid_days,
        keys=keys,
        progress=not quiet,
    )
    spec = _mlflow_spec(mlflow_uri, mlflow_experiment)  # before the search: a missing MLflow is said first
    summary = run_tune(opts)
    if summary.get("interrupted"):
        raise typer.Exit(EXIT_INTERRUPTED)
    if spec is not None:
        from gru4rec.train.tune.report import track

        error = track(spec, out, summary, opts.metric, study or Path(str(space)).stem)
        if error is not None:
            print(f"warning: {error}", file=sys.stderr)


def _mlflow_spec(uri: str | None, experiment: str):
    """Where --mlflow-uri logs the search; a UserError when MLflow is not installed."""
    if uri is None:
        return None
    from gru4rec.errors import UserError
    from gru4rec.eval.tracking import INSTALL, MlflowSpec

    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UserError(f"--mlflow-uri needs MLflow, which is not installed: {INSTALL}") from None
    return MlflowSpec(uri, experiment)
