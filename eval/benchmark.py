"""`eval benchmark`: a matrix of datasets x models -> report.md, results.json and PNG plots in one folder.

Config (TOML), paths relative to the working directory:

    [benchmark]
    tie_modes = ["standard", "conservative"]   # the first is the headline
    max_k = 20                                  # curves for k = 1..max_k
    device = "auto"                             # for GRU4Rec training / PyTorch evaluation

    [[dataset]]
    name = "rsc15_100k"
    train = "../shared/data/rsc15_100k/train.parquet"
    test = "../shared/data/rsc15_100k/test.parquet"

    [[model]]                 # GRU4Rec: give onnx (scored by the ONNX Runtime scorer, with latency),
    name = "GRU4Rec"          # checkpoint (PyTorch evaluation; its training history is plotted) or
    kind = "gru4rec"          # preset (+ params) to train here first (then exported and scored).
    preset = "rsc15"
    datasets = ["rsc15_100k"] # optional: restrict a model to some datasets

    [[model]]
    kind = "sknn"             # pop, spop, itemknn, bprmf, sknn, vsknn
    options = { k = 100, sample_size = 500 }
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from gru4rec.data import read_events
from gru4rec.errors import UserError
from gru4rec.eval import baselines
from gru4rec.eval.baselines.base import evaluate, prepare_test, prepare_train
from gru4rec.io import read_toml as io_read_toml
from gru4rec.io import write_text_atomic
from gru4rec.metrics import TIE_MODES

DESCRIPTIONS = {
    "pop": "the most frequent training items, the same list for everyone (top 100)",
    "spop": "items of the current session by count, then POP",
    "itemknn": "items most similar to the current item by session co-occurrence (λ=20, α=0.5, 100 neighbours)",
    "bprmf": "BPR matrix factorisation, sessions as users; a test session is the mean of its items' factors",
    "sknn": "session kNN: the k most similar of the most recent candidate sessions, cosine similarity",
    "vsknn": "session kNN with recent items of the current session weighted more (linear decay)",
    "gru4rec": "GRU4Rec recurrent network, session-parallel training",
}


@dataclass
class DatasetSpec:
    name: str
    train: Path
    test: Path


@dataclass
class ModelSpec:
    kind: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    datasets: list[str] | None = None
    onnx: Path | None = None
    checkpoint: Path | None = None
    preset: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def is_baseline(self) -> bool:
        return self.kind != "gru4rec"


@dataclass
class BenchmarkConfig:
    datasets: list[DatasetSpec]
    models: list[ModelSpec]
    tie_modes: tuple[str, ...] = ("standard", "conservative")
    max_k: int = 20
    device: str = "auto"
    score_batch_size: int = 512
    seed: int = 42


def load_config(path: str | Path) -> BenchmarkConfig:
    raw = read_toml(path)
    top = raw.get("benchmark", {})
    datasets = [_dataset(d, path) for d in raw.get("dataset", [])]
    models = [_model(m, path) for m in raw.get("model", [])]
    if not datasets or not models:
        raise UserError(f"{path}: needs at least one [[dataset]] and one [[model]]")
    modes = tuple(top.get("tie_modes", ("standard", "conservative")))
    bad = [m for m in modes if m not in TIE_MODES]
    if bad or not modes:
        raise UserError(f"{path}: tie_modes must be some of {', '.join(TIE_MODES)}, got {list(modes)}")
    names = [d.name for d in datasets]
    for m in models:
        unknown = set(m.datasets or []) - set(names)
        if unknown:
            raise UserError(f"{path}: model {m.name} names unknown dataset(s) {sorted(unknown)}")
    return BenchmarkConfig(
        datasets, models, modes, int(top.get("max_k", 20)), str(top.get("device", "auto")),
        int(top.get("score_batch_size", 512)), int(top.get("seed", 42)),
    )  # fmt: skip


def read_toml(path: str | Path) -> dict[str, Any]:
    return io_read_toml(path, "config file")


def _dataset(d: dict, path) -> DatasetSpec:
    try:
        return DatasetSpec(str(d["name"]), Path(d["train"]), Path(d["test"]))
    except KeyError as e:
        raise UserError(f"{path}: every [[dataset]] needs name, train and test (missing {e})") from None


def _model(m: dict, path) -> ModelSpec:
    kind = str(m.get("kind", "")).lower().replace("-", "")
    if kind != "gru4rec" and kind not in baselines.NAMES:
        raise UserError(
            f"{path}: [[model]] kind must be gru4rec or one of {', '.join(baselines.NAMES)}, got {kind!r}"
        )
    spec = ModelSpec(
        kind=kind,
        name=str(m.get("name") or (kind.upper() if kind != "gru4rec" else "GRU4Rec")),
        options=dict(m.get("options", {})),
        datasets=list(m["datasets"]) if "datasets" in m else None,
        onnx=Path(m["onnx"]) if "onnx" in m else None,
        checkpoint=Path(m["checkpoint"]) if "checkpoint" in m else None,
        preset=m.get("preset"),
        params=dict(m.get("params", {})),
    )
    if kind == "gru4rec" and not (spec.onnx or spec.checkpoint or spec.preset or spec.params):
        raise UserError(f"{path}: GRU4Rec model {spec.name} needs onnx, checkpoint or preset/params")
    if kind != "gru4rec":
        spec.name = str(m.get("name") or baselines.make(kind).name)
    return spec


# ---------------------------------------------------------------- GRU4Rec: train, export, score


def train_gru4rec(train_events: pl.DataFrame, preset: str | None, params: dict, out: Path, device: str,
                  seed: int, valid_events: pl.DataFrame | None = None) -> Path:  # fmt: skip
    from gru4rec.train.params import resolve
    from gru4rec.train.trainer import train

    cfg = resolve(preset=preset, overrides=params)
    train(train_events, cfg, valid_events=valid_events, device=device, seed=seed, progress=True, out=out)
    return out


def export_onnx(checkpoint: Path, out: Path, top_k: int = 20) -> Path:
    from gru4rec.export.onnx_export import export_bundle

    export_bundle(checkpoint, out, top_k=top_k)
    return out


def score_onnx(
    onnx: Path, test: Path, cutoffs: tuple[int, ...], mode: str, batch_size: int
) -> tuple[dict, np.ndarray]:
    """The score stage's report for `onnx` on `test`, plus the per-step latency samples (ms)."""
    from gru4rec.score.latency import LatencyRecorder
    from gru4rec.score.scorer import ScoreConfig, score

    rec = LatencyRecorder()
    cfg = ScoreConfig(cutoffs=cutoffs, tie_mode=mode, batch_size=batch_size)
    report = score(onnx, test, config=cfg, recorder=rec)
    steps = np.concatenate(rec.steps) * 1e3 if rec.steps else np.zeros(0)
    return report, steps


def _gru4rec_row(spec: ModelSpec, ds: DatasetSpec, train_events, test_events, cfg: BenchmarkConfig,
                 out: Path, console) -> dict:  # fmt: skip
    import torch

    from gru4rec import checkpoint as ckpt_io
    from gru4rec.evaluate import evaluate as torch_evaluate

    cutoffs = tuple(range(1, cfg.max_k + 1))
    row: dict[str, Any] = {"fit_s": None}
    onnx, ckpt_path = spec.onnx, spec.checkpoint
    if ckpt_path is None and onnx is None:
        ckpt_path = out / "models" / f"{ds.name}-{_slug(spec.name)}.pt"
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
        for i, mode in enumerate(cfg.tie_modes):
            report, steps = score_onnx(onnx, ds.test, cutoffs, mode, cfg.score_batch_size)
            metrics[mode] = report["metrics"]
            if i == 0:
                row["latency"], row["step_ms"] = report["latency"], steps
                row["n_unknown_dropped"] = report["n_unknown_dropped"]
    else:
        device = "cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
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
    """Run every (dataset, model) pair; write results.json, report.md and plots into `out`."""
    from rich.console import Console

    from gru4rec.eval import plots, report

    console = Console(stderr=True, quiet=not progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
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
    for ds in cfg.datasets:
        models = [m for m in cfg.models if (m.datasets is None or ds.name in m.datasets)]
        models = [m for m in models if only is None or m.kind in only or m.name.lower() in only]
        if not models:
            continue
        train_events, test_events = read_events(ds.train), read_events(ds.test)
        td, items = prepare_train(train_events)
        ed = prepare_test(test_events, items)
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
                       description=DESCRIPTIONS[spec.kind], options=spec.options)  # fmt: skip
            m = row["metrics"][cfg.tie_modes[0]]
            console.print(
                f"{ds.name} · {spec.name:>10}: Recall@20 {m.get('recall@20', float('nan')):.4f}  "
                f"MRR@20 {m.get('mrr@20', float('nan')):.4f}  ({cfg.tie_modes[0]}; eval {row['eval_s']:.1f}s)",
                markup=False,
            )
            _row_plots(row, out, ds.name)
            results["results"].append(row)
        curves = {
            r["model"]: r["metrics"][cfg.tie_modes[0]] for r in results["results"] if r["dataset"] == ds.name
        }
        name = f"curves_{_slug(ds.name)}.png"
        plots.metric_curves(out / name, f"{ds.name} ({cfg.tie_modes[0]} ties)", curves, cfg.max_k)
        results["plots"][ds.name] = {"curves": name}
    if not results["results"]:
        raise UserError("no (dataset, model) pair to run: check the config and --models")
    for r in results["results"]:
        r.pop("step_ms", None)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, default=_json_default) + "\n")
    write_text_atomic(out / "report.md", report.benchmark_markdown(results))
    return results


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
    slug = f"{_slug(ds_name)}_{_slug(row['model'])}"
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


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


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
