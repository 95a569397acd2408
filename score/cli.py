"""CLI commands of this stage: `score` and `bench score` (heavy imports happen inside the commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gru4rec.cli_options import BenchSessions, ExportedModel, OrtProvider, with_event_keys
from gru4rec.data import Keys
from gru4rec.errors import UserError

# `--engine` and the Ray settings, declared once (eval configs spell them as keys: engine, ray_address, workers).
RAY_HELP = {
    "--engine": "local: this process | ray: shards scored on a Ray cluster (--sessions: Parquet file, folder or glob; --out: a folder, one file per shard). Needs gru4rec\\[ray].",
    "--ray-address": "--engine ray: auto | host:port | ray://host:10001 of a running cluster \\[default: start a local Ray runtime for the run].",
    "--workers": "--engine ray: scorer actors \\[default: one per GPU, else one per --cpus-per-worker CPUs of the cluster].",
    "--gpus-per-worker": "--engine ray: GPUs per scorer (ORT CUDA EP) \\[default: 1 where the cluster has GPUs, else 0: CPU EP].",
    "--cpus-per-worker": "--engine ray: CPUs reserved per scorer (its ORT threads).",
    "--shards": "--engine ray: sessions are cut into this many shards by a stable hash of the session id \\[default: max(16, 4 x workers)].",
}
Engine = Annotated[str, typer.Option("--engine", help=RAY_HELP["--engine"])]
RayAddress = Annotated[str | None, typer.Option("--ray-address", help=RAY_HELP["--ray-address"])]
Workers = Annotated[int | None, typer.Option("--workers", help=RAY_HELP["--workers"])]
GpusPerWorker = Annotated[float | None, typer.Option("--gpus-per-worker", help=RAY_HELP["--gpus-per-worker"])]
CpusPerWorker = Annotated[float, typer.Option("--cpus-per-worker", help=RAY_HELP["--cpus-per-worker"])]
Shards = Annotated[int | None, typer.Option("--shards", help=RAY_HELP["--shards"])]


def parse_cutoffs(text: str) -> tuple[int, ...]:
    try:
        cutoffs = tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise UserError(f"--cutoffs must be comma-separated integers, got {text!r}") from None
    if not cutoffs:
        raise UserError("--cutoffs is empty")
    return cutoffs


def register(app: typer.Typer) -> None:
    app.command("score")(score_cmd)


@with_event_keys
def score_cmd(
    model: ExportedModel,
    sessions: Path = typer.Option(
        ...,
        "--sessions",
        help="Test sessions: a Parquet, TSV or CSV file, a folder of them (hive key=value folders "
        "welcome) or a quoted glob such as 'events/**/*.parquet'; integer or string ids.",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Write recommendations (one row per scored event) to this Parquet file."
    ),
    metrics: Path | None = typer.Option(
        None, "--metrics", help="Write metrics and latency figures to this JSON file."
    ),
    k: int | None = typer.Option(
        None,
        "--k",
        help="Recommendations per event in --out: at most the model's exported top-k \\[default: 20, or that top-k if smaller].",
    ),
    cutoffs: str = typer.Option(
        "1,5,10,20", "--cutoffs", help="Comma-separated cut-offs for Recall@k and MRR@k."
    ),
    tie_mode: str = typer.Option(
        "standard",
        "--tie-mode",
        help="Rank of a target tied with other items: standard (1 + items scored higher) | conservative (ties rank above the target) | median (half the ties above).",
    ),
    batch_size: int = typer.Option(1024, "--batch-size", help="Sessions replayed in parallel (batch mode)."),
    provider: OrtProvider = "auto",
    latency_mode: str = typer.Option(
        "batch",
        "--latency-mode",
        help="batch: session-parallel; online: one session at a time, batch 1, as a server sees it.",
    ),
    tf32: bool = typer.Option(
        False, "--tf32/--no-tf32", help="Allow TF32 matmuls on the CUDA EP (faster, not bit-exact fp32)."
    ),
    chunk_events: int = typer.Option(
        1_000_000, "--chunk-events", help="Events read per chunk (whole sessions); bounds memory use."
    ),
    memory_budget: str | None = typer.Option(
        None,
        "--memory-budget",
        help="Memory for one step's scores beyond the model's weights, e.g. 512MB, 2GB: host memory on the CPU "
        "EP \\[default: a quarter of free memory, at most 1 GiB], GPU memory on CUDA \\[default: half of the "
        "GPU's free memory after the weights]. On the CPU, catalogs whose batch x items scores do not fit, or "
        "are more than 8M cells (where tiles are faster), are scored in tiles of items (same ranks) and the "
        "batch shrinks only when even a tile of 8,192 items does not fit; on CUDA the batch shrinks to fit.",
    ),
    tile_items: int = typer.Option(
        0,
        "--tile-items",
        help="Items per tile of the score matrix (at least the model's top-k; CPU EP only); 0: from "
        "--memory-budget; the catalog's size or more: the whole catalog in one pass.",
    ),
    keys: Keys = Keys(),  # --session-key, --item-key, --time-key, --time-unit (with_event_keys)
    beyond_accuracy: bool = typer.Option(
        False,
        "--beyond-accuracy",
        help="Also coverage@k (share of the catalog in any top-k list) and, with --train, popularity@k "
        "(mean normalised training popularity of the recommended items), for cut-offs up to the model's top-k.",
    ),
    train: Path | None = typer.Option(
        None, "--train", help="Training events, for popularity@k (with --beyond-accuracy)."
    ),
    engine: Engine = "local",
    ray_address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = None,
    cpus_per_worker: CpusPerWorker = 1.0,
    shards: Shards = None,
) -> None:
    """Score test sessions with an exported model: Recall@k / MRR@k, recommendations, latency."""
    from gru4rec.score.scorer import ScoreConfig, score
    from gru4rec.score.tiled import parse_bytes

    cfg = ScoreConfig(
        k=k,
        cutoffs=parse_cutoffs(cutoffs),
        tie_mode=tie_mode,
        batch_size=batch_size,
        latency_mode=latency_mode,
        keys=keys,
        chunk_events=chunk_events,
        beyond_accuracy=beyond_accuracy,
        memory_budget=parse_bytes(memory_budget) if memory_budget is not None else None,
        tile_items=tile_items,
    )
    if engine == "ray":
        from gru4rec.score.ray_engine import RayEngine

        runner = RayEngine(ray_address, workers, gpus_per_worker, cpus_per_worker, shards)
    elif engine == "local":
        from gru4rec.score.scorer import LocalEngine

        ray_only = {"--ray-address": ray_address, "--workers": workers, "--gpus-per-worker": gpus_per_worker,
                    "--shards": shards, "--cpus-per-worker": None if cpus_per_worker == 1.0 else cpus_per_worker}  # fmt: skip
        given = [name for name, value in ray_only.items() if value is not None]
        if given:
            raise UserError(f"{', '.join(given)}: only with --engine ray")
        runner = LocalEngine()
    else:
        raise UserError(f"--engine must be local or ray, got {engine!r}")
    report = score(model, sessions, out=out, metrics=metrics, config=cfg, provider=provider, tf32=tf32,
                   progress=True, train=train, engine=runner)  # fmt: skip
    print_report(report)
    for path, what in ((out, "recommendations"), (metrics, "metrics")):
        if path is not None:
            typer.echo(f"{what}: {path}")


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from gru4rec.score.latency import latency_table_rows
    from gru4rec.score.tiled import describe_memory

    m = report["metrics"]
    table = Table(title="metrics")
    table.add_column("cut-off", justify="right")
    table.add_column("Recall", justify="right")
    table.add_column("MRR", justify="right")
    table.add_column("NDCG", justify="right")
    extra = [n for n in ("coverage", "popularity") if any(f"{n}@{c}" in m for c in report["cutoffs"])]
    for name in extra:
        table.add_column(name.capitalize(), justify="right")
    for c in report["cutoffs"]:
        cells = [f"{m[f'{n}@{c}']:.4f}" if f"{n}@{c}" in m else "–" for n in extra]
        table.add_row(
            str(c), f"{m[f'recall@{c}']:.4f}", f"{m[f'mrr@{c}']:.4f}", f"{m[f'ndcg@{c}']:.4f}", *cells
        )
    lat = Table(title="latency", show_header=False)
    for label, value in latency_table_rows(report["latency"]):
        lat.add_row(label, value)
    console = Console()
    console.print(
        f"{m['n']:,} predictions in {report['n_scored_sessions']:,} sessions, tie mode {report['tie_mode']}"
    )
    if "memory" in report:
        console.print(describe_memory(report["memory"]))
    e = report["engine"]
    if e["name"] != "local":
        console.print(
            f"{e['name']}: {e['workers']} worker(s), {e['shards']} shards, {e['runtime']}; job wall time "
            f"{report['latency']['wall_s']:.1f} s ({report['latency']['wall_events_per_s']:,.0f} scored events/s); "
            f"replay figures below are per step where it ran, phase times summed over the workers"
        )
    console.print(table)
    if report["n_skipped_sessions"]:
        console.print(f"skipped {report['n_skipped_sessions']:,} session(s) with fewer than 2 known events")
    dropped = report["n_unknown_dropped"]
    if dropped:
        console.print(f"dropped {dropped:,} event(s) of items unknown to the model")
    if dropped > report["n_events"] / 2:
        typer.echo(
            f"warning: {dropped / report['n_events']:.0%} of the events are of items the model does not know: "
            "is this the model trained for this data?",
            err=True,
        )
    console.print(lat)


def register_bench(bench_app: typer.Typer) -> None:
    @bench_app.command("score")
    def bench_score_cmd(
        model: Path | None = typer.Option(
            None,
            "--model",
            help="Checkpoint (.pt, exported on the fly; torch runs use it too) or m.onnx (ORT runs only); default: a random-weight diginetica-shaped model (43,097 items, 512 units).",
        ),
        sessions: BenchSessions = None,
        out: Path | None = typer.Option(
            None, "--out", help="Write the results JSON here (default: print the summary only)."
        ),
        batch_size: int = typer.Option(
            1024, "--batch-size", help="Batch size of the CPU comparison (ORT CPU EP vs torch CPU)."
        ),
        online_sessions: int = typer.Option(
            200, "--online-sessions", help="Sessions replayed one at a time for the online (batch 1) latency."
        ),
    ) -> None:
        """ORT vs torch scoring speed side by side in one run (CPU always; CUDA EP batches and online when a GPU exists)."""
        from gru4rec.score.bench import run_bench

        run_bench(
            model=model, sessions=sessions, out=out, batch_size=batch_size, online_sessions=online_sessions
        )


def register_bench_memory(bench_app: typer.Typer) -> None:
    @bench_app.command("score-memory")
    def bench_score_memory_cmd(
        out: Path | None = typer.Option(
            Path("bench/results/score-memory.json"), "--out", help="Write the results JSON here."
        ),
        sizes: str = typer.Option(
            "1000000,10000000", "--sizes", help="Comma-separated test-set sizes in events (smallest first)."
        ),
        workdir: Path | None = typer.Option(
            None, "--workdir", help="Folder for the model and test sets (default: a new temporary folder)."
        ),
    ) -> None:
        """Peak RSS and events/s of `score` (ORT CPU EP) on 1M and 10M synthetic events, one file vs 16 files."""
        from gru4rec.score.bench_memory import run_bench

        run_bench(out, tuple(int(x) for x in sizes.split(",") if x), workdir)
