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
    options = { k = 100, sample_size = 500 }   # the baseline's constructor arguments

Every key is checked when the config is loaded (types, ranges, unknown keys, training preset and
params, baseline options, distinct dataset and model names); `run` checks the input files and the
output folder before the first dataset is read. Plots of an earlier run into the same folder that
this run did not write again are removed, so the folder always matches its report.md.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from gru4rec.data import event_files, read_events
from gru4rec.errors import UserError
from gru4rec.eval import baselines
from gru4rec.eval.baselines.base import evaluate, prepare_test, prepare_train
from gru4rec.eval.config import (
    ENGINE_KEYS,
    MAX_CUTOFF,
    REQUIRED,
    EngineSpec,
    Table,
    array_of_tables,
    check_cuda,
    check_top_level,
    device,
    engine,
    presets,
    training,
)
from gru4rec.io import check_output_dir, write_text_atomic
from gru4rec.io import read_toml as io_read_toml
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

    @property
    def trains(self) -> bool:
        return not self.is_baseline and self.onnx is None and self.checkpoint is None


@dataclass
class BenchmarkConfig:
    datasets: list[DatasetSpec]
    models: list[ModelSpec]
    tie_modes: tuple[str, ...] = ("standard", "conservative")
    max_k: int = 20
    device: str = "auto"
    score_batch_size: int = 512
    seed: int = 42
    engine: EngineSpec = field(default_factory=EngineSpec)
    source: str = "benchmark config"  # the config file, for messages
    mlflow: Any = None  # gru4rec.eval.tracking.MlflowSpec, from [benchmark.mlflow]


# ---------------------------------------------------------------- the config

BENCHMARK_KEYS = ("tie_modes", "max_k", "device", "score_batch_size", "seed", "mlflow", *ENGINE_KEYS)
DATASET_KEYS = ("name", "train", "test")
MODEL_KEYS = ("kind", "name", "datasets", "options", "onnx", "checkpoint", "preset", "params")
GRU4REC_ONLY = ("onnx", "checkpoint", "preset", "params")
HEADLINE_K = 20  # the report's Recall@20 / MRR@20


def load_config(path: str | Path) -> BenchmarkConfig:
    """Read and check every table and key; input files are checked by `run` (only those it needs)."""
    raw = read_toml(path)
    check_top_level(path, raw, ("[benchmark]", "[[dataset]]", "[[model]]"), {})
    top = Table.of(path, "[benchmark]", raw.get("benchmark", {}), BENCHMARK_KEYS)
    cfg = BenchmarkConfig(
        datasets=[_dataset(Table.of(path, f"[[dataset]] #{i}", d, DATASET_KEYS))
                  for i, d in enumerate(array_of_tables(path, raw, "dataset"), 1)],
        models=[_model(Table.of(path, f"[[model]] #{i}", m, MODEL_KEYS))
                for i, m in enumerate(array_of_tables(path, raw, "model"), 1)],
        tie_modes=tuple(top.strings("tie_modes", ("standard", "conservative"), choices=TIE_MODES)),
        max_k=top.integer("max_k", 20, HEADLINE_K, MAX_CUTOFF),
        device=device(top),
        score_batch_size=top.integer("score_batch_size", 512, 1),
        seed=top.integer("seed", 42, 0, 2**32 - 1),
        engine=engine(top),
        source=str(path),
    )  # fmt: skip
    if top.has("mlflow"):
        from gru4rec.eval.tracking import KEYS, spec_from_table

        cfg.mlflow = spec_from_table(
            Table.of(path, "[benchmark.mlflow]", top.raw["mlflow"], KEYS), "gru4rec-benchmark"
        )
    if not cfg.datasets or not cfg.models:
        raise UserError(f"{path}: needs at least one [[dataset]] and one [[model]]")
    _check_unique(path, "[[dataset]]", [d.name for d in cfg.datasets])
    _check_unique(path, "[[model]]", [m.name for m in cfg.models])
    names = [d.name for d in cfg.datasets]
    for m in cfg.models:
        unknown = [n for n in m.datasets or [] if n not in names]
        if unknown:
            raise UserError(
                f"{path}: [[model]] {m.name!r} datasets names unknown dataset(s) {unknown} "
                f"(the [[dataset]] names: {', '.join(names)})"
            )
    return cfg


def read_toml(path: str | Path) -> dict[str, Any]:
    return io_read_toml(path, "config file")


def _dataset(t: Table) -> DatasetSpec:
    return DatasetSpec(t.string("name"), t.path("train", REQUIRED), t.path("test", REQUIRED))


def _check_unique(path: str | Path, table: str, names: list[str]) -> None:
    """Names label report rows and name plot files: two that are equal (or share a file name) would
    merge or overwrite each other's results."""
    seen: dict[str, str] = {}
    for name in names:
        slug = _slug(name)
        if not slug:
            raise UserError(f"{path}: {table} name {name!r} needs a letter or digit (it names plot files)")
        if slug in seen:
            same = "is used twice" if seen[slug] == name else f"and {seen[slug]!r} would share plot files"
            raise UserError(f"{path}: {table} name {name!r} {same}; give each a distinct name")
        seen[slug] = name


def _model(t: Table) -> ModelSpec:
    kinds = ("gru4rec", *baselines.NAMES)
    raw_kind = t.string("kind", REQUIRED)
    kind = raw_kind.lower().replace("-", "").replace("_", "")
    if kind not in kinds:
        raise t.bad("kind", f"one of {', '.join(kinds)}", raw_kind)
    datasets = t.strings("datasets", None)
    if kind == "gru4rec":
        return _gru4rec_model(t, datasets)
    misplaced = [k for k in GRU4REC_ONLY if t.has(k)]
    if misplaced:
        raise t.error(f"{misplaced[0]} is a GRU4Rec key; a {kind} baseline takes options = {{ ... }}")
    options = _baseline_options(t, kind)
    return ModelSpec(kind, t.string("name", baselines.make(kind).name), options, datasets)


def _gru4rec_model(t: Table, datasets: list[str] | None) -> ModelSpec:
    if t.has("options"):
        raise t.error("options is for baselines; GRU4Rec takes preset and params (or onnx / checkpoint)")
    spec = ModelSpec(
        "gru4rec", t.string("name", "GRU4Rec"), datasets=datasets, onnx=t.path("onnx"),
        checkpoint=t.path("checkpoint"), preset=t.string("preset", None, presets()), params=t.mapping("params"),
    )  # fmt: skip
    given = spec.onnx is not None or spec.checkpoint is not None
    if given and (t.has("preset") or t.has("params")):
        raise t.error(
            "takes either onnx / checkpoint (a trained model) or preset / params (train one here), not both"
        )
    if not given and not (t.has("preset") or t.has("params")):
        raise t.error(f"GRU4Rec model {spec.name!r} needs onnx, checkpoint or preset / params")
    for key, suffix in (("onnx", ".onnx"), ("checkpoint", ".pt")):
        path = getattr(spec, key)
        if path is not None and path.suffix != suffix:
            raise t.bad(key, f"a {suffix} file", str(path))
    if not given:
        training(t, spec.preset, spec.params)
    return spec


def _baseline_options(t: Table, kind: str) -> dict[str, Any]:
    """Options checked against the baseline's constructor: known names, the defaults' types, ranges."""
    options = t.mapping("options")
    defaults = baselines.option_defaults(kind)
    table = Table.of(t.file, f"{t.name} options", options, list(defaults))
    for key, default in defaults.items():
        if isinstance(default, bool):
            table.boolean(key, default)
        elif isinstance(default, int):
            table.integer(key, default, 1 if key in POSITIVE_OPTIONS else 0)
        elif isinstance(default, float):
            table.number(key, default)
        elif isinstance(default, str):
            table.string(key, default, STRING_OPTIONS.get(key))
    try:
        baselines.make(kind, **options)  # the constructor's own checks (similarity names, ...)
    except UserError as e:
        raise t.error(f"options: {e}") from None
    return options


# Counts and sizes that must be at least 1; other numeric options may be 0 (seed, sample_size = all).
POSITIVE_OPTIONS = ("top_n", "k", "factors", "epochs", "batch_size")
# String options the constructors do not check themselves.
STRING_OPTIONS = {"score_dtype": ("float32", "float64")}


# ---------------------------------------------------------------- GRU4Rec: train, export, score


def train_gru4rec(train_events: pl.DataFrame, preset: str | None, params: dict, out: Path, device: str,
                  seed: int, valid_events: pl.DataFrame | None = None) -> Path:  # fmt: skip
    from gru4rec.train.params import resolve
    from gru4rec.train.trainer import train

    cfg = resolve(preset=preset, overrides=params)
    # `out` is this command's own file (under its --out folder): a rerun replaces it
    train(train_events, cfg, valid_events=valid_events, device=device, seed=seed, progress=True, out=out,
          overwrite=True)  # fmt: skip
    return out


def export_onnx(checkpoint: Path, out: Path, top_k: int = 20) -> Path:
    from gru4rec.export.onnx_export import export_bundle

    export_bundle(checkpoint, out, top_k=top_k)
    return out


def score_onnx(
    onnx: Path, test: Path, cutoffs: tuple[int, ...], mode: str, batch_size: int, provider: str = "auto",
    engine: EngineSpec | None = None,
) -> tuple[dict, np.ndarray]:  # fmt: skip
    """The score stage's report for `onnx` on `test`, plus the per-step latency samples (ms)."""
    from gru4rec.score.latency import LatencyRecorder
    from gru4rec.score.scorer import ScoreConfig, score

    rec = LatencyRecorder()
    cfg = ScoreConfig(cutoffs=cutoffs, tie_mode=mode, batch_size=batch_size)
    report = score(onnx, test, config=cfg, recorder=rec, provider=provider, engine=score_engine(engine))
    steps = np.concatenate(rec.steps) * 1e3 if rec.steps else np.zeros(0)
    return report, steps


def score_engine(spec: EngineSpec | None):
    """The score stage's engine for an eval config's engine settings (local when none)."""
    if spec is not None and spec.name == "ray":
        from gru4rec.score.ray_engine import RayEngine

        return RayEngine(address=spec.ray_address, workers=spec.workers)
    from gru4rec.score.scorer import LocalEngine

    return LocalEngine()


@functools.cache
def ort_provider() -> str:
    """The ONNX Runtime provider "auto" resolves to, decided (and its notice printed) once per process."""
    from gru4rec.score.ort_backend import resolve_provider

    return resolve_provider("auto")


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
        name = f"curves_{_slug(ds.name)}.png"
        plots.metric_curves(out / name, f"{ds.name} ({cfg.tie_modes[0]} ties)", curves, cfg.max_k)
        results["plots"][ds.name] = {"curves": name}
    for r in results["results"]:
        r.pop("step_ms", None)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, default=_json_default) + "\n")
    write_text_atomic(out / "report.md", report.benchmark_markdown(results))
    _remove_stale_plots(out, plot_files(results))
    results["tracking_error"] = _track(cfg, results, out) if cfg.mlflow is not None else None
    return results


def _track(cfg: BenchmarkConfig, results: dict, out: Path) -> str | None:
    """One MLflow run per (dataset, model), with the nightly's keys; the tracking error or None."""
    from gru4rec.eval.tracking import TrackedRun, log_runs

    mode = results["headline_mode"]
    runs = []
    for r in results["results"]:
        metrics = {k: v for k, v in r["metrics"][mode].items() if k != "n"}
        metrics.update(
            n_predictions=r["metrics"][mode].get("n"), fit_s=r.get("fit_s"), eval_s=r.get("eval_s")
        )
        for key, value in (r.get("latency") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"latency_{key}"] = value
        params = {**r.get("settings", {}), "dataset": r["dataset"], "tie_mode": mode, "kind": r["kind"]}
        tags = {"gru4rec.kind": "benchmark", "gru4rec.dataset": r["dataset"], "gru4rec.model": r["model"]}
        artifacts = [out / "report.md", out / "results.json"] + [out / p for p in r.get("plots", {}).values()]
        runs.append(TrackedRun(f"benchmark {r['dataset']} {r['model']}", params, metrics, tags, artifacts))
    return log_runs(cfg.mlflow, runs)[1]


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
