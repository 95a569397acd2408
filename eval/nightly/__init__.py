"""`eval nightly`: the scheduled offline evaluation.

(Optionally) cut a window from a live log, train and export, score the test sessions with the ONNX
model (and the champion beside it), append the metrics and latency figures to the history Parquet,
compare with earlier runs and write a Markdown report with trend plots. Exit codes (CLI): 0 no
regression, 1 regression, 2 bad config, missing input files or an unreadable history (checked
before any work; nothing is written then).

The package, one job a module:
  config   the TOML schema, its defaults and every check made before a run (`load_config`);
  runner   one run: window, training, scoring, timing again, writing, moving into `out` (`run`);
  gates    what a figure is compared with and when it regresses (`compare`, the champion);
tracking goes through gru4rec.eval.tracking (`track_nightly`), trend plots through gru4rec.eval.plots.

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

A config, in short (eval/configs/nightly.example.toml documents every key):

    [nightly]
    history = "nightly/history.parquet"
    out = "nightly/latest"                # this run's report.md, plots, metrics.json (and model)
    test = "data/test.parquet"
    model = "model.onnx"                  # scored as is, unless [nightly.train] trains a new one

    [nightly.train]                       # optional: train on `train`, export, then score
    train = "data/train.parquet"
    preset = "rsc15"

    [nightly.tolerances]
    metrics = ["recall@20", "mrr@20"]     # higher is better
    latency = ["ms_per_1k_events"]        # lower is better; percentiles over every step are noise
"""

from gru4rec.eval.nightly.config import (
    EXAMPLE_CONFIG,
    LATENCY_FIGURES,
    ChampionSpec,
    NightlyConfig,
    Tolerances,
    TrainSpec,
    check_latency_steps,
    load_config,
    planned_steps,
)
from gru4rec.eval.nightly.gates import best_latency, compare, unknown_share_check
from gru4rec.eval.nightly.runner import EXIT_REGRESSION, model_settings, run
from gru4rec.eval.plots import regression_flags

__all__ = [
    "EXAMPLE_CONFIG",
    "EXIT_REGRESSION",
    "LATENCY_FIGURES",
    "ChampionSpec",
    "NightlyConfig",
    "Tolerances",
    "TrainSpec",
    "best_latency",
    "check_latency_steps",
    "compare",
    "load_config",
    "model_settings",
    "planned_steps",
    "regression_flags",
    "run",
    "unknown_share_check",
]
