"""`gru4rec-cli eval ...`: baselines, the benchmark report and the nightly offline evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

eval_app = typer.Typer(help="Evaluate: baselines, benchmark reports with plots, nightly regression checks.",
                       no_args_is_help=True)  # fmt: skip


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")


def _model_filter(models: str | None) -> set[str] | None:
    if not models:
        return None
    return {m.strip().lower().replace("-", "") for m in models.split(",") if m.strip()}


@eval_app.command("benchmark")
def benchmark_cmd(
    config: Annotated[
        Path, typer.Option("--config", help="Benchmark TOML: [[dataset]] and [[model]] tables.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for report.md, results.json and the PNG plots.")],
    models: Annotated[
        str | None,
        typer.Option(
            "--models", help="Run only these models of the config (comma-separated kinds or names)."
        ),
    ] = None,
) -> None:
    """Run datasets x models; write report.md (Recall@20, MRR@20, change vs the best baseline), results.json, plots."""
    from gru4rec.eval.benchmark import load_config, run

    results = run(load_config(config), out, only=_model_filter(models))
    typer.echo(f"wrote {out / 'report.md'}, {out / 'results.json'} and {len(list(out.glob('*.png')))} plots "
               f"({len(results['results'])} results)")  # fmt: skip


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

    from gru4rec.eval.benchmark import BenchmarkConfig, DatasetSpec, ModelSpec, run

    names = sorted(_model_filter(models) or set(), key=lambda n: models.lower().replace("-", "").find(n))
    from gru4rec.eval import baselines

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
        Path, typer.Option("--config", help="Nightly TOML (see eval/configs/nightly.example.toml).")
    ],
) -> None:
    """Train/export/score as configured, append to the history, compare; exit 1 on a regression."""
    from gru4rec.eval.nightly import EXIT_REGRESSION, load_config, run

    summary = run(load_config(config))
    if summary["regressions"]:
        typer.echo("REGRESSION:", err=True)
        for line in summary["regressions"]:
            typer.echo(f"  {line}", err=True)
        typer.echo(f"report: {summary['report']}", err=True)
        raise typer.Exit(EXIT_REGRESSION)
    typer.echo(
        f"ok: no regression against {summary['n_runs'] - 1} earlier run(s); report: {summary['report']}"
    )
