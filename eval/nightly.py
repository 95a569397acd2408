"""`eval nightly`: the scheduled offline evaluation.

(Optionally) train and export, score the test sessions with the ONNX model, append the metrics and
latency figures to the history Parquet, compare with earlier runs and write a Markdown report with
trend plots. Exit codes (CLI): 0 no regression, 1 regression, 2 bad config, missing input files or
an unreadable history (checked before any work; nothing is written then).

What a figure is compared with:
  - a metric (higher is better) with the previous run and, with `compare_best`, the best run so far
    (window runs: each day tests other sessions, so earlier days are the trend, never the gate);
  - a latency (lower is better), with a champion: champion and challenger timed side by side
    (eval/latency_gate.py, interleaved pairs in one process or one Ray worker); without one, with the
    median of the last `latency_window` runs, and only where runs of one same export measure the
    spread between runs within the tolerance (an unchanged model cannot regress; its runs that
    differ measure the machine). A latency past its tolerance there is timed again
    (`latency_confirm` times) and the best measurement counts. Repeats of one model that spread
    wider than the tolerance make the verdict "inconclusive": reported, never a failure.
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
    latency = ["ms_per_1k_events"]        # lower is better
    metric_drop_abs = 0.005
    metric_drop_rel = 0.02
    latency_rise_abs_ms = 1.0
    latency_rise_rel = 0.25
    latency_window = 5                    # latency reference: median of the last 5 runs
    compare_best = true                   # metrics: also compare with the best run so far
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import polars as pl

from gru4rec.data import ITEM, SESSION, TIME, TIME_UNITS
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
from gru4rec.eval.history import read_history, upsert_runs
from gru4rec.eval.window import WindowSpec
from gru4rec.io import check_output_dir, check_output_file, write_text_atomic
from gru4rec.metrics import DEFAULT_CUTOFFS, TIE_MODES

EXIT_REGRESSION = 1
EXAMPLE_CONFIG = "eval/configs/nightly.example.toml"
LATENCY_FIGURES = ("ms_per_1k_events", "full_step_ms_p50", "full_step_ms_p95", "step_ms_p50", "step_ms_p95",
                   "step_ms_p99")  # fmt: skip
# The replay steps a latency figure is computed from (the minimum-steps rule counts them).
STEP_COUNT = {"full_step_ms_p50": "n_full_steps", "full_step_ms_p95": "n_full_steps"}
METRIC_NAME = re.compile(r"(recall|mrr|ndcg)@([1-9][0-9]*)")
UNKNOWN_SHARE = "unknown_share"
CONFIRM_PAUSE_S = 1.0  # between a latency alarm and its re-measurement: let a passing stall pass


@dataclass
class Tolerances:
    metrics: list[str] = field(default_factory=lambda: ["recall@20", "mrr@20"])
    # Replay time per scored event (all steps) stays put for an unchanged model; percentiles over
    # every step do not: the batch shrinks at the end of each chunk, and p95 of ~20 steps is noise.
    latency: list[str] = field(default_factory=lambda: ["ms_per_1k_events"])
    metric_drop_abs: float = 0.005
    metric_drop_rel: float = 0.02
    latency_rise_abs_ms: float = 1.0
    latency_rise_rel: float = 0.25
    latency_window: int = 5
    compare_best: bool = True
    min_latency_steps: int = 30  # a latency gate over fewer replay steps is refused, not trusted
    latency_confirm: int = 2  # a latency past its tolerance is timed again this often; the best counts
    max_unknown_share: float = 0.5  # test events of items the model does not know, at most
    latency_pairs: int = 7  # champion vs challenger: interleaved timing pairs (A B, B A, ...)
    latency_sample_events: int = 50_000  # ... each a replay of the test's first sessions up to this size

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
            f"{self.latency_rise_rel:.0%}: against a champion, both timed in {self.latency_pairs} interleaved "
            f"pairs in one process on up to {self.latency_sample_events:,} test events, a regression when the "
            "challenger is slower by more than that in three quarters of the pairs; against earlier runs, "
            f"over the median of the last {self.latency_window} runs (each from at least "
            f"{self.min_latency_steps} replay steps; a rise is timed again up to {self.latency_confirm} "
            "times, the best counts). Either is 'inconclusive' (reported, not a failure) when repeats of one "
            "model spread wider than the tolerance, or across runs when no model was run twice. Window "
            "runs: earlier days tested other sessions, so their metrics are the trend, not the gate. At most "
            f"{self.max_unknown_share:.0%} of the test events may be of items the model does not know."
        )


@dataclass
class TrainSpec:
    train: Path | None  # None: the [nightly.window]'s training days
    preset: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    seed: int = 42
    top_k: int = 20


@dataclass
class ChampionSpec:
    model: Path  # the production bundle's serving graph (eval graph and item map beside it)
    promote: bool = False  # replace it with a challenger that is not worse


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
    window: WindowSpec | None = None
    champion: ChampionSpec | None = None
    mlflow: Any = None  # gru4rec.eval.tracking.MlflowSpec (imported only when configured)
    source: str = "nightly config"  # the config file, for messages


# ---------------------------------------------------------------- the config

NIGHTLY_KEYS = ("history", "out", "test", "model", "metrics_json", "tie_mode", "cutoffs", "batch_size",
                "train", "tolerances", "window", "champion", "mlflow", *ENGINE_KEYS)  # fmt: skip
TRAIN_KEYS = ("train", "preset", "params", "device", "seed", "top_k")
WINDOW_KEYS = tuple(f.name for f in fields(WindowSpec))
CHAMPION_KEYS = ("model", "promote")
TABLES = ("train", "tolerances", "window", "champion", "mlflow")
TOLERANCE_KEYS = tuple(f.name for f in fields(Tolerances))


def load_config(path: str | Path) -> NightlyConfig:
    """Read and check the whole config: every key, the input files, the training params."""
    raw = read_toml(path)
    hints = {k: f"did you mean [nightly.{k}]?" for k in TABLES}
    check_top_level(path, raw, ("[nightly]",), hints)
    if "nightly" not in raw:
        raise UserError(f"{path}: needs a [nightly] table (see {EXAMPLE_CONFIG})")
    top = Table.of(path, "[nightly]", raw["nightly"], NIGHTLY_KEYS)
    history, out = top.path("history", REQUIRED), top.path("out", REQUIRED)
    tolerances = _tolerances(
        Table.of(path, "[nightly.tolerances]", top.raw.get("tolerances", {}), TOLERANCE_KEYS)
    )
    window = (
        _window_spec(Table.of(path, "[nightly.window]", top.raw["window"], WINDOW_KEYS))
        if top.has("window")
        else None
    )
    train = (
        _train_spec(Table.of(path, "[nightly.train]", top.raw["train"], TRAIN_KEYS), window is not None)
        if top.has("train")
        else None
    )
    cfg = NightlyConfig(
        history=history,
        out=out,
        test=top.input_events("test"),
        metrics_json=top.input_file("metrics_json"),
        tie_mode=top.string("tie_mode", "standard", TIE_MODES),
        cutoffs=tuple(top.integers("cutoffs", DEFAULT_CUTOFFS, 1, MAX_CUTOFF)),
        batch_size=top.integer("batch_size", 512, 1),
        engine=engine(top),
        train=train,
        tolerances=tolerances,
        window=window,
        source=str(path),
    )  # fmt: skip
    _check_sources(cfg, top)
    cfg.model = _model(top, uses_model=cfg.metrics_json is None and cfg.train is None)
    if top.has("mlflow"):
        from gru4rec.eval.tracking import KEYS, spec_from_table

        cfg.mlflow = spec_from_table(
            Table.of(path, "[nightly.mlflow]", top.raw["mlflow"], KEYS), "gru4rec-nightly"
        )
    if top.has("champion"):
        cfg.champion = _champion_spec(
            Table.of(path, "[nightly.champion]", top.raw["champion"], CHAMPION_KEYS), cfg
        )
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
        raise t.bad("metrics", f"a list of distinct metric names recall@K, mrr@K or ndcg@K (K from 1 to {MAX_CUTOFF})",
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
        min_latency_steps=t.integer("min_latency_steps", 30, 1),
        latency_confirm=t.integer("latency_confirm", 2, 0),
        max_unknown_share=_share(t, "max_unknown_share", 0.5),
        latency_pairs=t.integer("latency_pairs", 7, 2, 1000),
        latency_sample_events=t.integer("latency_sample_events", 50_000, 2),
    )


def _share(t: Table, key: str, default: float) -> float:
    value = t.number(key, default)
    if value > 1:
        raise t.bad(key, "a share between 0 and 1", value)
    return value


def _metric_cutoff(name: str) -> int | None:
    match = METRIC_NAME.fullmatch(name)
    k = int(match.group(2)) if match else None
    return k if k is not None and k <= MAX_CUTOFF else None


def _window_spec(t: Table) -> WindowSpec:
    from gru4rec.eval.window import parse_as_of

    spec = WindowSpec(
        events=t.string("events"),
        as_of=parse_as_of(t.string("as_of", "latest"), f"{t.file}: {t.name} as_of"),
        train_days=t.integer("train_days", 30, 1, 3650),
        test_days=t.integer("test_days", 1, 1, 3650),
        min_item_support=t.integer("min_item_support", 5, 1),
        min_session_length=t.integer("min_session_length", 2, 2),
        dedup=t.boolean("dedup", False),
        min_test_events=t.integer("min_test_events", 500, 1),
        session_key=t.string("session_key", SESSION),
        item_key=t.string("item_key", ITEM),
        time_key=t.string("time_key", TIME),
        time_unit=t.string("time_unit", "auto", ("auto", *TIME_UNITS)),
    )
    return spec


def _champion_spec(t: Table, cfg: NightlyConfig) -> ChampionSpec:
    """The production model scored beside the challenger; a missing file is allowed only with
    promote = true (the first challenger that passes becomes the champion)."""
    spec = ChampionSpec(model=t.path("model", REQUIRED), promote=t.boolean("promote", False))
    if spec.model.suffix != ".onnx":
        raise t.bad("model", "an .onnx export (its .eval.onnx and .items.parquet beside it)", str(spec.model))
    if not spec.model.is_file() and not spec.promote:
        raise t.error(
            f"model: file not found: {spec.model} (with promote = true a first champion is installed)"
        )
    if cfg.metrics_json is not None:
        raise t.error("and metrics_json exclude each other: the challenger must be a model scored now")
    if cfg.train is None and (cfg.model is None or cfg.model.suffix != ".onnx"):
        raise t.error(
            "needs a challenger: a [nightly.train] table (trained by this run) or model = an .onnx export"
        )
    if cfg.model is not None and cfg.train is None and cfg.model.resolve() == spec.model.resolve():
        raise t.error("model is the champion itself; name the challenger's export in [nightly] model")
    return spec


def _train_spec(t: Table, windowed: bool = False) -> TrainSpec:
    if windowed and t.has("train"):
        raise t.error("train and [nightly.window] exclude each other: the window cuts the training data")
    spec = TrainSpec(
        train=None if windowed else t.input_events("train", REQUIRED),
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
    if cfg.window is not None and (cfg.test is not None or cfg.metrics_json is not None):
        raise top.error(
            "test / metrics_json and [nightly.window] exclude each other: the window cuts the test data"
        )
    if cfg.metrics_json is None and cfg.test is None and cfg.window is None:
        raise top.error("needs test (the sessions to score), a [nightly.window] or metrics_json")
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
    check_latency_steps(report, cfg.tolerances, str(cfg.metrics_json))
    _check_provenance(cfg, report)


def _check_provenance(cfg: NightlyConfig, report: dict) -> None:
    """A metrics JSON is recorded as the figures of `test` and `model`: it must have been scored on
    exactly that test data (content fingerprint) with exactly that export (export id)."""
    from gru4rec.score.scorer import sessions_fingerprint

    again = f"score again: gru4rec-cli score --model {cfg.model or 'MODEL'} --sessions {cfg.test or 'TEST'} --metrics {cfg.metrics_json}"
    if cfg.test is not None:
        scored = report.get("test_fingerprint")
        if not scored:
            raise UserError(f"{cfg.metrics_json}: records no test_fingerprint (scored by an older gru4rec-cli "
                            f"score), so it cannot be tied to {cfg.test}; {again}")  # fmt: skip
        expected = sessions_fingerprint(cfg.test)
        if scored != expected:
            raise UserError(
                f"{cfg.metrics_json}: was scored on other test data (fingerprint {scored}) than {cfg.test} "
                f"({expected}); {again}"
            )
    if cfg.model is not None and cfg.model.suffix == ".onnx" and cfg.model.is_file():
        from gru4rec.bundle import read_metadata

        expected = read_metadata(cfg.model)["export_id"]
        scored = report.get("model_export_id")
        if scored != expected:
            what = f"export {scored}" if scored else "an unrecorded export (an older gru4rec-cli score)"
            raise UserError(
                f"{cfg.metrics_json}: was scored with {what}, not with {cfg.model} (export {expected}); {again}"
            )


def planned_steps(test: Path, batch_size: int) -> dict[str, int]:
    """The replay steps scoring `test` will take (`n_steps`, `n_full_steps`), as the scorer plans them,
    with every item known (an upper bound: unknown items only shorten sessions). Lets a latency gate
    that cannot be met be refused before an hour of training, not after it."""
    from gru4rec.items import INDEX
    from gru4rec.score.replay import plan_chunk
    from gru4rec.score.source import SessionSource

    source = SessionSource(test)
    batch = min(batch_size, source.stats.n_multi_sessions)
    n = full = 0
    for chunk in source.chunks():
        plan = plan_chunk(chunk.with_columns(pl.lit(0, pl.Int64).alias(INDEX)), batch)
        if plan is not None:
            n += len(plan.width)
            full += int((plan.width == batch).sum())
    return {"n_steps": n, "n_full_steps": full}


def check_latency_steps(report: dict, tol: Tolerances, source: str) -> None:
    """Refuse a latency gate resting on too few replay steps: its percentiles would be noise."""
    latency = report.get("latency") or {}
    for figure in tol.latency:
        key = STEP_COUNT.get(figure, "n_steps")
        n = latency.get(key)
        if not isinstance(n, int) or n < tol.min_latency_steps:
            got = f"{n} such steps" if isinstance(n, int) else f"no {key} count"
            hint = (
                "gate on ms_per_1k_events (all steps), lower batch_size, score more sessions"
                if figure != "ms_per_1k_events"
                else "score more sessions or lower batch_size"
            )
            raise UserError(
                f"{source}: the latency gate on {figure} needs at least min_latency_steps = "
                f"{tol.min_latency_steps} replay steps ({key}), this run has {got}; {hint}, or drop "
                f"{figure} from [nightly.tolerances] latency"
            )


def _missing_figures(report: dict, tol: Tolerances) -> list[str]:
    metrics, latency = report.get("metrics") or {}, report.get("latency") or {}
    return [f for f in tol.metrics if f not in metrics] + [f for f in tol.latency if f not in latency]


# ---------------------------------------------------------------- one run


def run(cfg: NightlyConfig, now: dt.datetime | None = None, as_of: str | None = None) -> dict:
    """Do one nightly run; returns the summary (regressions empty when all is well).

    `as_of` (window runs): the day to test on, overriding [nightly.window] as_of. Everything the run
    writes under `out` is made in a temporary folder beside it and moved in only when the run
    completes: a run that stops (bad input, too small a window) leaves `out` exactly as it was."""
    # Unusable outputs and an unreadable history stop the run before any work (and before a long
    # training), and the history is never written when it could not be read.
    check_output_file(cfg.history, inputs=_inputs(cfg))
    history = read_history(cfg.history)
    check_output_dir(cfg.out.parent)
    if cfg.out.exists() and not cfg.out.is_dir():
        raise UserError(f"{cfg.out}: output folder path is an existing file")
    if cfg.out.is_dir() and not os.access(cfg.out, os.W_OK | os.X_OK):
        raise UserError(f"{cfg.out}: output folder is not writable")
    if as_of is not None and cfg.window is None:
        raise UserError(f"--as-of needs a [nightly.window] table in {cfg.source}")
    if cfg.metrics_json is None and cfg.train is None and cfg.model.suffix == ".onnx":
        _check_catalog(cfg, cfg.model)
    if cfg.champion is not None and cfg.champion.model.is_file():
        from gru4rec.bundle import load_bundle

        load_bundle(cfg.champion.model)  # a broken champion bundle stops the run before training
    stage = Path(tempfile.mkdtemp(prefix=f".{cfg.out.name}.", suffix=".run", dir=cfg.out.parent))
    try:
        with _engine_session(cfg):
            summary = _run_staged(dataclasses.replace(cfg, out=stage), cfg.out, history, now, as_of)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if cfg.mlflow is not None:  # after the history and report are in place: tracking never loses them
        summary["mlflow_run_ids"], summary["tracking_error"] = _track(
            cfg, summary, Path(summary["current"]["model"])
        )
    return summary


def _say(text: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(text, markup=False, highlight=False)


def _run_staged(cfg: NightlyConfig, out: Path, history: pl.DataFrame, now, as_of) -> dict:
    """The run, writing into `cfg.out` (the stage), which is moved to `out` once all is written."""
    now = now or dt.datetime.now(dt.UTC)
    test, train_events, window = cfg.test, None, None
    if cfg.window is not None:
        test, train_events, window = _cut(cfg, as_of)
    if cfg.metrics_json is None and cfg.tolerances.latency:
        check_latency_steps({"latency": planned_steps(test, cfg.batch_size)}, cfg.tolerances,
                            f"{cfg.source}: scoring {test} at batch_size {cfg.batch_size} (before any training)")  # fmt: skip
    _say(f"nightly: working in {cfg.out}, moved into {out} when the run completes")
    report, model = _measure(cfg, test, train_events)
    champion_report = _score_champion(cfg, test)
    paired = _paired_latency(cfg, test, model, champion_report)
    for attempt in range(cfg.tolerances.latency_confirm + 1):
        row, champion_row, regressions, table = _judge(cfg, history, report, champion_report, model, now,
                                                       test, window, paired)  # fmt: skip
        slow = [e["name"] for e in table if e.get("regressed") and e["name"] in cfg.tolerances.latency
                and "pairs" not in e]  # fmt: skip
        if not slow or cfg.metrics_json is not None or attempt == cfg.tolerances.latency_confirm:
            break
        # A stall of the machine (another job, a page-cache flush) slows one measurement, a slower
        # model slows every one: time again and keep the best, as timeit does, before crying wolf.
        report, champion_report = _time_again(cfg, test, model, report, champion_report, slow, attempt)
    row["latency_attempts"] = attempt + 1
    if attempt:
        write_text_atomic(cfg.out / "metrics.json", json.dumps(report, indent=2, default=str) + "\n")
    final = _final_paths(cfg.out, out)
    for r in (row, champion_row):
        if r is not None:
            r["model"], r["test"] = final(r["model"]), final(r["test"])
    rows = [row] + ([champion_row] if champion_row is not None else [])
    row["status"] = "regression" if regressions else "ok"
    # which figures regressed: the trend plots circle those series only
    row["regressed"] = ",".join(e["name"] for e in table if e.get("regressed"))
    promoted = None
    if cfg.champion is not None and cfg.champion.promote and not regressions:
        from gru4rec.eval.promote import promote_bundle

        promoted = promote_bundle(Path(model), cfg.champion.model)
        promoted["from"] = final(promoted["from"])
        row["status"] = "promoted"
    key = ("as_of", "role") if window is not None else None
    n_comparable = _comparable(history, row).height
    inconclusive = [e["name"] for e in table if e.get("verdict") == "inconclusive"]
    summary = {
        "current": row,
        "champion": champion_row,
        "promoted": promoted,
        "regressions": regressions,
        "latency_inconclusive": inconclusive,
        "table": table,
        "window": window.info() if window is not None else None,
        "n_runs": history.height + len(rows),
        "n_comparable": n_comparable,
        "tolerances": cfg.tolerances.describe(),
        "report": str(out / "report.md"),
        "model_settings": model_settings(model, cfg),
    }
    history = upsert_runs(cfg.history, history, rows, key)
    summary["n_runs"] = history.height
    plots = _trend_plots(_comparable(history, row, same_day=True), cfg)
    from gru4rec.eval.report import nightly_markdown

    write_text_atomic(cfg.out / "report.md", nightly_markdown(summary, plots))
    write_text_atomic(cfg.out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    _move_into(cfg.out, out)
    summary["plots"] = plots
    summary["tracking_error"] = None
    return summary


@contextlib.contextmanager
def _engine_session(cfg: NightlyConfig):
    """On Ray, one runtime (or one connection to the cluster) for every scoring and timing of the run."""
    if cfg.engine.name != "ray" or cfg.metrics_json is not None:
        yield
        return
    from gru4rec.eval.benchmark import score_engine
    from gru4rec.score.ray_engine import import_ray, ray_runtime

    with ray_runtime(import_ray(), score_engine(cfg.engine)):
        yield


def _final_paths(stage: Path, out: Path):
    """Map a path inside the stage to where it will be once moved into `out`."""

    def final(path):
        text = str(path)
        return str(out / Path(text).relative_to(stage)) if text.startswith(str(stage) + os.sep) else text

    return final


def _move_into(stage: Path, out: Path) -> None:
    """Move every file the run wrote into `out`, each replacing its namesake (other files stay)."""
    for path in sorted(p for p in stage.rglob("*") if p.is_file()):
        target = out / path.relative_to(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def _track(cfg: NightlyConfig, summary: dict, model: Path):
    from gru4rec.eval.tracking import TrackedRun, log_runs

    row = summary["current"]
    verdict = "regression" if summary["regressions"] else "promoted" if summary["promoted"] else "pass"
    params = {**summary["model_settings"], "tie_mode": cfg.tie_mode, "cutoffs": list(cfg.cutoffs),
              "batch_size": cfg.batch_size, "test": row.get("test")}  # fmt: skip
    if cfg.train is not None:
        from gru4rec.train.params import resolve

        params.update(resolve(preset=cfg.train.preset, overrides=cfg.train.params).to_dict())
        params.update(seed=cfg.train.seed, device=cfg.train.device)
    window = summary.get("window") or {}
    params.update({k: v for k, v in window.items() if k in ("train_days", "test_days")})
    metrics = _figures(row)
    if summary.get("champion"):
        metrics.update({f"champion_{k}": v for k, v in _figures(summary["champion"]).items()})
    tags = {"gru4rec.kind": "nightly", "gru4rec.verdict": verdict, "gru4rec.role": row.get("role") or "model",
            "gru4rec.test_fingerprint": row.get("test_fingerprint"), "gru4rec.model": str(model),
            "gru4rec.regressions": "; ".join(summary["regressions"])[:5000] or None}  # fmt: skip
    tags.update({f"gru4rec.{k}": v for k, v in window.items() if k.startswith("window") or k == "as_of"})
    artifacts = [cfg.out / "report.md", cfg.out / "summary.json", cfg.out / "metrics.json"]
    artifacts += [cfg.out / p for p in summary["plots"].values()]
    bundle = None
    if model.suffix == ".onnx" and model.is_file():
        from gru4rec.eval.promote import bundle_files

        bundle = bundle_files(model)
    name = f"nightly {window['as_of']}" if window else f"nightly {row['run_id']}"
    run = TrackedRun(name, params, metrics, tags, artifacts, bundle, register=bool(summary["promoted"]))
    return log_runs(cfg.mlflow, [run])


def _figures(row: dict) -> dict[str, float]:
    """A history row's numbers as tracked metrics: every metric at every cut-off, latency, sizes."""
    skip = {"run_id", "time", "status", "role", "model", "test", "test_fingerprint", "tie_mode", "regressed"}
    out = {}
    for k, v in row.items():
        if k in skip or isinstance(v, (bool, str)) or not isinstance(v, (int, float)):
            continue
        out[
            f"latency_{k}"
            if k in LATENCY_FIGURES or k.startswith(("n_steps", "n_full", "events_per", "sessions_per"))
            else k
        ] = v
    return out


def _cut(cfg: NightlyConfig, as_of: str | None):
    """The window's test file (written into `out`), training events and Window."""
    from rich.console import Console

    from gru4rec.eval.window import cut_window
    from gru4rec.io import write_parquet_atomic

    window = cut_window(cfg.window, as_of)
    info = window.info()
    console = Console(stderr=True)
    if window.as_of_reason.startswith("latest"):
        console.print(f"nightly: as_of {window.as_of_reason}", markup=False, highlight=False)
    if window.empty_test_days:
        console.print(f"warning: test day(s) {', '.join(window.empty_test_days)} hold no events in "
                      f"{cfg.window.events} (as_of beyond the log?)", markup=False, highlight=False)  # fmt: skip
    console.print(
        f"nightly: window as of {info['as_of']}: train {info['window_start']} .. {info['window_boundary']} "
        f"({info['n_train_events']:,} events), test to {info['window_end']} ({info['n_window_test_events']:,} "
        f"events; {info['n_test_dropped_unseen']:,} dropped: items unseen in training); {window.n_files} file(s) read",
        markup=False, highlight=False,
    )  # fmt: skip
    test = cfg.out / "window" / "test.parquet"
    write_parquet_atomic(window.test, test)
    write_parquet_atomic(window.train, cfg.out / "window" / "train.parquet")
    return test, window.train, window


def _judge(cfg: NightlyConfig, history: pl.DataFrame, report: dict, champion_report: dict | None,
           model: str, now, test, window, paired: list | None):  # fmt: skip
    """(row, champion row, regressions, comparison table) of one measurement."""
    row = _row(cfg, report, model, now, test, window, role="challenger" if cfg.champion else "")
    # Each window day tests other sessions: earlier days are the trend of the metrics, never their
    # gate. With a champion, latency is judged against it (timed side by side), not against history.
    regressions, table = compare(_comparable(history, row), row, cfg.tolerances, gate_metrics=window is None,
                                 gate_latency=cfg.champion is None)  # fmt: skip
    regressions += unknown_share_check(row, cfg.tolerances, table)
    champion_row = None
    if champion_report is not None:
        champion_row, lost = _versus_champion(cfg, champion_report, now, test, window, row, table, paired)
        regressions += lost
    return row, champion_row, regressions, table


def _time_again(cfg: NightlyConfig, test: Path, model: str, report: dict, champion_report: dict | None,
                slow: list[str], attempt: int) -> tuple[dict, dict | None]:  # fmt: skip
    """Score again (after a pause) and keep each latency figure's best measurement so far."""
    from rich.console import Console

    n = cfg.tolerances.latency_confirm
    Console(stderr=True).print(
        f"nightly: {', '.join(slow)} past the tolerance; timing again to confirm ({attempt + 1}/{n})",
        markup=False, highlight=False,
    )  # fmt: skip
    time.sleep(CONFIRM_PAUSE_S)
    report = best_latency(report, _score(cfg, Path(model), test, engine=cfg.engine))
    return report, champion_report


def best_latency(report: dict, again: dict) -> dict:
    """`report` with each latency figure the lower of its two measurements (metrics are unchanged:
    the same model on the same data scores the same ranks)."""
    latency = dict(report.get("latency") or {})
    for key in LATENCY_FIGURES:
        a, b = latency.get(key), (again.get("latency") or {}).get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not math.isnan(b):
            latency[key] = b if math.isnan(a) else min(a, b)
    return {**report, "latency": latency}


def _score_champion(cfg: NightlyConfig, test: Path | None) -> dict | None:
    """The champion's metrics JSON on the same test sessions (None: no champion, or none installed yet)."""
    if cfg.champion is None or not cfg.champion.model.is_file():
        return None  # no champion yet: a passing challenger is installed as the first one
    from rich.console import Console

    champ = cfg.champion.model
    Console(stderr=True).print(
        f"nightly: scoring the champion {champ} on {test}", markup=False, highlight=False
    )
    return _score(cfg, champ, test, engine=cfg.engine)


def _score(cfg: NightlyConfig, model: Path, test: Path, engine=None) -> dict:
    """The score stage's metrics-JSON dict of `model` on `test` with the configured cut-offs and batch."""
    from gru4rec.eval.benchmark import score_onnx

    report, _ = score_onnx(model, test, cfg.cutoffs, cfg.tie_mode, cfg.batch_size, engine=engine)
    report["model"] = str(model)
    return report


def _versus_champion(cfg: NightlyConfig, report: dict, now, test: Path, window, row: dict, table: list[dict],
                     paired: list | None):  # fmt: skip
    """The champion's row from its `report` on the same sessions; (its row, reasons the challenger lost).
    Metrics: the challenger's against the champion's. Latency: the interleaved verdicts (`paired`)."""
    champ = cfg.champion.model
    champion_row = _row(cfg, report, str(champ), now, test, window, role="champion")
    champion_row["status"] = "champion"
    tol = cfg.tolerances
    verdicts = {v.figure: v for v in paired or []}
    lost = []
    for entry in table:
        figure = entry["name"]
        if figure in verdicts:
            v = verdicts[figure]
            entry.update(champion=v.champion, challenger_paired=v.challenger, champion_change=_change(v.challenger, v.champion),
                         verdict=v.verdict, spread=v.spread, allowed=v.allowed, slower_pairs=v.slower_pairs,
                         pairs=v.pairs)  # fmt: skip
            if v.verdict == "regression":
                entry["regressed"] = True
                lost.append(v.message(champ))
            continue
        if figure not in tol.metrics:
            continue
        ref, cur = champion_row[figure], row[figure]
        entry.update(champion=ref, champion_change=_change(cur, ref))
        if math.isnan(cur) or ref - cur > tol.allowed(figure, ref):
            entry["regressed"] = entry["champion_regressed"] = True
            lost.append(f"challenger {figure} {cur:.4f} is worse than the champion's {ref:.4f} "
                        f"(allowed {tol.allowed(figure, ref):.4f}); the champion {champ} stays")  # fmt: skip
    return champion_row, lost


def _paired_latency(cfg: NightlyConfig, test: Path, model: str, champion_report: dict | None) -> list | None:
    """Champion and challenger timed side by side (eval.latency_gate); a Verdict per latency figure."""
    tol = cfg.tolerances
    if champion_report is None or not tol.latency or not str(model).endswith(".onnx"):
        return None
    from rich.console import Console

    from gru4rec.eval.benchmark import score_engine
    from gru4rec.eval.latency_gate import paired_verdict, time_models

    Console(stderr=True).print(
        f"nightly: timing champion and challenger in {tol.latency_pairs} interleaved pairs",
        markup=False, highlight=False,
    )  # fmt: skip
    champ, chall = time_models([cfg.champion.model, Path(model)], test, cfg.batch_size, tol.latency_pairs,
                               tol.latency_sample_events, score_engine(cfg.engine))  # fmt: skip
    check_latency_steps({"latency": champ[0]}, tol, f"{cfg.source}: the latency sample of {test}")
    return [paired_verdict(f, [r[f] for r in champ], [r[f] for r in chall], tol) for f in tol.latency]


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


def _measure(cfg: NightlyConfig, test: Path | None, train_events: pl.DataFrame | None) -> tuple[dict, str]:
    """(the score stage's metrics-JSON dict, model path): from a given JSON or by scoring now."""
    from rich.console import Console

    console = Console(stderr=True)
    if cfg.metrics_json is not None:
        return _read_metrics_json(cfg.metrics_json), str(cfg.model or cfg.metrics_json)
    from gru4rec.eval.benchmark import export_onnx, train_gru4rec

    model = cfg.model
    if cfg.train is not None:
        from gru4rec.data import read_events

        t = cfg.train
        source = t.train if t.train is not None else "the window's training days"
        console.print(f"nightly: training on {source} (preset {t.preset})", markup=False, highlight=False)
        events = train_events if train_events is not None else read_events(t.train)
        model = train_gru4rec(events, t.preset, t.params, cfg.out / "model.pt", t.device, t.seed)
    if model is not None and model.suffix == ".pt":
        console.print(f"nightly: exporting {model}", markup=False, highlight=False)
        model = export_onnx(model, cfg.out / "model.onnx", top_k=cfg.train.top_k if cfg.train else 20)
        _check_catalog(cfg, model)
    console.print(f"nightly: scoring {test} with {model}", markup=False, highlight=False)
    report = _score(cfg, model, test, engine=cfg.engine)
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


def _row(cfg: NightlyConfig, report: dict, model: str, now: dt.datetime, test: Path | None = None,
         window=None, role: str = "") -> dict:  # fmt: skip
    test = test if test is not None else cfg.test
    row: dict[str, Any] = {
        "run_id": now.strftime("%Y%m%dT%H%M%SZ"),
        "time": now.isoformat(timespec="seconds"),
        "status": "",
        "role": role,
        "model": model,
        "test": str(test) if test else "",
        "test_fingerprint": str(report.get("test_fingerprint") or ""),
        "model_export_id": str(report.get("model_export_id") or ""),
        "tie_mode": str(report.get("tie_mode", cfg.tie_mode)),
    }
    for key, value in report["metrics"].items():
        if key != "n" and isinstance(value, (int, float)):
            row[key] = float(value)
    row["n_predictions"] = int(report["metrics"].get("n", 0))
    n_events = report.get("n_events")
    if isinstance(n_events, int) and n_events > 0:
        row["n_test_events"] = n_events
        row["n_unknown_dropped"] = int(report.get("n_unknown_dropped") or 0)
        row[UNKNOWN_SHARE] = row["n_unknown_dropped"] / n_events
    for key, value in (report.get("latency") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[key] = float(value)
    missing = _missing_figures(report, cfg.tolerances)
    if missing:
        raise UserError(
            f"the scorer's report has no {', '.join(missing)}: fix [nightly.tolerances] or the cut-offs"
        )
    check_latency_steps(report, cfg.tolerances, f"{cfg.source}: scoring {test}")
    if window is not None:
        row.update(window.info())
    return row


def unknown_share_check(row: dict, tol: Tolerances, table: list[dict]) -> list[str]:
    """A model scored on data it does not know gives zeros with exit 0 otherwise: fail it, with the reason."""
    share = row.get(UNKNOWN_SHARE)
    if share is None:
        return []
    entry = {"name": UNKNOWN_SHARE, "current": share, "reference": tol.max_unknown_share,
             "reference_kind": "max_unknown_share"}  # fmt: skip
    table.append(entry)
    if share <= tol.max_unknown_share:
        return []
    entry["regressed"] = True
    return [
        f"{UNKNOWN_SHARE} is {share:.1%} (max_unknown_share {tol.max_unknown_share:.1%}): "
        f"{row.get('n_unknown_dropped', 0):,} of {row.get('n_test_events', 0):,} test events are of items the "
        "model does not know; is this the model trained for this data?"
    ]


def model_settings(model: str, cfg: NightlyConfig) -> dict[str, Any]:
    """The settings the report lists for the scored model: preset and key training parameters."""
    from gru4rec.eval.report import KEY_PARAMS

    settings: dict[str, Any] = {}
    params: dict[str, Any] = {}
    if cfg.train is not None:
        from gru4rec.train.params import resolve

        settings["preset"] = cfg.train.preset or "(defaults)"
        params = resolve(preset=cfg.train.preset, overrides=cfg.train.params).to_dict()
    elif model.endswith(".onnx") and Path(model).is_file():
        from gru4rec.bundle import read_metadata

        meta = read_metadata(model)
        params = meta.get("hyperparameters") or {}
        settings.update(export_id=meta.get("export_id"), n_items=meta.get("n_items"), top_k=meta.get("top_k"))
    settings.update({k: params[k] for k in KEY_PARAMS if k in params})
    return settings


def _comparable(history: pl.DataFrame, row: dict, same_day: bool = False) -> pl.DataFrame:
    """Earlier runs this run is compared with: the same test data (by content), tie mode and role.

    Window runs: each day's test data differs, so the history is their trend (in date order), not
    their gate (the champion on the same sessions is); a re-run of a day replaces that day's row and
    is never compared with it (`same_day` keeps it, for the plots after the history is written)."""
    h = history
    keys = ("tie_mode", "test_fingerprint") if "as_of" not in row else ("tie_mode",)
    for key in keys:
        if key in h.columns:
            h = h.filter(pl.col(key).fill_null("") == row[key])
        elif h.height:
            h = h.clear()
    role = pl.col("role").fill_null("") if "role" in h.columns else pl.lit("")
    h = h.filter(role == row.get("role", ""))
    if "as_of" in row:
        h = h.filter(pl.col("as_of").is_not_null()) if "as_of" in h.columns else h.clear()
        if not same_day and h.height:
            h = h.filter(pl.col("as_of") < row["as_of"])
        for key in ("train_days", "test_days"):  # the same window shape only
            h = h.filter(pl.col(key) == row[key]) if key in h.columns else h.clear()
    return h


def compare(history: pl.DataFrame, row: dict, tol: Tolerances, gate_metrics: bool = True,
            gate_latency: bool = True) -> tuple[list[str], list[dict]]:  # fmt: skip
    """Regression messages and the comparison table of `row` against earlier runs (see the module
    doc). A figure that is not gated (`gate_metrics`, `gate_latency` false) is shown as the trend."""
    from gru4rec.eval.latency_gate import spread_across_runs

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
        table.append(entry)
        if not (gate_latency if lower_better else gate_metrics):
            entry["verdict"] = "trend"
            continue
        if lower_better and past:
            recent = history.tail(tol.latency_window)
            spread = spread_across_runs(recent, figure, row.get("model_export_id", ""), cur)
            entry["spread"] = spread
            if spread is None or spread > tol.allowed(figure, entry["reference"]):
                entry["verdict"] = "inconclusive"
                continue
        for which, ref in tol.checked(figure, past):
            worse = (cur - ref) if lower_better else (ref - cur)
            if math.isnan(cur) or worse > tol.allowed(figure, ref):
                entry["regressed"] = True
                unit = " ms" if lower_better else ""
                verb = "rose" if lower_better else "dropped"
                regressions.append(
                    f"{figure} {verb} to {cur:.4f}{unit} from {ref:.4f}{unit} ({which}; "
                    f"{(cur - ref) / ref * 100 if ref else float('nan'):+.1f}%, allowed "
                    f"{tol.allowed(figure, ref):.4f}{unit})"
                )
        entry.setdefault("verdict", "regression" if entry.get("regressed") else "ok")
    return regressions, table


def _change(cur: float, ref: float) -> float | None:
    return 100.0 * (cur - ref) / ref if ref else None


def regression_flags(history: pl.DataFrame, figures: list[str]) -> dict[str, list[bool]]:
    """Per figure, the runs where that figure regressed (the trend plots circle those points only).
    A run recorded before per-figure flags counts as regressed in every figure when it regressed."""
    regressed = history["regressed"].to_list() if "regressed" in history.columns else [None] * history.height
    status = history["status"].to_list()
    return {
        f: [f in r.split(",") if r is not None else s == "regression" for r, s in zip(regressed, status)]
        for f in figures
    }


def _trend_plots(history: pl.DataFrame, cfg: NightlyConfig) -> dict[str, str]:
    from gru4rec.eval import plots

    runs = history["run_id"].to_list()
    out: dict[str, str] = {}
    groups = (("metrics", cfg.tolerances.metrics, "metric value", "Accuracy over nightly runs"),
              ("latency", cfg.tolerances.latency, "milliseconds", "Scorer latency over nightly runs"))  # fmt: skip
    for key, figures, ylabel, title in groups:
        series = {f: history[f].cast(pl.Float64).to_list() for f in figures if f in history.columns}
        if series:
            name = f"trend_{key}.png"
            plots.trends(cfg.out / name, f"{title} ({cfg.tie_mode} ties)" if key == "metrics" else title,
                         runs, series, ylabel, regression_flags(history, list(series)))  # fmt: skip
            out[title] = name
    return out
