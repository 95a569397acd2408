"""`eval benchmark`: a matrix of datasets x models -> report.md, results.json and PNG plots in one folder.

The config (schema, checks) is eval/benchmark_config.py; the train / export / score calls it shares
with the nightly are eval/pipeline.py. `run` checks the input files and the output folder before the
first dataset is read. Plots of an earlier run into the same folder that this run did not write again
are removed, so the folder always matches its report.md.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from gru4rec.data import event_files, read_events
from gru4rec.errors import UserError
from gru4rec.eval import baselines
from gru4rec.eval.baselines.base import evaluate, prepare_test, prepare_train
from gru4rec.eval.benchmark_config import (
    BenchmarkConfig,
    DatasetSpec,
    ModelSpec,
    file_slug,
    load_config,  # noqa: F401  (its public place: the command's module)
)
from gru4rec.eval.config import check_cuda
from gru4rec.eval.pipeline import export_onnx, ort_provider, score_onnx, train_gru4rec
from gru4rec.io import check_output_dir, write_text_atomic

DESCRIPTIONS = {
    "pop": "the most frequent training items, the same list for everyone (top 100)",
    "spop": "items of the current session by count, then POP",
    "itemknn": "items most similar to the current item by session co-occurrence (λ=20, α=0.5, 100 neighbours)",
    "bprmf": "BPR matrix factorisation, sessions as users; a test session is the mean of its items' factors",
    "sknn": "session kNN: the k most similar of the most recent candidate sessions, cosine similarity",
    "vsknn": "session kNN with recent items of the current session weighted more (linear decay)",
    "gru4rec": "GRU4Rec recurrent network, session-parallel training",
}


# ---------------------------------------------------------------- GRU4Rec: train, export, score


def _gru4rec_row(spec: ModelSpec, ds: DatasetSpec, train_events, test_events, cfg: BenchmarkConfig,
                 out: Path, console) -> dict:  # fmt: skip
    import torch

    from gru4rec import checkpoint as ckpt_io
    from gru4rec.evaluate import evaluate as torch_evaluate

    cutoffs = tuple(range(1, cfg.max_k + 1))
    row: dict[str, Any] = {"fit_s": None}
    onnx, ckpt_path = spec.onnx, spec.checkpoint
    if ckpt_path is None and onnx is None:
        ckpt_path = out / "models" / f"{ds.name}-{file_slug(spec.name)}.pt"
        console.print(f"{ds.name} · training {spec.name} (preset {spec.preset}) -> {ckpt_path}", markup=False)
        t0 = time.perf_counter()
        train_gru4rec(train_events, spec.preset, spec.params, ckpt_path, cfg.device, cfg.seed)
        row["fit_s"] = time.perf_counter() - t0
        onnx = export_onnx(ckpt_path, ckpt_path.with_suffix(".onnx"))
    if ckpt_path is not None:
        ck = ckpt_io.load(ckpt_path)
        row["history"] = ck.info.get("history", [])
        row["params"] = ck.params
        if row["fit_s"] is None and row["history"]:
            row["fit_s"] = float(sum(h.get("seconds", 0.0) for h in row["history"]))
    t0 = time.perf_counter()
    metrics: dict[str, dict] = {}
    if onnx is not None:
        provider = ort_provider()  # once: "auto" would repeat its CPU-fallback notice for every tie mode
        for i, mode in enumerate(cfg.tie_modes):
            report, steps = score_onnx(
                onnx, ds.test, cutoffs, mode, cfg.score_batch_size, provider, cfg.engine
            )
            metrics[mode] = report["metrics"]
            if i == 0:
                row["latency"], row["step_ms"] = report["latency"], steps
                row["n_unknown_dropped"] = report["n_unknown_dropped"]
    else:
        device = "cuda" if cfg.device == "auto" else cfg.device
        device = device if torch.cuda.is_available() else "cpu"  # a CUDA device was checked up front
        model = ck.model.to(device)
        for mode in cfg.tie_modes:
            m = torch_evaluate(model, ck.items, test_events, cutoffs=cutoffs, mode=mode, device=device)
            row["n_unknown_dropped"] = m.pop("n_unknown_dropped")
            metrics[mode] = m
    row["eval_s"] = time.perf_counter() - t0
    row["metrics"] = metrics
    return row


# ---------------------------------------------------------------- the matrix


def run(cfg: BenchmarkConfig, out: str | Path, only: set[str] | None = None, progress: bool = True) -> dict:
    """Run every (dataset, model) pair; write results.json, report.md and plots into `out`.

    `only`: model kinds or names (see `model_key`) to run, None for all. Every input file and the
    output folder are checked before the first dataset is read."""
    from rich.console import Console

    from gru4rec.eval import plots, report

    console = Console(stderr=True, quiet=not progress)
    plan = _plan(cfg, only)
    _check_inputs(cfg, plan)
    out = check_output_dir(out)
    cutoffs = tuple(range(1, cfg.max_k + 1))
    results: dict[str, Any] = {
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{platform.node()} ({platform.machine()}, {_cpu()})",
        "versions": _versions(),
        "tie_modes": list(cfg.tie_modes),
        "headline_mode": cfg.tie_modes[0],
        "cutoffs": list(cutoffs),
        "datasets": {},
        "results": [],
        "plots": {},
    }
    for ds, models in plan:
        train_events, test_events = read_events(ds.train), read_events(ds.test)
        td, items = prepare_train(train_events)
        ed = prepare_test(test_events, items)
        _check_catalog(cfg, ds, models, td.n_items)
        results["datasets"][ds.name] = {
            "train": str(ds.train), "test": str(ds.test),
            "n_train_events": train_events.height, "n_train_sessions": td.n_sessions, "n_items": td.n_items,
            "n_test_events": test_events.height, "n_test_sessions": ed.sessions.n_sessions,
            "n_predictions": ed.n_predictions, "n_unknown_dropped": ed.n_unknown_dropped,
        }  # fmt: skip
        for spec in models:
            if spec.is_baseline:
                row = _baseline_row(spec, td, ed, cutoffs, cfg, console, ds.name)
            else:
                row = _gru4rec_row(spec, ds, train_events, test_events, cfg, out, console)
            row.update(dataset=ds.name, model=spec.name, kind=spec.kind, baseline=spec.is_baseline,
                       description=DESCRIPTIONS[spec.kind], options=spec.options,
                       settings=model_settings(spec, row))  # fmt: skip
            m = row["metrics"][cfg.tie_modes[0]]
            console.print(
                f"{ds.name} · {spec.name:>10}: Recall@20 {m['recall@20']:.4f}  MRR@20 {m['mrr@20']:.4f}  "
                f"({cfg.tie_modes[0]}; eval {row['eval_s']:.1f}s)",
                markup=False,
            )
            _row_plots(row, out, ds.name)
            results["results"].append(row)
        curves = {
            r["model"]: r["metrics"][cfg.tie_modes[0]] for r in results["results"] if r["dataset"] == ds.name
        }
        name = f"curves_{file_slug(ds.name)}.png"
        plots.metric_curves(out / name, f"{ds.name} ({cfg.tie_modes[0]} ties)", curves, cfg.max_k)
        results["plots"][ds.name] = {"curves": name}
    for r in results["results"]:
        r.pop("step_ms", None)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, default=_json_default) + "\n")
    write_text_atomic(out / "report.md", report.benchmark_markdown(results))
    _remove_stale_plots(out, plot_files(results))
    results["tracking_error"] = None
    if cfg.mlflow is not None:
        from gru4rec.eval.tracking import track_benchmark

        results["tracking_error"] = track_benchmark(cfg.mlflow, results, out)
    return results


def model_settings(spec: ModelSpec, row: dict) -> dict[str, Any]:
    """What the report lists for a model: a baseline's options with its defaults filled in; GRU4Rec's
    preset and key training parameters (from its checkpoint, its ONNX metadata or the config)."""
    from gru4rec.eval.report import KEY_PARAMS

    if spec.is_baseline:
        return {**baselines.option_defaults(spec.kind), **spec.options}
    params = row.get("params")
    if params is None and spec.onnx is not None:
        from gru4rec.bundle import read_metadata

        params = read_metadata(spec.onnx).get("hyperparameters")
    if params is None:
        from gru4rec.train.params import resolve

        params = resolve(preset=spec.preset, overrides=spec.params).to_dict()
    settings: dict[str, Any] = {"preset": spec.preset} if spec.preset else {}
    return settings | {k: params[k] for k in KEY_PARAMS if k in params}


def model_key(text: str) -> str:
    """How a model is selected: kind or name, case-insensitive, '-' and '_' ignored (S-POP = spop)."""
    return text.strip().lower().replace("-", "").replace("_", "")


def unknown_selection(cfg: BenchmarkConfig, only: set[str]) -> list[str]:
    """The entries of a model selection that match no model's kind or name in `cfg`."""
    keys = {model_key(m.kind) for m in cfg.models} | {model_key(m.name) for m in cfg.models}
    return sorted(n for n in only if model_key(n) not in keys)


def _plan(cfg: BenchmarkConfig, only: set[str] | None) -> list[tuple[DatasetSpec, list[ModelSpec]]]:
    """(dataset, its selected models) in config order; datasets without a selected model are left out."""
    wanted = None if only is None else {model_key(n) for n in only}
    plan = []
    for ds in cfg.datasets:
        models = [m for m in cfg.models if m.datasets is None or ds.name in m.datasets]
        if wanted is not None:
            models = [m for m in models if model_key(m.kind) in wanted or model_key(m.name) in wanted]
        if models:
            plan.append((ds, models))
    if not plan:
        raise UserError(
            f"no (dataset, model) pair to run: the selection {sorted(only or [])} matches no model"
        )
    return plan


def _check_inputs(cfg: BenchmarkConfig, plan: list[tuple[DatasetSpec, list[ModelSpec]]]) -> None:
    """Every file the plan reads exists, and the models load, before hours go into the first dataset."""
    from gru4rec.bundle import load_bundle

    for ds, models in plan:
        for what, path in (("train", ds.train), ("test", ds.test)):
            try:
                event_files(str(path))  # a file, a folder or a glob of them
            except UserError as e:
                raise UserError(f"{e} ({what} data of dataset {ds.name!r})") from None
        for m in models:
            if m.checkpoint is not None and not m.checkpoint.is_file():
                raise UserError(f"{m.checkpoint}: checkpoint of model {m.name!r} not found")
            if m.onnx is not None:
                n_items = load_bundle(m.onnx).n_items
                if n_items < cfg.max_k:
                    raise UserError(
                        f"{m.onnx}: model {m.name!r} knows {n_items} items, fewer than max_k = {cfg.max_k}"
                    )
    uses_torch = any(m.trains or (m.onnx is None and not m.is_baseline) for _, ms in plan for m in ms)
    if uses_torch:
        check_cuda("[benchmark]", cfg.source, cfg.device)


def _check_catalog(cfg: BenchmarkConfig, ds: DatasetSpec, models: list[ModelSpec], n_items: int) -> None:
    """A GRU4Rec model trained here is scored at every k up to max_k, which the catalog must allow."""
    if n_items < cfg.max_k and any(m.trains for m in models):
        raise UserError(
            f"dataset {ds.name!r} has {n_items} items, fewer than max_k = {cfg.max_k}: lower max_k to score "
            "GRU4Rec trained on it"
        )


# The plot files a benchmark folder holds: written by this module, so it may replace and remove them.
PLOT_PATTERNS = ("curves_*.png", "latency_*.png", "training_*.png")


def plot_files(results: dict) -> list[str]:
    """The names of the plots one run wrote (and its report links to)."""
    names = [p for plots in results["plots"].values() for p in plots.values()]
    return names + [p for r in results["results"] for p in r.get("plots", {}).values()]


def _remove_stale_plots(out: Path, written: list[str]) -> None:
    """Drop plots of an earlier run into the same folder, so the folder matches this run's report."""
    keep = set(written)
    for pattern in PLOT_PATTERNS:
        for path in out.glob(pattern):
            if path.name not in keep and path.is_file() and not path.is_symlink():
                path.unlink()


def _baseline_row(spec: ModelSpec, td, ed, cutoffs, cfg: BenchmarkConfig, console, ds_name: str) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    model = baselines.make(spec.kind, **spec.options)
    model.name = spec.name
    t0 = time.perf_counter()
    with console.status(f"{ds_name} · fitting {spec.name}"):
        model.fit(td)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with Progress(TextColumn(f"{ds_name} · {spec.name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:  # fmt: skip
        task = bar.add_task("eval", total=ed.n_predictions)
        metrics = evaluate(
            model, ed, td.n_items, cutoffs, cfg.tie_modes, on_batch=lambda n: bar.advance(task, n)
        )
    return {
        "metrics": metrics,
        "fit_s": fit_s,
        "eval_s": time.perf_counter() - t0,
        "n_unknown_dropped": ed.n_unknown_dropped,
    }


def _row_plots(row: dict, out: Path, ds_name: str) -> None:
    from gru4rec.eval import plots

    row["plots"] = {}
    slug = f"{file_slug(ds_name)}_{file_slug(row['model'])}"
    steps = row.get("step_ms")
    if steps is not None and len(steps):
        name = f"latency_{slug}.png"
        plots.latency_histogram(
            out / name, f"{row['model']} on {ds_name}", steps, row["latency"].get("batch_size")
        )
        row["plots"]["latency"] = name
    if row.get("history"):
        name = f"training_{slug}.png"
        plots.training_curve(out / name, f"{row['model']} on {ds_name}", row["history"])
        row["plots"]["training"] = name


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (np.ndarray,)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _versions() -> dict[str, str]:
    import scipy
    import torch

    import gru4rec

    return {"gru4rec": gru4rec.__version__, "torch": torch.__version__, "polars": pl.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "python": platform.python_version()}  # fmt: skip


def _cpu() -> str:
    try:
        from gru4rec.score.latency import cpu_name

        return cpu_name()
    except ImportError:
        return platform.processor() or "cpu"
