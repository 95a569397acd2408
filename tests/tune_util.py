"""Helpers of the `gru4rec-cli tune` tests: tiny synthetic data, a tiny space, the command line, the
study as Optuna reads it, and a process signalled at a moment it cannot slip past."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import tomli_w
from optuna.trial import TrialState

from gru4rec.synth import generate

REPO = Path(__file__).resolve().parents[1]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

# Tiny, fast model; learning rate categorical with one clearly better choice planted.
TINY_FIXED = {
    "loss": "cross-entropy",
    "layers": 8,
    "batch_size": 16,
    "n_sample": 16,
    "sample_store_size": 20_000,
    "eval_batch_size": 64,
    "embedding_mode": "shared",
}
GOOD_LR, BAD_LR = 0.1, 0.0002

# 2 x 11 = 22 configurations: room for every test of new configurations, few enough that a replayed
# sampler would repeat its earlier proposals exactly
WIDE = {
    "learning_rate": {"type": "categorical", "choices": [BAD_LR, GOOD_LR]},
    "dropout_p_hidden": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.05},
}


def write_data(folder: Path) -> dict[str, Path]:
    """The tests' training and validation events (the `tune_data` fixture of conftest.py)."""
    train, test = generate(600, 80, seed=3)
    paths = {"train": folder / "train.parquet", "valid": folder / "valid.parquet"}
    train.write_parquet(paths["train"])
    test.write_parquet(paths["valid"])
    return paths


def space_file(folder: Path, n_epochs: int, search: dict | None = None, name: str = "tiny") -> Path:
    search = search or {
        "learning_rate": {"type": "categorical", "choices": [BAD_LR, GOOD_LR]},
        "dropout_p_hidden": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.1},
    }
    path = folder / f"{name}.toml"
    fixed = {k: v for k, v in {**TINY_FIXED, "n_epochs": n_epochs}.items() if k not in search}
    path.write_text(tomli_w.dumps({"fixed": fixed, "search": search}))
    return path


def tune_args(data, out: Path, space: Path, n_trials: int, *extra: str) -> list[str]:
    return ["tune", data["train"], "--valid", data["valid"], "--out", out, "--space", space,
            "--n-trials", str(n_trials), "--device", "cpu", "--threads", "1", "--seed", "5", *extra]  # fmt: skip


def load(out: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def popen(args: list) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "gru4rec.cli", *map(str, args)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def signal_when(args: list, ready, sig: int, what: str) -> tuple[int, str]:
    """Run `gru4rec-cli ARGS` in a process, send it `sig` once `ready()`; (exit code, stderr).

    The process is stopped (SIGSTOP) while `ready()` looks at it, so what `ready()` saw is still
    true when `sig` arrives: however fast the process runs, the moment cannot slip past."""
    proc = popen(args)

    def frozen_ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}")
        proc.send_signal(signal.SIGSTOP)
        if ready():
            return True  # still stopped: `sig` is sent first, then the process continues
        proc.send_signal(signal.SIGCONT)
        return False

    try:
        wait_for(frozen_ready, 240, what)
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    return proc.returncode, err


def finished_configs(out: Path, name: str = "tiny") -> list[tuple]:
    """Parameter tuples of the finished trials, read from the study DB (the independent reference)."""
    trials = load(out, name).get_trials(deepcopy=False, states=FINISHED)
    return [tuple(sorted(t.params.items())) for t in trials]


def assert_no_repeats(out: Path, name: str = "tiny") -> list[tuple]:
    configs = finished_configs(out, name)
    assert len(configs) == len(set(configs)), f"repeated configurations among finished trials: {configs}"
    return configs


def trials_in(out: Path, name: str = "tiny") -> list:
    try:
        return load(out, name).get_trials(deepcopy=False)
    except Exception:  # the study does not exist yet, or the file is being created
        return []
