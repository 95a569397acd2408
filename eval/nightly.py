"""`eval nightly`: the scheduled offline evaluation.

(Optionally) train and export, score the test sessions with the ONNX model, append the metrics and
latency figures to the history Parquet, compare with earlier runs and write a Markdown report with
trend plots. Exit codes (CLI): 0 no regression, 1 regression, 2 bad config, missing input files or
an unreadable history (checked before any work; nothing is written then).

What a figure is compared with:
  - a metric (higher is better) with the previous run and, with `compare_best`, the best run so far;
  - a latency (lower is better, milliseconds per replay step) with the median of the last
    `latency_window` runs (default 5). Step timings of an unchanged model vary from run to run on
    a shared machine; against the fastest run ever (or one lucky previous run) the check would
    ratchet down to the luckiest measurement and then fail at random. The recent median follows
    the usual speed, so one fast or slow run moves it little, while a real slowdown stands out.
A figure regresses when it is worse than its reference by more than `abs + rel·|reference|`
(numpy's isclose rule: set either tolerance to 0 to use only the other). Only runs on the same test
data (by content) in the same tie mode are compared.

Every key is checked when the config is loaded (types, ranges, unknown keys, input files, metric
names, training preset and params); eval/configs/nightly.example.toml documents them:

    [nightly]
    history = "nightly/history.parquet"
    out = "nightly/latest"                # this run's report.md, plots, metrics.json (and model)
    test = "data/test.parquet"
    model = "model.onnx"                  # scored as is, unless [nightly.train] trains a new one
    # metrics_json = "metrics.json"       # or: take the figures from `gru4rec-cli score --metrics`
    tie_mode = "standard"                 # with metrics_json: must be the tie mode it was scored in
    cutoffs = [1, 5, 10, 20]
    batch_size = 512

    [nightly.train]                       # optional: train on `train`, export, then score
    train = "data/train.parquet"
    preset = "rsc15"
    params = { n_epochs = 5 }             # the train stage's parameters
    device = "auto"                       # auto, cpu, cuda
    seed = 42
    top_k = 20                            # of the exported model

    [nightly.tolerances]
    metrics = ["recall@20", "mrr@20"]     # higher is better
    latency = ["step_ms_p50", "step_ms_p95"]   # lower is better
    metric_drop_abs = 0.005
    metric_drop_rel = 0.02
    latency_rise_abs_ms = 1.0
    latency_rise_rel = 0.25
    latency_window = 5                    # latency reference: median of the last 5 runs
    compare_best = true                   # metrics: also compare with the best run so far
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import polars as pl

from gru4rec.errors import UserError
from gru4rec.eval.benchmark import read_toml
from gru4rec.eval.config import (
    ENGINE_KEYS,
    MAX_CUTOFF,
    REQUIRED,
    EngineSpec,
    Table,
    check_cuda,
    check_top_level,
    device,
    engine,
    presets,
    training,
)
from gru4rec.eval.history import append_run, read_history
from gru4rec.io import check_output_dir, check_output_file, write_text_atomic
from gru4rec.metrics import DEFAULT_CUTOFFS, TIE_MODES

EXIT_REGRESSION = 1
EXAMPLE_CONFIG = "eval/configs/nightly.example.toml"
LATENCY_FIGURES = ("step_ms_p50", "step_ms_p95", "step_ms_p99")
METRIC_NAME = re.compile(r"(recall|mrr)@([1-9][0-9]*)")


@dataclass
class Tolerances:
    metrics: list[str] = field(default_factory=lambda: ["recall@20", "mrr@20"])
    latency: list[str] = field(default_factory=lambda: ["step_ms_p50", "step_ms_p95"])
    metric_drop_abs: float = 0.005
    metric_drop_rel: float = 0.02
    latency_rise_abs_ms: float = 1.0
    latency_rise_rel: float = 0.25
    latency_window: int = 5
    compare_best: bool = True

    def allowed(self, figure: str, reference: float) -> float:
        if figure in self.latency:
            return self.latency_rise_abs_ms + self.latency_rise_rel * abs(reference)
        return self.metric_drop_abs + self.metric_drop_rel * abs(reference)

    def reference(self, figure: str, past: list[float]) -> tuple[str, float]:
        """The report's reference for `figure`: the best run for a metric, the recent median for a latency."""
        if figure in self.latency:
            recent = past[-self.latency_window :]
            runs = f"{len(recent)} runs" if len(recent) > 1 else "run"
            return f"median of the last {runs}", statistics.median(recent)
        return "best run", max(past)

    def checked(self, figure: str, past: list[float]) -> list[tuple[str, float]]:
        """The (label, value) pairs `figure` must not be worse than by more than `allowed`."""
        if not past:
            return []
        if figure in self.latency:
            return [self.reference(figure, past)]
        return [("previous run", past[-1])] + ([self.reference(figure, past)] if self.compare_best else [])

    def describe(self) -> str:
        return (
            f"metrics ({', '.join(self.metrics)}) may drop by {self.metric_drop_abs:g} + {self.metric_drop_rel:.0%} "
            f"of the reference, compared with the previous run"
            + (" and the best run" if self.compare_best else "")
            + f"; latency ({', '.join(self.latency)}) may rise by {self.latency_rise_abs_ms:g} ms + "
            f"{self.latency_rise_rel:.0%} over the median of the last {self.latency_window} runs."
        )


@dataclass
class TrainSpec:
    train: Path
    preset: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    seed: int = 42
    top_k: int = 20


@dataclass
class NightlyConfig:
    history: Path
    out: Path
    test: Path | None = None
    model: Path | None = None
    metrics_json: Path | None = None
    tie_mode: str = "standard"
    cutoffs: tuple[int, ...] = DEFAULT_CUTOFFS
    batch_size: int = 512
    engine: EngineSpec = field(default_factory=EngineSpec)
    train: TrainSpec | None = None
    tolerances: Tolerances = field(default_factory=Tolerances)
    source: str = "nightly config"  # the config file, for messages


# ---------------------------------------------------------------- the config

NIGHTLY_KEYS = ("history", "out", "test", "model", "metrics_json", "tie_mode", "cutoffs", "batch_size",
                "train", "tolerances", *ENGINE_KEYS)  # fmt: skip
TRAIN_KEYS = ("train", "preset", "params", "device", "seed", "top_k")
TOLERANCE_KEYS = tuple(f.name for f in fields(Tolerances))


def load_config(path: str | Path) -> NightlyConfig:
    """Read and check the whole config: every key, the input files, the training params."""
    raw = read_toml(path)
    hints = {k: f"did you mean [nightly.{k}]?" for k in ("train", "tolerances")}
    check_top_level(path, raw, ("[nightly]",), hints)
    if "nightly" not in raw:
        raise UserError(f"{path}: needs a [nightly] table (see {EXAMPLE_CONFIG})")
    top = Table.of(path, "[nightly]", raw["nightly"], NIGHTLY_KEYS)
    history, out = top.path("history", REQUIRED), top.path("out", REQUIRED)
    tolerances = _tolerances(
        Table.of(path, "[nightly.tolerances]", top.raw.get("tolerances", {}), TOLERANCE_KEYS)
    )
    train = (
        _train_spec(Table.of(path, "[nightly.train]", top.raw["train"], TRAIN_KEYS))
        if top.has("train")
        else None
    )
    cfg = NightlyConfig(
        history=history,
        out=out,
        test=top.input_file("test"),
        metrics_json=top.input_file("metrics_json"),
        tie_mode=top.string("tie_mode", "standard", TIE_MODES),
        cutoffs=tuple(top.integers("cutoffs", DEFAULT_CUTOFFS, 1, MAX_CUTOFF)),
        batch_size=top.integer("batch_size", 512, 1),
        engine=engine(top),
        train=train,
        tolerances=tolerances,
        source=str(path),
    )  # fmt: skip
    _check_sources(cfg, top)
    cfg.model = _model(top, uses_model=cfg.metrics_json is None and cfg.train is None)
    # the cut-offs the compared metrics need are scored even when `cutoffs` leaves them out
    needed = {int(METRIC_NAME.fullmatch(m).group(2)) for m in tolerances.metrics}
    cfg.cutoffs = tuple(sorted({*cfg.cutoffs, *needed}))
    if cfg.metrics_json is not None:
        _check_metrics_json(cfg, top)
    return cfg


def _tolerances(t: Table) -> Tolerances:
    metrics = t.raw.get("metrics", Tolerances().metrics)
    ok = (
        isinstance(metrics, list)
        and all(isinstance(m, str) and _metric_cutoff(m) for m in metrics)
        and len(set(metrics)) == len(metrics)
    )
    if not ok:
        raise t.bad("metrics", f"a list of distinct metric names recall@K or mrr@K (K from 1 to {MAX_CUTOFF})",
                    metrics)  # fmt: skip
    return Tolerances(
        metrics=list(metrics),
        latency=t.strings("latency", Tolerances().latency, choices=LATENCY_FIGURES, allow_empty=True),
        metric_drop_abs=t.number("metric_drop_abs", 0.005),
        metric_drop_rel=t.number("metric_drop_rel", 0.02),
        latency_rise_abs_ms=t.number("latency_rise_abs_ms", 1.0),
        latency_rise_rel=t.number("latency_rise_rel", 0.25),
        latency_window=t.integer("latency_window", 5, 1),
        compare_best=t.boolean("compare_best", True),
    )


def _metric_cutoff(name: str) -> int | None:
    match = METRIC_NAME.fullmatch(name)
    k = int(match.group(2)) if match else None
    return k if k is not None and k <= MAX_CUTOFF else None


def _train_spec(t: Table) -> TrainSpec:
    spec = TrainSpec(
        train=t.input_file("train", REQUIRED),
        preset=t.string("preset", None, presets()),
        params=t.mapping("params"),
        device=device(t),
        seed=t.integer("seed", 42, 0, 2**32 - 1),
        top_k=t.integer("top_k", 20, 1),
    )
    training(t, spec.preset, spec.params)
    check_cuda(t.name, t.file, spec.device)
    return spec


def _check_sources(cfg: NightlyConfig, top: Table) -> None:
    """Where the figures come from: scored now (test + model or training) or an earlier metrics JSON."""
    if cfg.metrics_json is not None and cfg.train is not None:
        raise top.error("metrics_json and a [nightly.train] table exclude each other: the JSON's figures would be "
                        "reported and the training ignored")  # fmt: skip
    if cfg.metrics_json is None and cfg.test is None:
        raise top.error("needs test (the sessions to score) or metrics_json")
    if cfg.metrics_json is None and cfg.train is None and not top.has("model"):
        raise top.error("needs model (an .onnx or .pt), a [nightly.train] table or metrics_json")


def _model(top: Table, uses_model: bool) -> Path | None:
    """The model to score; with metrics_json or [nightly.train] it is only a label and need not exist."""
    model = top.path("model")
    if model is None or not uses_model:
        return model
    if model.suffix not in (".onnx", ".pt"):
        raise top.bad("model", "an .onnx export or a .pt checkpoint", str(model))
    return top.input_file("model")


def _check_metrics_json(cfg: NightlyConfig, top: Table) -> None:
    """The JSON must be of the configured tie mode and hold every figure the tolerances compare."""
    report = _read_metrics_json(cfg.metrics_json)
    scored = report.get("tie_mode")
    if scored is not None and scored != cfg.tie_mode:
        default = "" if top.has("tie_mode") else " (the default)"
        raise top.error(
            f"tie_mode is {cfg.tie_mode!r}{default} but {cfg.metrics_json} was scored in tie mode {scored!r}; "
            f'set tie_mode = "{scored}" or score again with --tie-mode {cfg.tie_mode}'
        )
    missing = _missing_figures(report, cfg.tolerances)
    if missing:
        raise UserError(
            f"{cfg.metrics_json}: has no {', '.join(missing)}; change [nightly.tolerances] in {cfg.source} "
            "or score with the cut-offs it compares"
        )


def _missing_figures(report: dict, tol: Tolerances) -> list[str]:
    metrics, latency = report.get("metrics") or {}, report.get("latency") or {}
    return [f for f in tol.metrics if f not in metrics] + [f for f in tol.latency if f not in latency]


# ---------------------------------------------------------------- one run


def run(cfg: NightlyConfig, now: dt.datetime | None = None) -> dict:
    """Do one nightly run; returns the summary (regressions empty when all is well)."""
    # Unusable outputs and an unreadable history stop the run before any work (and before a long
    # training), and the history is never written when it could not be read.
    check_output_file(cfg.history, inputs=_inputs(cfg))
    history = read_history(cfg.history)
    check_output_dir(cfg.out)
    if cfg.metrics_json is None and cfg.train is None and cfg.model.suffix == ".onnx":
        _check_catalog(cfg, cfg.model)
    now = now or dt.datetime.now(dt.UTC)
    report, model = _measure(cfg)
    row = _row(cfg, report, model, now)
    comparable = _comparable(history, row)
    regressions, table = compare(comparable, row, cfg.tolerances)
    row["status"] = "regression" if regressions else "ok"
    history = append_run(cfg.history, history, row)
    summary = {
        "current": row,
        "regressions": regressions,
        "table": table,
        "n_runs": history.height,
        "n_comparable": comparable.height,
        "tolerances": cfg.tolerances.describe(),
        "report": str(cfg.out / "report.md"),
    }
    plots = _trend_plots(_comparable(history, row), cfg)
    from gru4rec.eval.report import nightly_markdown

    write_text_atomic(cfg.out / "report.md", nightly_markdown(summary, plots))
    write_text_atomic(cfg.out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _inputs(cfg: NightlyConfig) -> tuple[Path, ...]:
    paths = (cfg.test, cfg.model, cfg.metrics_json, cfg.train.train if cfg.train else None)
    return tuple(p for p in paths if p is not None)


def _check_catalog(cfg: NightlyConfig, model: Path) -> None:
    """Every cut-off must fit in the model's catalog; the scorer's own message would name CLI flags."""
    from gru4rec.bundle import read_metadata

    n_items = read_metadata(model)["n_items"]
    too_large = [k for k in cfg.cutoffs if k > n_items]
    if too_large:
        raise UserError(
            f"{cfg.source}: cut-off(s) {too_large} of [nightly] cutoffs or [nightly.tolerances] metrics exceed "
            f"the {n_items} items of {model}"
        )


def _measure(cfg: NightlyConfig) -> tuple[dict, str]:
    """(the score stage's metrics-JSON dict, model path): from a given JSON or by scoring now."""
    from rich.console import Console

    console = Console(stderr=True)
    if cfg.metrics_json is not None:
        return _read_metrics_json(cfg.metrics_json), str(cfg.model or cfg.metrics_json)
    from gru4rec.eval.benchmark import export_onnx, score_onnx, train_gru4rec

    model = cfg.model
    if cfg.train is not None:
        from gru4rec.data import read_events

        t = cfg.train
        console.print(f"nightly: training on {t.train} (preset {t.preset})")
        model = train_gru4rec(
            read_events(t.train), t.preset, t.params, cfg.out / "model.pt", t.device, t.seed
        )
    if model is not None and model.suffix == ".pt":
        console.print(f"nightly: exporting {model}")
        model = export_onnx(model, cfg.out / "model.onnx", top_k=cfg.train.top_k if cfg.train else 20)
        _check_catalog(cfg, model)
    console.print(f"nightly: scoring {cfg.test} with {model}")
    report, _ = score_onnx(model, cfg.test, cfg.cutoffs, cfg.tie_mode, cfg.batch_size, engine=cfg.engine)
    report["model"] = str(model)
    write_text_atomic(cfg.out / "metrics.json", json.dumps(report, indent=2, default=str) + "\n")
    return report, str(model)


def _read_metrics_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: metrics JSON not found")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict):
        raise UserError(f"{path}: not a metrics JSON of `gru4rec-cli score` (no 'metrics' object)")
    return report


def _row(cfg: NightlyConfig, report: dict, model: str, now: dt.datetime) -> dict:
    row: dict[str, Any] = {
        "run_id": now.strftime("%Y%m%dT%H%M%SZ"),
        "time": now.isoformat(timespec="seconds"),
        "status": "",
        "model": model,
        "test": str(cfg.test) if cfg.test else "",
        "test_fingerprint": _fingerprint(cfg.test),
        "tie_mode": str(report.get("tie_mode", cfg.tie_mode)),
    }
    for key, value in report["metrics"].items():
        if key != "n" and isinstance(value, (int, float)):
            row[key] = float(value)
    row["n_predictions"] = int(report["metrics"].get("n", 0))
    for key, value in (report.get("latency") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[key] = float(value)
    missing = _missing_figures(report, cfg.tolerances)
    if missing:
        raise UserError(
            f"the scorer's report has no {', '.join(missing)}: fix [nightly.tolerances] or the cut-offs"
        )
    return row


def _fingerprint(test: Path | None) -> str:
    if test is None or not test.is_file():
        return ""
    from gru4rec.data import fingerprint, read_events

    return fingerprint(read_events(test))


def _comparable(history: pl.DataFrame, row: dict) -> pl.DataFrame:
    """Runs on the same test data (by content) in the same tie mode: others are not compared."""
    h = history
    for key in ("tie_mode", "test_fingerprint"):
        if key in h.columns:
            h = h.filter(pl.col(key).fill_null("") == row[key])
        elif h.height:
            h = h.clear()
    return h


def compare(history: pl.DataFrame, row: dict, tol: Tolerances) -> tuple[list[str], list[dict]]:
    """Regression messages and the comparison table of `row` against earlier runs (see the module doc)."""
    regressions: list[str] = []
    table: list[dict] = []
    for figure in tol.metrics + tol.latency:
        lower_better = figure in tol.latency
        cur = row[figure]
        entry: dict[str, Any] = {"name": figure, "current": cur}
        past = (
            history[figure].cast(pl.Float64).drop_nulls().drop_nans().to_list()
            if figure in history.columns
            else []
        )
        if past:
            kind, ref = tol.reference(figure, past)
            entry.update(previous=past[-1], previous_change=_change(cur, past[-1]),
                         reference=ref, reference_change=_change(cur, ref), reference_kind=kind)  # fmt: skip
        for which, ref in tol.checked(figure, past):
            worse = (cur - ref) if lower_better else (ref - cur)
            if math.isnan(cur) or worse > tol.allowed(figure, ref):
                unit = " ms" if lower_better else ""
                verb = "rose" if lower_better else "dropped"
                regressions.append(
                    f"{figure} {verb} to {cur:.4f}{unit} from {ref:.4f}{unit} ({which}; "
                    f"{(cur - ref) / ref * 100 if ref else float('nan'):+.1f}%, allowed "
                    f"{tol.allowed(figure, ref):.4f}{unit})"
                )
        table.append(entry)
    return regressions, table


def _change(cur: float, ref: float) -> float | None:
    return 100.0 * (cur - ref) / ref if ref else None


def _trend_plots(history: pl.DataFrame, cfg: NightlyConfig) -> dict[str, str]:
    from gru4rec.eval import plots

    runs = history["run_id"].to_list()
    flagged = [s == "regression" for s in history["status"].to_list()]
    out: dict[str, str] = {}
    groups = (("metrics", cfg.tolerances.metrics, "metric value", "Accuracy over nightly runs"),
              ("latency", cfg.tolerances.latency, "milliseconds per replay step", "Scorer latency over nightly runs"))  # fmt: skip
    for key, figures, ylabel, title in groups:
        series = {f: history[f].cast(pl.Float64).to_list() for f in figures if f in history.columns}
        if series:
            name = f"trend_{key}.png"
            plots.trends(cfg.out / name, f"{title} ({cfg.tie_mode} ties)" if key == "metrics" else title,
                         runs, series, ylabel, flagged)  # fmt: skip
            out[title] = name
    return out
