"""What `tune` is asked (TuneOptions, checked before anything is read) and what a worker gets (Job)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from gru4rec.data import Keys
from gru4rec.errors import UserError
from gru4rec.train.tune.space import SearchSpace

METRICS = ("mrr@20", "recall@20")
PRUNERS = ("median", "hyperband", "none")


@dataclass
class TuneOptions:
    train: Path
    out: Path
    valid: Path | None = None
    space: str = "xe"
    preset: str | None = None
    params: list[str] = field(default_factory=list)
    n_trials: int = 100
    timeout: float | None = None
    metric: str = "mrr@20"
    storage: str | None = None
    study: str | None = None
    pruner: str = "median"
    device: str = "auto"
    seed: int = 42
    n_jobs: int = 1
    threads: int | None = None
    final_test: Path | None = None
    valid_days: float = 1.0
    keys: Keys = field(default_factory=Keys)
    progress: bool = True


@dataclass
class Job:
    """What a worker needs to run trials (picklable: handed to spawned worker processes)."""

    storage_url: str
    study_name: str
    space: SearchSpace
    base: dict[str, Any]
    metric: str
    seed: int
    n_trials: int
    n_at_start: int  # trials in the study when this command started: seeds this start's samplers
    deadline: float | None  # time.time() after which no trial starts
    pruner: str
    n_epochs: int
    devices: list[str]
    threads: int | None
    n_jobs: int
    progress: bool
    train_events: pl.DataFrame
    valid_events: pl.DataFrame


def check_options(o: TuneOptions) -> None:
    if o.metric not in METRICS:
        raise UserError(f"--metric must be one of {', '.join(METRICS)}, got {o.metric!r}")
    if o.pruner not in PRUNERS:
        raise UserError(f"--pruner must be one of {', '.join(PRUNERS)}, got {o.pruner!r}")
    if o.n_trials < 1:
        raise UserError(f"--n-trials must be >= 1, got {o.n_trials}")
    if o.n_jobs < 1:
        raise UserError(f"--n-jobs must be >= 1, got {o.n_jobs}")
    if o.timeout is not None and not o.timeout > 0:
        raise UserError(f"--timeout must be > 0 seconds, got {o.timeout}")
    if not o.valid_days > 0:
        raise UserError(f"--valid-days must be > 0, got {o.valid_days}")
    if o.storage is not None and o.n_jobs > 1 and ":memory:" in o.storage:
        raise UserError("--n-jobs > 1 needs a storage the worker processes can share, not an in-memory one")
