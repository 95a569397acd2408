"""PNG figures for people: Recall@k / MRR@k curves, scorer latency, training loss, nightly trends.

Every function writes one file atomically and returns its path. matplotlib runs headless (Agg).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from gru4rec.io import atomic_path

DPI = 120


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    _plt().close(fig)
    return path


def metric_curves(path: Path, title: str, curves: Mapping[str, Mapping[str, float]], max_k: int = 20) -> Path:
    """Two panels, Recall@k and MRR@k for k = 1..max_k, one line per model (`curves[model]` = metrics)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ks = np.arange(1, max_k + 1)
    for model, m in curves.items():
        for ax, metric in zip(axes, ("recall", "mrr"), strict=True):
            ys = [m.get(f"{metric}@{k}", np.nan) for k in ks]
            ax.plot(ks, ys, marker="o", markersize=3, label=model)
    for ax, label in zip(axes, ("Recall@k", "MRR@k"), strict=True):
        ax.set_xlabel("cut-off k (items recommended)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} — {title}")
        ax.set_xticks(sorted({1, max_k, *range(5, max_k + 1, 5)}) if max_k > 10 else ks)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def latency_histogram(path: Path, title: str, step_ms: np.ndarray, batch_size: int | None = None) -> Path:
    """Distribution of per-step scorer latency with p50 / p95 / p99 marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    step_ms = np.asarray(step_ms, dtype=np.float64)
    hi = np.percentile(step_ms, 99.5) if len(step_ms) else 1.0
    bins = int(np.clip(len(step_ms) // 4, 10, 60))
    ax.hist(np.clip(step_ms, None, hi), bins=bins, color="tab:blue", alpha=0.75)
    for q, style in ((50, "-"), (95, "--"), (99, ":")):
        v = np.percentile(step_ms, q)
        ax.axvline(v, color="black", linestyle=style, label=f"p{q} = {v:.3f} ms")
    ax.set_xlabel("time per replay step (ms)" + (f", batch of {batch_size} sessions" if batch_size else ""))
    ax.set_ylabel("number of steps")
    ax.set_title(f"Scorer latency — {title} ({len(step_ms):,} steps)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def training_curve(path: Path, title: str, history: Sequence[Mapping[str, float]]) -> Path:
    """Training loss per epoch; validation Recall@20 / MRR@20 on a second axis when recorded."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["loss"] for h in history], marker="o", color="tab:red", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (mean per event)")
    ax.set_xticks(epochs)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if any("recall@20" in h for h in history):
        ax2 = ax.twinx()
        for key, color in (("recall@20", "tab:blue"), ("mrr@20", "tab:green")):
            ax2.plot(
                epochs, [h.get(key, np.nan) for h in history], marker="s", color=color, label=f"valid {key}"
            )
        ax2.set_ylabel("validation metric")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    # Below the axes: loss and metrics move in opposite directions, so any corner may be taken.
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, fontsize=9)
    ax.set_title(f"Training — {title}")
    return _save(fig, path)


def trends(path: Path, title: str, runs: Sequence[str], series: Mapping[str, Sequence[float]], ylabel: str,
           flagged: Mapping[str, Sequence[bool]] | None = None) -> Path:  # fmt: skip
    """One line per series over successive runs; `flagged[name]` marks the runs where that series
    regressed, circled in red (only those points: a run where one figure regressed leaves the others)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    x = np.arange(len(runs))
    for name, ys in series.items():
        ys = np.asarray(ys, dtype=np.float64)
        ax.plot(x, ys, marker="o", label=name)
        bad = np.asarray((flagged or {}).get(name, [False] * len(x)), dtype=bool)
        if bad.any():
            ax.scatter(x[bad], ys[bad], s=140, facecolors="none", edgecolors="red", linewidths=2)
    if flagged is not None and any(any(v) for v in flagged.values()):
        ax.scatter([], [], s=140, facecolors="none", edgecolors="red", linewidths=2, label="regression")
    step = max(1, len(runs) // 12)
    ax.set_xticks(x[::step], [runs[i] for i in x[::step]], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("run")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def regression_flags(history, figures: list[str]) -> dict[str, list[bool]]:
    """Per figure, the runs where that figure regressed (the trend plots circle those points only).
    A run recorded before per-figure flags counts as regressed in every figure when it regressed."""
    regressed = history["regressed"].to_list() if "regressed" in history.columns else [None] * history.height
    status = history["status"].to_list()
    return {
        f: [f in r.split(",") if r is not None else s == "regression" for r, s in zip(regressed, status)]
        for f in figures
    }


def nightly_trends(
    history, folder: Path, metrics: list[str], latency: list[str], tie_mode: str
) -> dict[str, str]:
    """The nightly's trend plots of `history` (a Polars frame of comparable runs) into `folder`:
    {title: file name}; only the figures that regressed are circled."""
    import polars as pl

    runs = history["run_id"].to_list()
    out: dict[str, str] = {}
    groups = (("metrics", metrics, "metric value", "Accuracy over nightly runs"),
              ("latency", latency, "milliseconds", "Scorer latency over nightly runs"))  # fmt: skip
    for key, figures, ylabel, title in groups:
        series = {f: history[f].cast(pl.Float64).to_list() for f in figures if f in history.columns}
        if series:
            name = f"trend_{key}.png"
            trends(folder / name, f"{title} ({tie_mode} ties)" if key == "metrics" else title,
                   runs, series, ylabel, regression_flags(history, list(series)))  # fmt: skip
            out[title] = name
    return out
