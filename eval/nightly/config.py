"""The nightly's config: its schema, defaults and every check made before a run starts.

Every key is checked when the config is loaded (types, ranges, unknown keys, input files, metric
names, training preset and params); eval/configs/nightly.example.toml documents them.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import polars as pl

from gru4rec.data import ITEM, SESSION, TIME, TIME_UNITS
from gru4rec.errors import UserError
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
from gru4rec.eval.window import WindowSpec
from gru4rec.io import read_toml
from gru4rec.metrics import DEFAULT_CUTOFFS, TIE_MODES

EXAMPLE_CONFIG = "eval/configs/nightly.example.toml"
LATENCY_FIGURES = ("ms_per_1k_events", "full_step_ms_p50", "full_step_ms_p95", "step_ms_p50", "step_ms_p95",
                   "step_ms_p99")  # fmt: skip
# The replay steps a latency figure is computed from (the minimum-steps rule counts them).
STEP_COUNT = {"full_step_ms_p50": "n_full_steps", "full_step_ms_p95": "n_full_steps"}
METRIC_NAME = re.compile(r"(recall|mrr|ndcg)@([1-9][0-9]*)")
UNKNOWN_SHARE = "unknown_share"


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
            "challenger is slower by more than that in three quarters of the pairs and its median slower by "
            "more than both that and the spread of the repeats; against earlier runs, "
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
    raw = read_toml(path, "config file")
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
    report = read_metrics_json(cfg.metrics_json)
    scored = report.get("tie_mode")
    if scored is not None and scored != cfg.tie_mode:
        default = "" if top.has("tie_mode") else " (the default)"
        raise top.error(
            f"tie_mode is {cfg.tie_mode!r}{default} but {cfg.metrics_json} was scored in tie mode {scored!r}; "
            f'set tie_mode = "{scored}" or score again with --tie-mode {cfg.tie_mode}'
        )
    missing = missing_figures(report, cfg.tolerances)
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


def missing_figures(report: dict, tol: Tolerances) -> list[str]:
    metrics, latency = report.get("metrics") or {}, report.get("latency") or {}
    return [f for f in tol.metrics if f not in metrics] + [f for f in tol.latency if f not in latency]


# ---------------------------------------------------------------- one run


def read_metrics_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: metrics JSON not found")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict):
        raise UserError(f"{path}: not a metrics JSON of `gru4rec-cli score` (no 'metrics' object)")
    return report
