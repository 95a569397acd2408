"""Score a sessions file with an exported model: metrics, optional recommendations, latency.

    from gru4rec.score.scorer import score
    report = score("m.onnx", "test.parquet", out="recs.parquet", metrics="metrics.json")

`score` loads the bundle and an ONNX Runtime backend; `score_source` is the loop itself and takes
any step backend (the PyTorch one in tests and benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
) -> dict:
    """Score `sessions` with the exported `model` (m.onnx); returns the metrics-JSON dict.

    Pass a `recorder` to keep the raw per-step times (the JSON only holds percentiles); `train`
    (the training events) gives popularity@k when `config.beyond_accuracy` is on."""
    from gru4rec.bundle import load_bundle
    from gru4rec.score.ort_backend import OrtBackend

    cfg = config or ScoreConfig()
    check_outputs(model, sessions, out, metrics, cfg)
    rec = recorder if recorder is not None else LatencyRecorder()
    with rec.phase("load"):
        bundle = load_bundle(model)
        cfg.check(bundle.n_items, bundle.top_k)
        source = SessionSource(sessions, cfg.keys, cfg.chunk_events)
        if train is not None:
            if not cfg.beyond_accuracy:
                raise UserError("--train gives popularity@k for --beyond-accuracy; add --beyond-accuracy")
            cfg.popularity = item_popularity(bundle.items, train, cfg.keys)
        backend = OrtBackend.from_bundle(
            bundle, provider, tf32, with_topk=out is not None or cfg.beyond_accuracy
        )
    report = score_source(backend, bundle.items, source, cfg, out=out, recorder=rec, progress=progress)
    report["model"] = str(model)
    # What the figures belong to: `eval nightly` refuses a metrics JSON of other data or another model.
    report["model_export_id"] = bundle.meta["export_id"]
    report["latency"]["tf32"] = backend.tf32
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
    rec.add_steps(res.step_seconds, plan.width)
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


def score_source(
    backend: StepBackend,
    items: ItemMap,
    source: SessionSource,
    cfg: ScoreConfig,
    out: str | Path | None = None,
    recorder: LatencyRecorder | None = None,
    progress: bool = False,
) -> dict:
    """Replay every chunk of `source` through `backend`; metrics + latency dict (JSON schema)."""
    cfg.check(backend.n_items, backend.top_k)
    if len(items) != backend.n_items:
        raise UserError(f"item map has {len(items)} items but the model scores {backend.n_items}")
    rec = recorder or LatencyRecorder()
    beyond = None
    if cfg.beyond_accuracy:
        ks = tuple(k for k in cfg.cutoffs if k <= backend.top_k)
        if not ks:
            raise UserError(f"--beyond-accuracy needs a cut-off up to the model's top-k {backend.top_k}")
        beyond = BeyondAccuracy(backend.n_items, ks, cfg.popularity)
    digest = EventsDigest()
    bar = _Progress(progress, source.stats.n_events - source.stats.n_sessions)
    with bar, open_recs(out, recs_schema(source.session_dtype, items.dtype)) as writer:
        totals = replay_source(backend, items, source, cfg, writer, rec, bar.advance, beyond, digest)
        check_scored(totals, source.path)
    batch = replay_batch(cfg, source)
    latency = rec.report(
        totals.acc.n,
        totals.n_scored_sessions,
        provider=backend.name,
        batch_size=batch,
        device=backend.device,
        mode=cfg.latency_mode,
    )
    report = build_report(totals, cfg, latency)
    if beyond is not None:
        report["metrics"] |= beyond.result()
    report["test_fingerprint"] = digest.hexdigest()
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


class _Progress:
    """A rich progress bar over scored events (total is an upper bound: unknown items shrink it)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self._pending, self._bar = enabled, total, 0, None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
            )
            self._bar.start()
            self._task = self._bar.add_task("score", total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._pending += n
            if self._pending >= 4096:  # rich redraws at its own rate; batch the bookkeeping
                self._bar.advance(self._task, self._pending)
                self._pending = 0

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
