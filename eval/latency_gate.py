"""The nightly's latency verdicts: like with like, and never a regression out of noise.

Champion vs challenger (`paired_verdict`): both models are timed in one process (the scorer's own
process, or one Ray worker when the nightly scores on Ray), after the same warm-up, on the same
sessions at the same batch, in interleaved pairs: A B, B A, A B, ... (the order alternates so that a
machine that slowly speeds up or slows down favours neither). Each measurement is one replay of the
sample, and gives every latency figure as `score` defines it (LatencyRecorder).

The rule, per gated figure (lower is better), with `allowed` the tolerance over the champion's
median (`Tolerances.allowed`):
  - spread: how far repeats of the same model differ. Each model's range over its repeats, its
    slowest repeat left out (a stall slows one measurement), relative to its own median; the larger
    of the two, in the champion's milliseconds. When the spread exceeds `allowed`, the measurement
    cannot resolve the tolerance: the verdict is "inconclusive" (reported, not a failure);
  - otherwise "regression" when the challenger is slower by more than `allowed` in at least three
    quarters of the pairs (a clear majority), else "ok".

Across runs (`spread_across_runs`): a figure can only be gated against earlier runs when the spread
between runs of one same model is known and within the tolerance: runs of one export (same
`model_export_id`) that differ show the machine's own run-to-run noise. Without two runs of one
export among the reference runs, or with their spread past the tolerance, it is "inconclusive".
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl

MAJORITY = 0.75  # share of pairs in which the challenger must be slower


@dataclass
class Verdict:
    figure: str
    verdict: str  # ok | regression | inconclusive
    champion: float  # median of the champion's repeats
    challenger: float  # median of the challenger's repeats
    allowed: float
    spread: float
    slower_pairs: int
    pairs: int

    def message(self, champion_model) -> str:
        if self.verdict == "regression":
            return (
                f"challenger {self.figure} {self.challenger:.4f} ms is slower than the champion's "
                f"{self.champion:.4f} ms by more than {self.allowed:.4f} ms in {self.slower_pairs} of "
                f"{self.pairs} interleaved pairs (spread of repeats {self.spread:.4f} ms); the champion "
                f"{champion_model} stays"
            )
        return (
            f"latency inconclusive: {self.figure} repeats of one model spread {self.spread:.4f} ms, more "
            f"than the {self.allowed:.4f} ms tolerance"
        )


def relative_spread(values: list[float]) -> float:
    """Range of repeats (the slowest left out when there are 3 or more) over their median."""
    kept = sorted(values)[:-1] if len(values) >= 3 else sorted(values)
    mid = statistics.median(values)
    return (kept[-1] - kept[0]) / mid if mid > 0 and len(kept) > 1 else 0.0


def paired_verdict(figure: str, champion: list[float], challenger: list[float], tol) -> Verdict:
    """The champion-vs-challenger verdict of one figure from interleaved repeats (see the module doc)."""
    ref, cur = statistics.median(champion), statistics.median(challenger)
    allowed = tol.allowed(figure, ref)
    spread = max(relative_spread(champion), relative_spread(challenger)) * ref
    slower = sum(1 for a, b in zip(champion, challenger, strict=True) if b - a > allowed)
    if spread > allowed:
        verdict = "inconclusive"
    elif slower >= math.ceil(MAJORITY * len(champion)):
        verdict = "regression"
    else:
        verdict = "ok"
    return Verdict(figure, verdict, ref, cur, allowed, spread, slower, len(champion))


def spread_across_runs(reference: pl.DataFrame, figure: str, export_id: str, current: float) -> float | None:
    """The largest range of `figure` over runs of one export among the reference runs (this run
    counting as a run of its export); None when no export was run twice."""
    if "model_export_id" not in reference.columns or figure not in reference.columns:
        return None
    runs = reference.select(pl.col("model_export_id").fill_null(""), pl.col(figure).cast(pl.Float64))
    runs = pl.concat([runs, pl.DataFrame({"model_export_id": [export_id], figure: [float(current)]})])
    runs = runs.filter((pl.col("model_export_id") != "") & pl.col(figure).is_not_nan())
    groups = runs.group_by("model_export_id").agg(
        pl.len().alias("n"), (pl.max(figure) - pl.min(figure)).alias("r")
    )
    groups = groups.filter(pl.col("n") >= 2)
    return float(groups["r"].max()) if groups.height else None


# ---------------------------------------------------------------------------------------------- timing
def interleaved_latency(models: list[Path], events: pl.DataFrame, batch_size: int, repeats: int,
                        provider: str = "auto", threads: int | None = None) -> list[list[dict]]:  # fmt: skip
    """Per model, `repeats` latency dicts (LatencyRecorder.report) of replaying `events` (canonical,
    validated, sorted by session and time), the models timed in alternating order after one
    untimed replay each."""
    from gru4rec.bundle import load_bundle
    from gru4rec.score.ort_backend import OrtBackend
    from gru4rec.score.replay import plan_chunk, replay

    options = {"threads": threads} if threads else {}
    runs = []
    for model in models:
        bundle = load_bundle(model)
        backend = OrtBackend.from_bundle(bundle, provider, False, with_topk=False, **options)
        known, _ = bundle.items.translate(events)
        n_multi = int((known.group_by("session_id").len()["len"] >= 2).sum())
        batch = max(1, min(batch_size, n_multi))
        plan = plan_chunk(known, batch)
        if plan is None:
            raise ValueError(f"{model}: no session of the latency sample has 2 known events")
        runs.append((backend, plan, batch))
    for backend, plan, batch in runs:  # warm-up: first runs allocate and pick kernels
        backend.start(batch)
        replay(backend, plan, fetch_topk=False)
    out: list[list[dict]] = [[] for _ in runs]
    for r in range(repeats):
        order = range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))
        for i in order:
            out[i].append(_time_once(*runs[i]))
    return out


def _time_once(backend, plan, batch: int) -> dict:
    from gru4rec.score.latency import LatencyRecorder
    from gru4rec.score.replay import replay

    backend.start(batch)
    res = replay(backend, plan, fetch_topk=False)
    rec = LatencyRecorder()
    rec.phases["replay"] = float(res.step_seconds.sum())
    rec.add_steps(res.step_seconds, plan.width, batch)
    n_events = int(plan.width.sum())
    return rec.report(n_events, int(plan.schedule.reset.sum()), batch_size=batch)


def latency_sample(test: Path, max_events: int) -> pl.DataFrame:
    """The test's first whole sessions (in the scorer's order) up to about `max_events` events."""
    from gru4rec.score.source import SessionSource

    parts, n = [], 0
    for chunk in SessionSource(test).chunks():
        lengths = chunk.group_by("session_id", maintain_order=True).len()
        keep = lengths.filter(pl.col("len").cum_sum() <= max_events - n)["session_id"]
        parts.append(chunk.filter(pl.col("session_id").is_in(keep.implode())))
        n += parts[-1].height
        if n >= max_events or keep.len() < lengths.height:
            break
    return pl.concat(parts)


def time_models(models: list[Path], test: Path, batch_size: int, repeats: int, max_events: int,
                engine=None) -> list[list[dict]]:  # fmt: skip
    """`interleaved_latency` where the nightly's engine runs its steps: this process, or one Ray
    worker (with the worker's CPUs as ONNX Runtime's threads) when it scores on Ray."""
    events = latency_sample(test, max_events)
    if engine is None or engine.name == "local":
        return interleaved_latency(models, events, batch_size, repeats)
    from gru4rec.score.ray_engine import bundle_files_bytes, import_ray, ray_runtime

    ray = import_ray()
    with ray_runtime(ray, engine):
        gpus = engine.gpus_per_worker or 0
        task = ray.remote(num_cpus=engine.cpus_per_worker, num_gpus=gpus)(_remote_latency)
        blobs = [bundle_files_bytes(m) for m in models]
        threads = max(1, int(engine.cpus_per_worker))
        provider = "cuda" if gpus else "cpu"
        return ray.get(task.remote(blobs, events.to_arrow(), batch_size, repeats, provider, threads))


def _remote_latency(blobs: list[dict[str, bytes]], table, batch_size: int, repeats: int, provider: str,
                    threads: int) -> list[list[dict]]:  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gru4rec-latency-") as d:
        models = []
        for i, files in enumerate(blobs):
            folder = Path(d, str(i))
            folder.mkdir()
            for name, data in files.items():
                (folder / name).write_bytes(data)
            models.append(folder / "m.onnx")
        return interleaved_latency(models, pl.from_arrow(table), batch_size, repeats, provider, threads)
