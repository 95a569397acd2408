"""`eval nightly`: the scheduled offline evaluation.

(Optionally) train and export, score the test sessions with the ONNX model, append the metrics and
latency figures to the history Parquet, compare with the previous run and with the best run, and
write a Markdown report with trend plots. A figure regresses when it is worse than the reference by
more than `abs + rel·|reference|` (numpy's isclose rule: set either tolerance to 0 to use only
the other). Exit codes (CLI): 0 no regression, 1 regression, 2 bad config or unreadable history.

    [nightly]
    history = "nightly/history.parquet"
    out = "nightly/latest"                # this run's report.md, plots, metrics.json (and model)
    test = "data/test.parquet"
    model = "model.onnx"                  # scored as is, unless [nightly.train] trains a new one
    # metrics_json = "metrics.json"       # or: take the figures from `gru4rec-cli score --metrics`
    tie_mode = "standard"

    [nightly.train]                       # optional: train on `train`, export, then score
    train = "data/train.parquet"
    preset = "rsc15"
    params = { n_epochs = 5 }

    [nightly.tolerances]
    metrics = ["recall@20", "mrr@20"]     # higher is better
    latency = ["step_ms_p50", "step_ms_p95"]   # lower is better
    metric_drop_abs = 0.005
    metric_drop_rel = 0.02
    latency_rise_abs_ms = 1.0
    latency_rise_rel = 0.25
    compare_best = true
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from gru4rec.errors import UserError
from gru4rec.eval.benchmark import read_toml
from gru4rec.eval.history import append_run, read_history
from gru4rec.io import write_text_atomic
from gru4rec.metrics import DEFAULT_CUTOFFS, TIE_MODES

EXIT_REGRESSION = 1


@dataclass
class Tolerances:
    metrics: list[str] = field(default_factory=lambda: ["recall@20", "mrr@20"])
    latency: list[str] = field(default_factory=lambda: ["step_ms_p50", "step_ms_p95"])
    metric_drop_abs: float = 0.005
    metric_drop_rel: float = 0.02
    latency_rise_abs_ms: float = 1.0
    latency_rise_rel: float = 0.25
    compare_best: bool = True

    def allowed(self, figure: str, reference: float) -> float:
        if figure in self.latency:
            return self.latency_rise_abs_ms + self.latency_rise_rel * abs(reference)
        return self.metric_drop_abs + self.metric_drop_rel * abs(reference)

    def describe(self) -> str:
        return (
            f"metrics ({', '.join(self.metrics)}) may drop by {self.metric_drop_abs:g} + {self.metric_drop_rel:.0%} "
            f"of the reference; latency ({', '.join(self.latency)}) may rise by {self.latency_rise_abs_ms:g} ms + "
            f"{self.latency_rise_rel:.0%}; compared with the previous run"
            + (" and the best run." if self.compare_best else ".")
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
    train: TrainSpec | None = None
    tolerances: Tolerances = field(default_factory=Tolerances)


def load_config(path: str | Path) -> NightlyConfig:
    raw = read_toml(path)
    top = dict(raw.get("nightly", {}))
    train = top.pop("train", None)
    tol = top.pop("tolerances", None) or raw.get("tolerances", {})
    try:
        cfg = NightlyConfig(
            history=Path(top.pop("history")),
            out=Path(top.pop("out")),
            test=_path(top.pop("test", None)),
            model=_path(top.pop("model", None)),
            metrics_json=_path(top.pop("metrics_json", None)),
            tie_mode=str(top.pop("tie_mode", "standard")),
            cutoffs=tuple(int(k) for k in top.pop("cutoffs", DEFAULT_CUTOFFS)),
            batch_size=int(top.pop("batch_size", 512)),
            train=_train_spec(train) if train is not None else None,
            tolerances=Tolerances(**tol),
        )
    except KeyError as e:
        raise UserError(f"{path}: [nightly] needs {e}") from None
    except TypeError as e:
        raise UserError(f"{path}: unknown option in [nightly.train] or [nightly.tolerances] ({e})") from None
    if top:
        raise UserError(f"{path}: unknown [nightly] option(s) {', '.join(sorted(top))}")
    if cfg.tie_mode not in TIE_MODES:
        raise UserError(f"{path}: tie_mode must be one of {', '.join(TIE_MODES)}, got {cfg.tie_mode!r}")
    if cfg.metrics_json is None and cfg.test is None:
        raise UserError(f"{path}: [nightly] needs test (the sessions to score) or metrics_json")
    if cfg.metrics_json is None and cfg.train is None and cfg.model is None:
        raise UserError(
            f"{path}: [nightly] needs model (an .onnx or .pt), a [nightly.train] table or metrics_json"
        )
    for name in cfg.tolerances.metrics:
        if name not in cfg.tolerances.latency and "@" in name and int(name.split("@")[1]) not in cfg.cutoffs:
            cfg.cutoffs = tuple(sorted({*cfg.cutoffs, int(name.split("@")[1])}))
    return cfg


def _path(value) -> Path | None:
    return None if value is None else Path(value)


def _train_spec(t: dict) -> TrainSpec:
    t = dict(t)
    return TrainSpec(train=Path(t.pop("train")), **t)


# ---------------------------------------------------------------- one run


def run(cfg: NightlyConfig, now: dt.datetime | None = None) -> dict:
    """Do one nightly run; returns the summary (regressions empty when all is well)."""
    history = read_history(cfg.history)  # first: an unreadable history stops the run before any work
    now = now or dt.datetime.now(dt.UTC)
    cfg.out.mkdir(parents=True, exist_ok=True)
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
    console.print(f"nightly: scoring {cfg.test} with {model}")
    report, _ = score_onnx(model, cfg.test, cfg.cutoffs, cfg.tie_mode, cfg.batch_size)
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
    missing = [f for f in cfg.tolerances.metrics + cfg.tolerances.latency if f not in row]
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
    """Regression messages and the comparison table of `row` against the last and the best run."""
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
        refs = {}
        if past:
            refs["previous"] = past[-1]
            refs["best"] = min(past) if lower_better else max(past)
        for which, ref in refs.items():
            entry[which] = ref
            entry[f"{which}_change"] = 100.0 * (cur - ref) / ref if ref else None
            if which == "best" and not tol.compare_best:
                continue
            worse = (cur - ref) if lower_better else (ref - cur)
            if math.isnan(cur) or worse > tol.allowed(figure, ref):
                unit = " ms" if lower_better and figure.startswith("step_ms") else ""
                verb = "rose" if lower_better else "dropped"
                regressions.append(
                    f"{figure} {verb} to {cur:.4f}{unit} from {ref:.4f}{unit} ({which} run; "
                    f"{(cur - ref) / ref * 100 if ref else float('nan'):+.1f}%, allowed "
                    f"{tol.allowed(figure, ref):.4f}{unit})"
                )
        table.append(entry)
    return regressions, table


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
