"""The pipeline's stages as calls, for the commands that chain them (`eval benchmark`, `eval nightly`):
train a checkpoint, export it to an ONNX bundle, score a test set with it on a local or Ray engine.

Each is the stage's own code with the settings an eval config gives; nothing here is specific to
one command.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import polars as pl

from gru4rec.eval.config import EngineSpec


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
