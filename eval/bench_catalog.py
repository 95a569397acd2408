"""`gru4rec-cli bench catalog`: train, export and score as the catalog grows (50k, 500k, 5M items).

A synthetic log per size in which every item of the catalog occurs (a random permutation of all
items, then Zipf-popular draws, cut into sessions of 2-8 events), so the trained model really has
N items. Each stage runs as its own `gru4rec-cli` process whose own peak RSS (VmHWM) is measured:
train 1 epoch (100 units by default; CPU), export (verified; external data where the weights need
it), score metrics-only with the default memory budget. Reported per size: events/s and peak RSS
of each stage, the bundle's bytes on disk, and scoring's FLOP rate (scored events x items x units
per second), whose ratio to the smallest catalog's says whether the tiled path keeps its speed.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import polars as pl

from gru4rec.bundle import bundle_paths
from gru4rec.provenance import git_commit
from gru4rec.score.bench_memory import cli_peak_rss

SIZES = (50_000, 500_000, 5_000_000)
EVENTS_PER_ITEM = 1.1  # training events per catalog item: every item once, the rest Zipf draws
TEST_EVENTS = 20_000
T0 = 1_700_000_000


def catalog_log(n_items: int, n_events: int, seed: int, every_item: bool = True) -> pl.DataFrame:
    """Sessions of 2-8 events, `n_events` in all (at least `n_items` with `every_item`), item ids
    1,000,000 + [0, n_items): each item once if `every_item`, the rest Zipf-popular draws."""
    rng = np.random.default_rng(seed)
    extra = n_events - n_items if every_item else n_events
    ranks = np.minimum(rng.zipf(1.3, max(extra, 0)), n_items) - 1  # Zipf popularity over a permutation
    popular = np.random.default_rng(0).permutation(n_items)  # the same popular items in train and test
    items = np.concatenate([rng.permutation(n_items) if every_item else [], popular[ranks]]).astype(np.int64)
    rng.shuffle(items)
    lengths = rng.integers(2, 9, len(items) // 2 + 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), len(items)) + 1]
    session = np.repeat(np.arange(len(lengths)), lengths)[: len(items)]
    time_ = T0 + session * 60 + np.arange(len(items)) % 9  # ordered inside each session
    return pl.DataFrame({"session_id": session, "item_id": items + 1_000_000, "time": time_})


def run_bench(out: Path | None, sizes=SIZES, units: int = 100, workdir: Path | None = None,
              memory_budget: str | None = None) -> dict:  # fmt: skip
    from rich.console import Console

    from gru4rec.io import check_output_file, scratch_dir, write_text_atomic

    if out is not None:
        check_output_file(out)
    console = Console(stderr=True)
    runs = []
    for n in sizes:  # one size's files at a time: the largest alone takes gigabytes
        console.print(f"[bold]{n:,} items x {units} units[/]")
        with scratch_dir(f"gru4rec-bench-catalog-{n}-", workdir and Path(workdir, f"n{n}")) as folder:
            runs.append(_one_size(n, units, folder, console, memory_budget))
        if out is not None:  # each size as it completes: a long run killed late keeps what it measured
            write_text_atomic(out, json.dumps(_result(runs, units), indent=2) + "\n")
    result = _result(runs, units)
    console.print_json(json.dumps(result["ratios"]))
    return result


def _one_size(n: int, units: int, folder: Path, console, memory_budget: str | None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    train, test = folder / "train.parquet", folder / "test.parquet"
    log = catalog_log(n, int(n * EVENTS_PER_ITEM), seed=n)
    log.write_parquet(train)
    catalog_log(n, TEST_EVENTS, seed=n + 1, every_item=False).write_parquet(test)
    model, onnx = folder / "m.pt", folder / "m.onnx"
    params = folder / "params.toml"
    params.write_text(
        f'layers = [{units}]\nbatch_size = 32\nn_sample = 2048\nn_epochs = 1\nloss = "cross-entropy"\n'
    )
    stages = {
        "train": ["train", train, "--out", model, "--params", params, "--device", "cpu", "--quiet", "--overwrite"],
        "export": ["export", model, "--out", onnx],
        "score": ["score", "--model", onnx, "--sessions", test, "--metrics", folder / "metrics.json",
                  "--provider", "cpu", *(["--memory-budget", memory_budget] if memory_budget else [])],
    }  # fmt: skip
    row: dict = {"n_items": n, "units": units, "train_events": log.height}
    for stage, args in stages.items():
        console.print(f"  {stage} ...")
        t0 = time.perf_counter()
        rss_kib = cli_peak_rss(args)
        row[stage] = {"wall_s": time.perf_counter() - t0, "peak_rss_mib": rss_kib / 1024}
        console.print(f"    {row[stage]['wall_s']:.1f} s, peak RSS {rss_kib / 1024:,.0f} MiB")
    report = json.loads((folder / "metrics.json").read_text())
    row["train"]["events_per_s"] = log.height / row["train"]["wall_s"]
    row["score"] |= {
        "n_events": report["n_events"],
        "n_predictions": report["n_predictions"],
        "events_per_s": report["latency"]["events_per_s"],  # scored events per replay second
        "memory": report["memory"],
    }
    row["score"]["flop_rate"] = 2 * row["score"]["events_per_s"] * n * units
    row["bundle_bytes"] = {p.name: p.stat().st_size for p in bundle_paths(onnx)}
    row["weights_bytes"] = n * (units + 1) * 4
    return row


def _result(runs: list[dict], units: int) -> dict:
    return {
        "what": "train 1 epoch, export, score (CPU) as the catalog grows: events/s and peak RSS per stage",
        "host": f"{platform.node()} ({platform.machine()})",
        "commit": git_commit(),
        "units": units,
        "runs": runs,
        "ratios": _ratios(runs),
    }


def _ratios(runs: list[dict]) -> dict:
    """Against the smallest catalog: scoring FLOP rate, and peak RSS beyond the weights."""
    if len(runs) < 2:
        return {}
    base = runs[0]
    base_rss = base["score"]["peak_rss_mib"]
    out = {}
    for r in runs[1:]:
        weights_mib = r["weights_bytes"] / 2**20
        out[str(r["n_items"])] = {
            "score_flop_rate_over_smallest": r["score"]["flop_rate"] / base["score"]["flop_rate"],
            "score_rss_over_smallest_plus_weights": r["score"]["peak_rss_mib"] / (base_rss + weights_mib),
            "score_rss_minus_weights_mib": r["score"]["peak_rss_mib"] - weights_mib,
        }
    return out
