"""What `gru4rec-cli tune` leaves in its folder, written atomically from the study as it stands:
best.toml (the best trial's complete training parameters: `train --params best.toml`),
trials.parquet (one row per trial) and report.md with plots/ (Optuna's matplotlib figures)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

from gru4rec.io import atomic_path, check_output_dir, write_parquet_atomic, write_text_atomic
from gru4rec.train.tune.space import SearchSpace

STUDY_MARKER = "study.json"  # which study the folder's outputs are of: one study per --out
OUTPUT_FILES = ("best.toml", "trials.parquet", "report.md", STUDY_MARKER)
PLOTS = "plots"


@dataclass
class ReportInfo:
    study_name: str
    storage: str  # password redacted
    storage_key: str  # the storage as study.json names it
    space: SearchSpace
    base_preset: str | None
    metric: str
    seed: int
    n_trials: int
    pruner: str
    valid_note: str
    train_path: str
    wall_s: float  # this run
    notes: list[str] = field(default_factory=list)  # said in the console too: drops, no-effect parameters


def write_outputs(study, out: Path, info: ReportInfo, console) -> dict:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    frame = trials_frame(trials, info.metric, info.space)
    write_text_atomic(out / STUDY_MARKER, json.dumps({"study": info.study_name, "storage": info.storage_key}))
    write_parquet_atomic(frame, out / "trials.parquet")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    counts["repeat"] = sum("repeat_of" in t.user_attrs for t in trials)  # failed on purpose: said apart
    counts["fail"] -= counts["repeat"]
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
    summary: dict[str, Any] = {"counts": counts, "best": None, "wall_s": info.wall_s}
    if best is not None:
        summary["best"] = {
            "number": best.number,
            "value": best.value,
            "config": best.user_attrs["config"],
            "params": clean_params(best.params, info.space),
            "history": best.user_attrs.get("history", []),
        }
        write_text_atomic(out / "best.toml", best_toml(best, info))
    plots, missing = write_plots(study, out, info.metric, complete)
    write_text_atomic(out / "report.md", report_markdown(trials, frame, summary, info, plots, missing))
    for line in missing:
        console.print(f"report: not drawn: {line}", markup=False)
    line = (
        f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed trial(s)"
        f" and {counts['repeat']} skipped repeat(s) in the study; this run {info.wall_s:.0f}s"
    )
    if best is not None:
        line += f"; best #{best.number}: {info.metric} {best.value:.4f} -> {out / 'best.toml'}"
    console.print(line, markup=False)
    return summary


def best_toml(best, info: ReportInfo) -> str:
    import tomli_w

    header = [
        f"# Best trial #{best.number} of study {info.study_name!r}: validation {info.metric} {best.value:.6f}",
        f"# (trained with --seed {info.seed}; validation: {info.valid_note}).",
        "# Every training parameter, as the trial used it: gru4rec-cli train TRAIN --params best.toml",
    ]
    return "\n".join(header) + "\n" + tomli_w.dumps(best.user_attrs["config"])


def clean_params(params: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """A trial's parameters with stepped floats on their decimal grid (as best.toml has them)."""
    dims = {d.name: d for d in space.dims}
    return {k: dims[k].clean(v) if k in dims else v for k, v in params.items()}


def trials_frame(trials, metric: str, space: SearchSpace) -> pl.DataFrame:
    """One row per trial: state, value, per-epoch metric and loss, duration, memory, parameters."""
    rows = []
    for t in trials:
        a = t.user_attrs
        hist = a.get("history", [])
        row = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value if t.values else None,
            "epochs": len(hist),
            metric: [h.get(metric) for h in hist],
            "loss": [h.get("loss") for h in hist],
            "duration_s": t.duration.total_seconds() if t.duration is not None else None,
            "started": t.datetime_start,
            "diverged": "diverged" in a,
            "worker": a.get("worker"),
            "pid": a.get("pid"),
            "host": a.get("host"),
            "rss_mb_start": a.get("rss_mb_start"),
            "gpu_mb_start": a.get("gpu_mb_start"),
            "gpu_peak_mb": a.get("gpu_peak_mb"),
            "config": json.dumps(a.get("config")) if "config" in a else None,
            "repeat_of": a.get("repeat_of"),
        }
        row.update({f"param_{k}": v for k, v in clean_params(t.params, space).items()})
        rows.append(row)
    schema = {
        "number": pl.Int64,
        "state": pl.String,
        "value": pl.Float64,
        "epochs": pl.Int64,
        metric: pl.List(pl.Float64),
        "loss": pl.List(pl.Float64),
        "duration_s": pl.Float64,
        "started": pl.Datetime("us"),
        "diverged": pl.Boolean,
        "worker": pl.Int64,
        "pid": pl.Int64,
        "host": pl.String,
        "rss_mb_start": pl.Float64,
        "gpu_mb_start": pl.Float64,
        "gpu_peak_mb": pl.Float64,
        "config": pl.String,
        "repeat_of": pl.Int64,
    }
    if not rows:
        return pl.DataFrame(schema=schema)
    frame = pl.DataFrame(rows, schema_overrides=schema, infer_schema_length=None, strict=False)
    return frame.sort("number")


# ------------------------------------------------------------------------------------ plots
def write_plots(study, out: Path, metric: str, complete: list) -> tuple[dict[str, str], list[str]]:
    """Optimisation history, parameter importances, metric vs the two most important parameters and
    the per-epoch curves (what pruning saw). Returns (plots made, one line per plot that could not be
    drawn): a plot never stops the report, which is written after trials that took hours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    folder = check_output_dir(out / PLOTS)
    made: dict[str, str] = {}
    missing: list[str] = []
    importances: dict[str, float] = {}
    if len(complete) >= 3:
        try:
            importances = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
        except Exception as e:  # Optuna's evaluators refuse some studies (too few distinct values, ...)
            missing.append(f"parameter importances: {_why(e)}")
    top = [k for k, _ in sorted(importances.items(), key=lambda kv: -kv[1])][:2]
    jobs = [
        ("history", "Optimisation history", lambda: ovm.plot_optimization_history(study, target_name=metric)),
        (
            "epochs",
            "Validation metric per epoch (pruned trials stop early)",
            lambda: ovm.plot_intermediate_values(study),
        ),
    ]
    if importances:
        jobs.append(
            ("importances", "Parameter importances (PED-ANOVA)",
             lambda: ovm.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator(), target_name=metric))
        )  # fmt: skip
    if top:
        jobs.append(
            ("slice", f"{metric} vs the most important parameters", lambda: ovm.plot_slice(study, params=top, target_name=metric))
        )  # fmt: skip
    for name, title, make in jobs:
        if not complete and name != "epochs":
            continue
        try:
            _save_plot(make, folder / f"{name}.png", plt)
        except Exception as e:
            plt.close("all")
            missing.append(f"{title}: {_why(e)}")
            continue
        made[name] = title
    for stale in folder.glob("*.png"):  # a plot this run could not make must not show old data
        if stale.stem not in made:
            stale.unlink()
    return made, missing


def _save_plot(make, path: Path, plt) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's matplotlib backend is marked experimental
        axes = make()
    fig = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
    fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # Optuna's slice plot of many parameters asks for a tight layout it cannot fit; the
        # bounding box below still fits the image to its contents
        warnings.filterwarnings("ignore", message="Tight layout not applied")
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _why(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


# ------------------------------------------------------------------------------------ report.md
def report_markdown(
    trials, frame: pl.DataFrame, summary: dict, info: ReportInfo, plots: dict, missing: list[str]
) -> str:
    c, metric = summary["counts"], info.metric
    lines = [
        f"# Tuning report: study `{info.study_name}`",
        "",
        f"Written {datetime.now().astimezone().isoformat(timespec='seconds')} by `gru4rec-cli tune`.",
        "",
        "| | |",
        "|---|---|",
        f"| training data | `{info.train_path}` |",
        f"| validation | {info.valid_note} |",
        f"| search space | {info.space.source}: {'; '.join(info.space.describe())} |",
        f"| fixed | {', '.join(f'{k}={v}' for k, v in info.space.fixed.items())}"
        + (f"; the rest from preset `{info.base_preset}`" if info.base_preset else "; the rest: defaults")
        + " |",
        f"| metric | validation {metric}, maximised; seed {info.seed} |",
        f"| pruner | {info.pruner} |",
        f"| storage | `{info.storage}` |",
        f"| trials | {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed, {c['running']} running "
        f"(target: {info.n_trials} finished) |",
        f"| skipped repeats | {c['repeat']} (proposals equal to a trial the study had: failed, not counted) |",
        f"| this run | {info.wall_s:.0f} s |",
        "",
    ]
    if info.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in info.notes], ""]
    best = summary["best"]
    if best is None:
        lines += ["No trial has completed yet.", ""]
    else:
        hist = best["history"][-1] if best["history"] else {}
        other = "recall@20" if metric == "mrr@20" else "mrr@20"
        lines += [
            f"## Best trial #{best['number']}: {metric} {best['value']:.4f}"
            + (f" ({other} {hist[other]:.4f})" if other in hist else ""),
            "",
            "| parameter | value |",
            "|---|---|",
            *[f"| {k} | {_fmt(v)} |" for k, v in best["params"].items()],
            "",
            "`best.toml` holds every training parameter of this trial: "
            f"`gru4rec-cli train TRAIN --params best.toml --seed {info.seed}` trains it again.",
            "",
        ]
    lines += _top_trials(frame, metric) + _memory(frame)
    if plots or missing:
        lines += ["## Plots", ""]
        for name, title in plots.items():
            lines += [f"### {title}", "", f"![{name}]({PLOTS}/{name}.png)", ""]
        lines += [f"Not drawn: {m}" + "  " for m in missing] + ([""] if missing else [])
    return "\n".join(lines)


def _top_trials(frame: pl.DataFrame, metric: str) -> list[str]:
    done = frame.filter(pl.col("state").is_in(["COMPLETE", "PRUNED"]))
    if done.height == 0:
        return []
    last = pl.col(metric).list.last()
    top = done.with_columns(last.alias("_last")).sort("_last", descending=True, nulls_last=True).head(10)
    params = [c for c in frame.columns if c.startswith("param_")]
    head = ["#", "state", f"{metric} (last epoch)", "epochs", "seconds", *[p[6:] for p in params]]
    lines = ["## Top trials", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in top.iter_rows(named=True):
        cells = [str(r["number"]), r["state"].lower() + (" (diverged)" if r["diverged"] else ""),
                 _fmt(r["_last"]), str(r["epochs"]), _fmt(r["duration_s"], 1), *[_fmt(r[p]) for p in params]]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _memory(frame: pl.DataFrame) -> list[str]:
    """RSS (and GPU memory) at the start of each trial, per process: a leak grows it trial after trial.
    The first trial of a process starts before the first model exists, so growth counts from the 2nd."""
    rss = frame.filter(pl.col("rss_mb_start").is_not_null()).sort("number")
    if rss.height < 2:
        return []
    lines = [
        "## Memory across trials",
        "",
        "Host RSS at the start of each trial (after garbage collection), per process; different batch "
        "and layer sizes move it by some MiB, a leak would grow it trial after trial.",
        "",
        "| process | host | trials | 1st | 2nd | last | max | last - 2nd | GPU at start, 2nd / last | GPU peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (pid, host), g in rss.group_by(["pid", "host"], maintain_order=True):
        r = g["rss_mb_start"]
        second = r[1] if g.height > 1 else None
        gpu = g["gpu_mb_start"].drop_nulls()
        gpu_txt = f"{gpu[min(1, len(gpu) - 1)]:.0f} / {gpu[-1]:.0f} MiB" if len(gpu) else "-"
        peak = g["gpu_peak_mb"].drop_nulls()
        cells = [str(pid), str(host), str(g.height), f"{r[0]:.0f}", _fmt(second, 0), f"{r[-1]:.0f}",
                 f"{r.max():.0f}", f"{r[-1] - second:+.0f}" if second is not None else "-", gpu_txt,
                 f"{peak.max():.0f} MiB" if len(peak) else "-"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def track(spec, out: Path, summary: dict, metric: str, study: str) -> str | None:
    """Log the tuning run to MLflow with the nightly's keys (recall_at_20, ...): the best trial's
    parameters, its validation metric, the final-test figures of each model, and the outputs as
    artifacts. Returns the tracking error (one line) or None."""
    from gru4rec.eval.tracking import TrackedRun, log_runs

    best = summary.get("best") or {}
    metrics: dict[str, Any] = {f"valid_{metric}": best.get("value"), **summary["counts"]}
    for row in summary.get("final") or []:
        prefix = "" if row["model"].startswith("tuned") else "preset_"
        metrics.update({f"{prefix}{k}": v for k, v in row.items() if "@" in k})
    tags = {"gru4rec.kind": "tune", "gru4rec.study": study, "gru4rec.best_trial": best.get("number")}
    artifacts = [out / n for n in ("report.md", "best.toml", "trials.parquet")]
    artifacts += sorted((out / "plots").glob("*.png"))
    run = TrackedRun(f"tune {study}", dict(best.get("config") or {}), metrics, tags, artifacts)
    return log_runs(spec, [run])[1]
