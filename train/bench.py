"""`bench train`: train the official preset per dataset, record events/s per epoch and final metrics."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from gru4rec.data import BENCH_DATA_DIR

PRESET_OF = {"rsc15_100k": "rsc15", "diginetica": "diginetica"}


def _dataset_jobs(data_dir: Path, datasets: list[str]) -> list[tuple]:
    """(name, preset, loader) per dataset; every named one must exist (a typo is an error, not a skip)."""
    from gru4rec.data import read_events
    from gru4rec.errors import UserError

    if not datasets:
        raise UserError("--datasets is empty")
    missing = [n for n in datasets if not (data_dir / n / "train.parquet").is_file()]
    if missing:
        raise UserError(f"--data-dir {data_dir}: no {', '.join(n + '/train.parquet' for n in missing)}")
    return [
        (
            n,
            PRESET_OF.get(n, "rsc15"),
            lambda n=n: (
                read_events(data_dir / n / "train.parquet"),
                read_events(data_dir / n / "test.parquet"),
            ),
        )
        for n in datasets
    ]


def run_bench(
    data_dir: Path | None,
    out: Path,
    epochs: int,
    device: str,
    datasets: list[str],
    seed: int,
    pairs: list[str],
    preset: str | None = None,
    runs: int = 1,
) -> dict:
    import torch
    from rich.console import Console

    from gru4rec.evaluate import evaluate
    from gru4rec.io import check_output_file, write_text_atomic
    from gru4rec.provenance import git_commit
    from gru4rec.train.params import resolve
    from gru4rec.train.trainer import describe_device, resolve_device, train

    console = Console(stderr=True)
    dev = resolve_device(device)
    check_output_file(out)
    resolve(preset, None, pairs, {"n_epochs": epochs})  # bad -p / --preset fail now, not after a dataset
    n_runs, runs = runs, []
    if data_dir is None and not (BENCH_DATA_DIR / "rsc15_100k" / "train.parquet").exists():
        from gru4rec.synth import generate

        console.print(f"{BENCH_DATA_DIR} not found: benchmarking on synthetic data (demo preset)")
        jobs = [("synthetic-20000x2000", "demo", lambda: generate(20000, 2000, 7))]
    else:
        jobs = _dataset_jobs(data_dir or BENCH_DATA_DIR, datasets)
    if preset is not None:
        jobs = [(name, preset, load) for name, _, load in jobs]
    for (name, preset_name, load), run_seed in ((job, seed + r) for job in jobs for r in range(n_runs)):
        tr, te = load()
        cfg = resolve(preset_name, None, pairs, {"n_epochs": epochs})
        console.print(f"[bold]{name}[/bold] preset {preset_name} seed {run_seed}")
        ck = train(tr, cfg, None, device=str(dev), seed=run_seed, progress=True, console=console)
        m = evaluate(ck.model, ck.items, te, batch_size=cfg.eval_batch_size, device=dev)
        hist = ck.info["history"]
        eps = [h["events_per_s"] for h in hist]
        runs.append(
            {
                "dataset": name,
                "preset": preset_name,
                "seed": run_seed,
                "params": cfg.to_dict(),
                "epochs": epochs,
                "events_per_s": eps,
                "epoch_seconds": [h["seconds"] for h in hist],
                "events_per_s_median": sorted(eps)[len(eps) // 2],
                "train_seconds": sum(h["seconds"] for h in hist),
                "recall@20": m["recall@20"],
                "mrr@20": m["mrr@20"],
                "metrics": m,
                "tie_mode": "standard",
            }
        )
        console.print(
            f"{name}: median {runs[-1]['events_per_s_median']:,.0f} events/s, "
            f"Recall@20 {m['recall@20']:.4f} MRR@20 {m['mrr@20']:.4f}"
        )
    result = {
        "device": describe_device(dev),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "seed": seed,
        "runs": runs,
    }
    write_text_atomic(out, json.dumps(result, indent=2))
    console.print(f"wrote {out}")
    return result
