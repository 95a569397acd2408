"""Score a sessions file with an exported model: metrics, optional recommendations, latency.

    from gru4rec.score.scorer import score
    report = score("m.onnx", "test.parquet", out="recs.parquet", metrics="metrics.json")

`score` is the one orchestration of every scoring run (CLI, benchmark, nightly, tuning): it checks
the inputs, hands the replay to an engine (`LocalEngine` here, `score.ray_engine.RayEngine` for
Ray shards) and assembles the one report from what the engine returns. `run_source` is the local
replay itself and takes any step backend (`score_source` gives its report: tests, benchmarks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from gru4rec import allocator
from gru4rec.bundle import companion_paths
from gru4rec.data import Keys
from gru4rec.errors import UserError
from gru4rec.items import ItemMap
from gru4rec.metrics import (
    DEFAULT_CUTOFFS,
    TIE_MODES,
    BeyondAccuracy,
    RankAccumulator,
    normalised_popularity,
    ranks_from_counts,
)
from gru4rec.provenance import EventsDigest
from gru4rec.score.latency import LatencyRecorder
from gru4rec.score.outputs import open_recs, recs_frame, recs_schema, write_metrics_json
from gru4rec.score.progress import ScoreProgress
from gru4rec.score.replay import StepBackend, plan_chunk, replay
from gru4rec.score.source import DEFAULT_CHUNK_EVENTS, SessionSource

LATENCY_MODES = ("batch", "online")
DEFAULT_K = 20


@dataclass
class ScoreConfig:
    k: int | None = None  # recommendations per event in the recs file; None: 20, or the model's top-k if less
    cutoffs: tuple[int, ...] = DEFAULT_CUTOFFS
    tie_mode: str = "standard"
    batch_size: int = 1024
    latency_mode: str = "batch"  # online: one session at a time, batch 1
    keys: Keys = field(default_factory=Keys)
    chunk_events: int = DEFAULT_CHUNK_EVENTS
    # coverage@k (and popularity@k with `popularity`) from the top-k lists, for cut-offs <= top-k
    beyond_accuracy: bool = False
    popularity: np.ndarray | None = None  # normalised training popularity per item index
    memory_budget: int | None = None  # bytes for a step's working set; None: a share of free memory
    tile_items: int = 0  # items per tile of the score matrix; 0: from the memory budget

    def check(self, n_items: int, top_k: int) -> None:
        if self.tie_mode not in TIE_MODES:
            raise UserError(f"--tie-mode must be one of {', '.join(TIE_MODES)}, got {self.tie_mode!r}")
        if self.latency_mode not in LATENCY_MODES:
            raise UserError(
                f"--latency-mode must be one of {', '.join(LATENCY_MODES)}, got {self.latency_mode!r}"
            )
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.k is None:
            self.k = min(DEFAULT_K, top_k)
        if not 1 <= self.k <= min(top_k, n_items):
            limit = "the model's top-k" if top_k <= n_items else "the catalog"
            raise UserError(
                f"--k {self.k} is out of range: it must be between 1 and {min(top_k, n_items)} ({limit}; "
                f"the model was exported with top-k {top_k} over {n_items} items)"
            )
        if not self.cutoffs:
            raise UserError("--cutoffs is empty")
        bad = [c for c in self.cutoffs if not 1 <= c <= n_items]
        if bad:
            raise UserError(
                f"--cutoffs {bad} out of range: each must be between 1 and {n_items} (the catalog)"
            )


@dataclass
class ScoreJob:
    """What an engine is asked to do: replay `sessions` through the loaded `bundle`."""

    model: Path
    bundle: Any  # gru4rec.bundle.Bundle
    sessions: str | Path
    out: Path | None
    cfg: ScoreConfig
    provider: str = "auto"
    tf32: bool = False
    progress: bool = False
    recorder: LatencyRecorder = field(default_factory=LatencyRecorder)
    memory: Any = None  # score.tiled.MemoryPlan: the batch and tiles the budget gave


@dataclass
class EngineResult:
    """What an engine returns; the core turns it into the one report (no engine writes its own)."""

    totals: ReplayTotals
    recorder: LatencyRecorder  # every step where it ran, with its width; phases in worker-seconds
    test_fingerprint: str  # the sessions' content digest, as `sessions_fingerprint` computes it
    provider: str  # e.g. ort-cpu
    device: str
    batch_size: int  # the replay's batch (at most the sessions to score)
    tf32: bool  # TF32 in effect (not merely asked for)
    engine: dict  # name, workers, shards, runtime, ...: where and how it ran
    beyond: dict | None = None  # coverage@k / popularity@k


class LocalEngine:
    """Chunks of the sessions file replayed in this process (ONNX Runtime, CPU or CUDA EP)."""

    name = "local"

    def check_outputs(
        self, model, sessions, out, metrics, cfg: ScoreConfig, provider: str = "auto"
    ) -> Path | None:
        check_outputs(model, sessions, out, metrics, cfg)
        return Path(out) if out is not None else None

    def run(self, job: ScoreJob) -> EngineResult:
        from gru4rec.score.tiled import make_backend

        cfg, rec = job.cfg, job.recorder
        with rec.phase("load"):
            source = SessionSource(job.sessions, cfg.keys, cfg.chunk_events)
            with_topk = job.out is not None or cfg.beyond_accuracy
            backend = make_backend(job.bundle, cfg.tile_items, job.provider, job.tf32, with_topk)
        return run_source(backend, job.bundle.items, source, cfg, job.out, rec, job.progress)

    def providers(self, provider: str) -> tuple[str, str]:
        """(the kind the memory plan is made for, the provider the job carries): here both are where
        this process scores, resolved once (one notice when 'auto' falls back to the CPU)."""
        from gru4rec.score.ort_backend import resolve_provider

        kind = resolve_provider(provider)
        return kind, kind


def score(
    model: str | Path,
    sessions: str | Path,
    out: str | Path | None = None,
    metrics: str | Path | None = None,
    config: ScoreConfig | None = None,
    provider: str = "auto",
    tf32: bool = False,
    progress: bool = False,
    recorder: LatencyRecorder | None = None,
    train: str | Path | None = None,
    engine=None,
) -> dict:
    """Score `sessions` with the exported `model` (m.onnx) on `engine` (default: LocalEngine; a
    `score.ray_engine.RayEngine` for Ray); returns the metrics-JSON dict, written to `metrics`.

    The one orchestration of every scoring run: inputs checked before any work, the engine replays,
    the report (metrics, counts, latency, provenance) is assembled here for every engine alike.
    Pass a `recorder` to keep the raw per-step times (the JSON only holds percentiles); `train`
    (the training events) gives popularity@k when `config.beyond_accuracy` is on."""
    from gru4rec.bundle import load_bundle
    from gru4rec.score.tiled import plan_for

    cfg = config or ScoreConfig()
    engine = engine if engine is not None else LocalEngine()
    if engine.name != "local" and (cfg.beyond_accuracy or train is not None):
        raise UserError(f"--beyond-accuracy and --train: only with --engine local, not {engine.name}")
    out = engine.check_outputs(model, sessions, out, metrics, cfg, provider)
    rec = recorder if recorder is not None else LatencyRecorder()
    t0 = time.perf_counter()
    with rec.phase("load"):
        bundle = load_bundle(model)
        cfg.check(bundle.n_items, bundle.top_k)
        if train is not None:
            if not cfg.beyond_accuracy:
                raise UserError("--train gives popularity@k for --beyond-accuracy; add --beyond-accuracy")
            cfg.popularity = item_popularity(bundle.items, train, cfg.keys)
        kind, provider = engine.providers(provider)
        memory = plan_for(cfg, bundle, kind)
        # the run's own copy: every engine and worker builds its backend from these two
        run_cfg = replace(cfg, tile_items=memory.tile, batch_size=memory.batch or cfg.batch_size)
    job = ScoreJob(Path(model), bundle, sessions, out, run_cfg, provider, tf32, progress, rec, memory)
    result = engine.run(job)  # each engine refuses "nothing to score" before committing its outputs
    report = assemble_report(result, run_cfg, wall_s=time.perf_counter() - t0)
    report["model"] = str(model)
    # What the figures belong to: `eval nightly` refuses a metrics JSON of other data or another model.
    report["model_export_id"] = bundle.meta["export_id"]
    report["memory"] = memory.report()
    if metrics is not None:
        write_metrics_json(metrics, report)
    return report


def check_outputs(model, sessions, out, metrics, cfg: ScoreConfig) -> None:
    """Refuse unusable output paths before the (possibly long) scoring run, not after it."""
    from gru4rec.io import check_output_file

    if out is None and cfg.k is not None:
        raise UserError("--k sets the recommendations per event written to --out; add --out")
    if out is not None and Path(out).suffix.lower() not in (".parquet", ".pq"):
        raise UserError(f"--out {out}: recommendations are written as Parquet; name a .parquet file")
    if out is not None and metrics is not None and Path(out).resolve() == Path(metrics).resolve():
        raise UserError("--out and --metrics name the same file")
    model_files = (model, *companion_paths(model))
    for path in (out, metrics):
        if path is not None:
            check_output_file(path, inputs=(sessions, *model_files))


@dataclass
class ReplayTotals:
    """What replaying some sessions adds up to: the rank accumulator and the event/session counts.

    Counts and sums only, so the totals of disjoint parts (the shards of a distributed run) merge
    into exactly what one process computes over the whole."""

    acc: RankAccumulator
    n_events: int = 0
    n_sessions: int = 0
    n_scored_sessions: int = 0
    n_unknown_dropped: int = 0

    COUNTS = ("n_events", "n_sessions", "n_scored_sessions", "n_unknown_dropped")

    def merge(self, other: ReplayTotals) -> ReplayTotals:
        self.acc.merge(other.acc)
        for name in self.COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def state(self) -> dict:
        return {"acc": self.acc.state(), **{name: getattr(self, name) for name in self.COUNTS}}

    @classmethod
    def from_state(cls, state: dict) -> ReplayTotals:
        return cls(RankAccumulator.from_state(state["acc"]), **{n: int(state[n]) for n in cls.COUNTS})


def replay_source(
    backend: StepBackend,
    items: ItemMap,
    source: SessionSource,
    cfg: ScoreConfig,
    writer=None,
    recorder: LatencyRecorder | None = None,
    on_step=None,
    beyond: BeyondAccuracy | None = None,
    digest: EventsDigest | None = None,
) -> ReplayTotals:
    """Replay every chunk of `source` through `backend`; recommendations go to `writer` (a RecsWriter)
    when given, top-k lists to `beyond`, events to `digest`. A source where no session has 2 known
    events gives empty totals, not an error."""
    items.check_kind(source.item_kind, source.path)
    rec = recorder if recorder is not None else LatencyRecorder()
    totals = ReplayTotals(RankAccumulator(tuple(cfg.cutoffs)), source.stats.n_events, source.stats.n_sessions)
    if source.stats.n_multi_sessions == 0:
        return totals
    batch = replay_batch(cfg, source)
    backend.start(batch)
    for chunk in _timed_chunks(source, rec):
        if digest is not None:
            digest.update(chunk)
        _replay_chunk(chunk, backend, items, cfg, batch, totals, writer, rec, on_step, beyond)
        # Drop this chunk (and give its pages back) before the next is read: two chunks alive at
        # once would double the peak.
        del chunk
        allocator.release()
    return totals


def _timed_chunks(source: SessionSource, rec: LatencyRecorder):
    """The source's chunks, reading counted as loading."""
    chunks = source.chunks()
    while True:
        with rec.phase("load"):
            chunk = next(chunks, None)
        if chunk is None:
            return
        yield chunk
        del chunk


def _replay_chunk(chunk, backend, items: ItemMap, cfg: ScoreConfig, batch: int, totals: ReplayTotals,
                  writer, rec: LatencyRecorder, on_step, beyond) -> None:  # fmt: skip
    """Replay one chunk into `totals`; everything built for it is freed on return."""
    with rec.phase("load"):  # item mapping and planning count as loading
        events, dropped = items.translate(chunk)
        totals.n_unknown_dropped += dropped
        plan = plan_chunk(events, batch)
        del events
    if plan is None:
        return
    with rec.phase("replay"):
        res = replay(backend, plan, fetch_topk=writer is not None or beyond is not None, on_step=on_step)
    rec.add_steps(res.step_seconds, plan.width, batch)
    ranks = ranks_from_counts(res.n_greater, res.n_equal, cfg.tie_mode)
    totals.acc.add(ranks)
    if beyond is not None:
        beyond.add(res.topk_idx)
    totals.n_scored_sessions += int(plan.schedule.reset.sum())
    if writer is not None:
        with rec.phase("write"):
            writer.write(recs_frame(res, items, ranks, cfg.k))


def replay_batch(cfg: ScoreConfig, source) -> int:
    """Slots of the replay: 1 online, else the batch size, never more than the sessions to score."""
    return 1 if cfg.latency_mode == "online" else min(cfg.batch_size, source.stats.n_multi_sessions)


def check_scored(totals: ReplayTotals, what) -> None:
    if totals.acc.n == 0:
        raise UserError(
            f"{what}: nothing to score: after dropping {totals.n_unknown_dropped} event(s) of items unknown "
            "to the model, no session has 2 or more events"
        )


def build_report(totals: ReplayTotals, cfg: ScoreConfig, latency: dict) -> dict:
    """The metrics-JSON dict (without `model`) of replay totals and a latency dict."""
    acc = totals.acc
    return {
        "metrics": acc.result(),
        "tie_mode": cfg.tie_mode,
        "cutoffs": list(acc.cutoffs),
        "n_events": totals.n_events,
        "n_sessions": totals.n_sessions,
        "n_scored_sessions": totals.n_scored_sessions,
        # sessions left with fewer than 2 events (from the start, or once unknown items are dropped)
        "n_skipped_sessions": totals.n_sessions - totals.n_scored_sessions,
        "n_predictions": acc.n,
        "n_unknown_dropped": totals.n_unknown_dropped,
        "latency": latency,
    }


def run_source(
    backend: StepBackend,
    items: ItemMap,
    source: SessionSource,
    cfg: ScoreConfig,
    out: str | Path | None = None,
    recorder: LatencyRecorder | None = None,
    progress: bool = False,
) -> EngineResult:
    """Replay every chunk of `source` through `backend` in this process: the local engine's work."""
    cfg.check(backend.n_items, backend.top_k)
    if len(items) != backend.n_items:
        raise UserError(f"item map has {len(items)} items but the model scores {backend.n_items}")
    rec = recorder if recorder is not None else LatencyRecorder()
    beyond = None
    if cfg.beyond_accuracy:
        ks = tuple(k for k in cfg.cutoffs if k <= backend.top_k)
        if not ks:
            raise UserError(f"--beyond-accuracy needs a cut-off up to the model's top-k {backend.top_k}")
        beyond = BeyondAccuracy(backend.n_items, ks, cfg.popularity)
    digest = EventsDigest()
    bar = ScoreProgress(progress, source.stats.n_events - source.stats.n_sessions)
    with bar, open_recs(out, recs_schema(source.session_dtype, items.dtype)) as writer:
        totals = replay_source(backend, items, source, cfg, writer, rec, bar.advance, beyond, digest)
        check_scored(totals, source.path)  # before the recs file is committed
    return EngineResult(
        totals,
        rec,
        digest.hexdigest(),
        provider=backend.name,
        device=backend.device,
        batch_size=replay_batch(cfg, source),
        tf32=bool(getattr(backend, "tf32", False)),
        engine={"name": "local", "workers": 1, "shards": 1, "runtime": "this process"},
        beyond=beyond.result() if beyond is not None else None,
    )


def score_source(
    backend: StepBackend, items: ItemMap, source: SessionSource, cfg: ScoreConfig, **options
) -> dict:
    """The metrics-JSON dict (without `model`) of any step backend over `source` (tests, benchmarks);
    `options` are run_source's (out, recorder, progress)."""
    t0 = time.perf_counter()
    result = run_source(backend, items, source, cfg, **options)
    return assemble_report(result, cfg, wall_s=time.perf_counter() - t0)


def assemble_report(result: EngineResult, cfg: ScoreConfig, wall_s: float) -> dict:
    """The one report schema of every engine: metrics, counts, latency, provenance."""
    totals, n = result.totals, result.totals.acc.n
    latency = result.recorder.report(
        n,
        totals.n_scored_sessions,
        provider=result.provider,
        batch_size=result.batch_size,
        device=result.device,
        mode=cfg.latency_mode,
    )
    # Step figures and events_per_s are per replay step where it ran (replay_s sums the workers'
    # replay time); the job's own throughput, start to finish, is wall_events_per_s.
    latency.update(tf32=result.tf32, workers=result.engine["workers"], wall_s=wall_s,
                   wall_events_per_s=n / wall_s if wall_s > 0 else float("nan"))  # fmt: skip
    report = build_report(totals, cfg, latency)
    if result.beyond is not None:
        report["metrics"] |= result.beyond
    report["test_fingerprint"] = result.test_fingerprint
    report["engine"] = result.engine
    return report


def item_popularity(items: ItemMap, train: str | Path, keys: Keys = Keys()) -> np.ndarray:
    """Normalised training popularity (count / largest count) per item index of the model; items
    absent from `train` count 0."""

    from gru4rec.data import ITEM, read_events

    counts = read_events(train, keys).group_by(ITEM).len()
    frame = items.frame().join(counts, on=ITEM, how="left").sort("item_idx")
    return normalised_popularity(frame["len"].fill_null(0).to_numpy())


def sessions_fingerprint(path: str | Path, keys: Keys = Keys()) -> str:
    """The `test_fingerprint` that `score` records for this sessions file (read the way it reads it)."""
    digest = EventsDigest()
    for chunk in SessionSource(path, keys).chunks():
        digest.update(chunk)
    return digest.hexdigest()
