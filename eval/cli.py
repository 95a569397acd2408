"""`gru4rec-cli eval ...`: baselines, the benchmark report and the nightly offline evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gru4rec.errors import UserError

eval_app = typer.Typer(help="Evaluate: baselines, benchmark reports with plots, nightly regression checks.",
                       no_args_is_help=True)  # fmt: skip


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")


def _model_filter(models: str | None) -> list[str] | None:
    """The --models selection in order; None when the option is left out, a UserError when it names nothing."""
    if models is None:
        return None
    names = list(dict.fromkeys(m.strip() for m in models.split(",") if m.strip()))
    if not names:
        raise UserError(f"--models {models!r} names no model; give comma-separated kinds or names")
    return names


@eval_app.command("benchmark")
def benchmark_cmd(
    config: Annotated[
        Path, typer.Option("--config", help="Benchmark TOML: \\[\\[dataset]] and \\[\\[model]] tables.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for report.md, results.json and the PNG plots.")],
    models: Annotated[
        str | None,
        typer.Option(
            "--models",
            help="Run only these models of the config: comma-separated kinds (pop, gru4rec, ...) or names. "
            "Default: all models of the config.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run datasets x models; write report.md (Recall@20, MRR@20, change vs the best baseline), results.json, plots."""
    from gru4rec.eval.benchmark import load_config, plot_files, run, unknown_selection

    cfg = load_config(config)
    only = _model_filter(models)
    unknown = unknown_selection(cfg, only) if only is not None else []
    if unknown:
        raise UserError(f"--models: no model {', '.join(map(repr, unknown))} in {config} ({_choices(cfg)})")
    results = run(cfg, out, only=set(only) if only is not None else None)
    if results.get("tracking_error"):
        required = cfg.mlflow.required
        typer.echo(f"{'error' if required else 'warning'}: {results['tracking_error']}", err=True)
        if required:
            raise typer.Exit(1)
    typer.echo(f"wrote {out / 'report.md'}, {out / 'results.json'} and {len(plot_files(results))} plots "
               f"({len(results['results'])} results)")  # fmt: skip


def _choices(cfg) -> str:
    """What --models may name in `cfg`: the kinds, and the names that are more than a kind's spelling."""
    from gru4rec.eval.benchmark import model_key

    kinds = list(dict.fromkeys(m.kind for m in cfg.models))
    names = [m.name for m in cfg.models if model_key(m.name) not in kinds]
    return f"kinds: {', '.join(kinds)}" + (f"; names: {', '.join(names)}" if names else "")


@eval_app.command("baselines")
def baselines_cmd(
    train: Annotated[Path, typer.Option("--train", help="Training events (Parquet, TSV or CSV).")],
    test: Annotated[Path, typer.Option("--test", help="Test events, scored next-item by next-item.")],
    models: Annotated[
        str,
        typer.Option("--models", help="Comma-separated baselines: pop, spop, itemknn, bprmf, sknn, vsknn."),
    ] = "pop,spop,itemknn,bprmf,sknn,vsknn",
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Also write a benchmark folder (report.md, results.json, plots)."),
    ] = None,
) -> None:
    """Fit and score the baselines on one train/test pair; prints Recall@20 and MRR@20 per tie mode."""
    import tempfile

    from rich.console import Console
    from rich.table import Table

    from gru4rec.eval import baselines
    from gru4rec.eval.benchmark import BenchmarkConfig, DatasetSpec, ModelSpec, model_key, run

    names = list(dict.fromkeys(model_key(n) for n in _model_filter(models) or ()))
    for n in names:
        if n not in baselines.NAMES:
            raise UserError(f"--models: unknown baseline {n!r}; use some of {', '.join(baselines.NAMES)}")
    specs = [ModelSpec(kind=n, name=baselines.make(n).name) for n in names]
    cfg = BenchmarkConfig(
        [DatasetSpec(train.stem if train.stem != "train" else train.parent.name, train, test)], specs
    )
    with tempfile.TemporaryDirectory() as tmp:
        results = run(cfg, out or tmp)
    table = Table(title=f"baselines on {test}")
    for col in ("model", "Recall@20", "MRR@20", "Recall@20 (cons.)", "MRR@20 (cons.)", "fit s", "eval s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in results["results"]:
        s, c = r["metrics"]["standard"], r["metrics"]["conservative"]
        table.add_row(r["model"], f"{s['recall@20']:.4f}", f"{s['mrr@20']:.4f}", f"{c['recall@20']:.4f}",
                      f"{c['mrr@20']:.4f}", f"{r['fit_s']:.2f}", f"{r['eval_s']:.2f}")  # fmt: skip
    Console().print(table)


@eval_app.command("nightly")
def nightly_cmd(
    config: Annotated[
        Path,
        typer.Option(
            "--config", help="Nightly TOML; every key is documented in eval/configs/nightly.example.toml."
        ),
    ],
    as_of: Annotated[
        str | None,
        typer.Option(
            "--as-of",
            help="With [nightly.window]: the day to test on (latest, today or YYYY-MM-DD), overriding the "
            "config's as_of. Run it for each of the last N days to backfill the history (one row per day; "
            "re-running a day replaces its row).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Train/export/score as configured, append to the history, compare with earlier runs.

    Metrics are compared with the previous and the best run (window runs: earlier days are the trend, not the gate). Latency: against a champion, both are timed side by side in interleaved pairs (latency_pairs, default 7) and a regression needs the challenger slower in three quarters of them, its median slower by more than both the tolerance and the spread of the repeats; without one, against the median of the last runs (latency_window, default 5), only where runs of one export measure the spread (a rise is timed again, latency_confirm, default 2). Otherwise, repeats of one model spreading wider than the tolerance are "latency inconclusive": reported, never a failure.

    Exit codes: 0 no regression; 1 regression (a metric dropped or a latency rose past the tolerances); 2 bad input or config, missing files or an unreadable history (all checked before any work).

    Config keys: see eval/configs/nightly.example.toml.
    """
    from gru4rec.eval.nightly import EXIT_REGRESSION, load_config, run

    if as_of is not None:
        from gru4rec.eval.window import parse_as_of

        parse_as_of(as_of, "--as-of")
    cfg = load_config(config)
    summary = run(cfg, as_of=as_of)
    tracking = summary.get("tracking_error")
    if tracking:
        required = cfg.mlflow is not None and cfg.mlflow.required
        typer.echo(f"{'error' if required else 'warning'}: {tracking}" + (
            " (mlflow_required = true)" if required else "; the history and report were written"), err=True)  # fmt: skip
        if required and not summary["regressions"]:
            raise typer.Exit(EXIT_REGRESSION)
    if summary["regressions"]:
        typer.echo("REGRESSION:", err=True)
        for line in summary["regressions"]:
            typer.echo(f"  {line}", err=True)
        typer.echo(f"report: {summary['report']}", err=True)
        raise typer.Exit(EXIT_REGRESSION)
    if summary.get("promoted"):
        typer.echo(
            f"promoted: {summary['promoted']['from']} is now the champion {summary['promoted']['champion']}"
        )
    typer.echo(
        f"ok: no regression against {summary['n_comparable']} earlier run(s); report: {summary['report']}"
    )


def register_bench(bench_app: typer.Typer) -> None:
    @bench_app.command("catalog")
    def bench_catalog_cmd(
        out: Path | None = typer.Option(
            Path("bench/results/catalog-cpu.json"),
            "--out",
            help="Write the results JSON here (after each size).",
        ),
        sizes: str = typer.Option(
            "50000,500000,5000000", "--sizes", help="Comma-separated catalog sizes in items (smallest first)."
        ),
        units: int = typer.Option(100, "--units", help="GRU units (one layer) of every model."),
        memory_budget: str | None = typer.Option(
            None, "--memory-budget", help="Passed to every `score` run (default: score's own default)."
        ),
        workdir: Path | None = typer.Option(
            None,
            "--workdir",
            help="Folder for the logs, models and bundles (default: a new temporary folder).",
        ),
    ) -> None:
        """Train 1 epoch, export and score (CPU) at growing catalog sizes: events/s and peak RSS per stage."""
        from gru4rec.eval.bench_catalog import run_bench

        run_bench(out, tuple(int(x) for x in sizes.split(",") if x), units, workdir, memory_budget)
