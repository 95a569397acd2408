"""The nightly's gates: a run's figures against earlier runs, a champion and the unknown-item share.

A figure regresses when it is worse than its reference by more than `abs + rel·|reference|`
(numpy's isclose rule: set either tolerance to 0 to use only the other). Only runs on the same test
data (by content) in the same tie mode and role are compared.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import polars as pl

from gru4rec.errors import UserError
from gru4rec.eval.nightly.config import (
    LATENCY_FIGURES,
    UNKNOWN_SHARE,
    NightlyConfig,
    Tolerances,
    check_latency_steps,
    missing_figures,
)


def judge(cfg: NightlyConfig, history: pl.DataFrame, report: dict, champion_report: dict | None,
           model: str, now, test, window, paired: list | None):  # fmt: skip
    """(row, champion row, regressions, comparison table) of one measurement."""
    row = history_row(cfg, report, model, now, test, window, role="challenger" if cfg.champion else "")
    # Each window day tests other sessions: earlier days are the trend of the metrics, never their
    # gate. With a champion, latency is judged against it (timed side by side), not against history.
    regressions, table = compare(comparable(history, row), row, cfg.tolerances, gate_metrics=window is None,
                                 gate_latency=cfg.champion is None)  # fmt: skip
    regressions += unknown_share_check(row, cfg.tolerances, table)
    champion_row = None
    if champion_report is not None:
        champion_row, lost = versus_champion(cfg, champion_report, now, test, window, row, table, paired)
        regressions += lost
    return row, champion_row, regressions, table


def best_latency(report: dict, again: dict) -> dict:
    """`report` with each latency figure the lower of its two measurements (metrics are unchanged:
    the same model on the same data scores the same ranks)."""
    latency = dict(report.get("latency") or {})
    for key in LATENCY_FIGURES:
        a, b = latency.get(key), (again.get("latency") or {}).get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not math.isnan(b):
            latency[key] = b if math.isnan(a) else min(a, b)
    return {**report, "latency": latency}


def versus_champion(cfg: NightlyConfig, report: dict, now, test: Path, window, row: dict, table: list[dict],
                     paired: list | None):  # fmt: skip
    """The champion's row from its `report` on the same sessions; (its row, reasons the challenger lost).
    Metrics: the challenger's against the champion's. Latency: the interleaved verdicts (`paired`)."""
    champ = cfg.champion.model
    champion_row = history_row(cfg, report, str(champ), now, test, window, role="champion")
    champion_row["status"] = "champion"
    tol = cfg.tolerances
    verdicts = {v.figure: v for v in paired or []}
    lost = []
    for entry in table:
        figure = entry["name"]
        if figure in verdicts:
            v = verdicts[figure]
            entry.update(champion=v.champion, challenger_paired=v.challenger, champion_change=_change(v.challenger, v.champion),
                         verdict=v.verdict, spread=v.spread, allowed=v.allowed, slower_pairs=v.slower_pairs,
                         pairs=v.pairs)  # fmt: skip
            if v.verdict == "regression":
                entry["regressed"] = True
                lost.append(v.message(champ))
            continue
        if figure not in tol.metrics:
            continue
        ref, cur = champion_row[figure], row[figure]
        entry.update(champion=ref, champion_change=_change(cur, ref))
        if math.isnan(cur) or ref - cur > tol.allowed(figure, ref):
            entry["regressed"] = entry["champion_regressed"] = True
            lost.append(f"challenger {figure} {cur:.4f} is worse than the champion's {ref:.4f} "
                        f"(allowed {tol.allowed(figure, ref):.4f}); the champion {champ} stays")  # fmt: skip
    return champion_row, lost


def history_row(cfg: NightlyConfig, report: dict, model: str, now: dt.datetime, test: Path | None = None,
         window=None, role: str = "") -> dict:  # fmt: skip
    test = test if test is not None else cfg.test
    row: dict[str, Any] = {
        "run_id": now.strftime("%Y%m%dT%H%M%SZ"),
        "time": now.isoformat(timespec="seconds"),
        "status": "",
        "role": role,
        "model": model,
        "test": str(test) if test else "",
        "test_fingerprint": str(report.get("test_fingerprint") or ""),
        "model_export_id": str(report.get("model_export_id") or ""),
        "tie_mode": str(report.get("tie_mode", cfg.tie_mode)),
    }
    for key, value in report["metrics"].items():
        if key != "n" and isinstance(value, (int, float)):
            row[key] = float(value)
    row["n_predictions"] = int(report["metrics"].get("n", 0))
    n_events = report.get("n_events")
    if isinstance(n_events, int) and n_events > 0:
        row["n_test_events"] = n_events
        row["n_unknown_dropped"] = int(report.get("n_unknown_dropped") or 0)
        row[UNKNOWN_SHARE] = row["n_unknown_dropped"] / n_events
    for key, value in (report.get("latency") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[key] = float(value)
    missing = missing_figures(report, cfg.tolerances)
    if missing:
        raise UserError(
            f"the scorer's report has no {', '.join(missing)}: fix [nightly.tolerances] or the cut-offs"
        )
    check_latency_steps(report, cfg.tolerances, f"{cfg.source}: scoring {test}")
    if window is not None:
        row.update(window.info())
    return row


def unknown_share_check(row: dict, tol: Tolerances, table: list[dict]) -> list[str]:
    """A model scored on data it does not know gives zeros with exit 0 otherwise: fail it, with the reason."""
    share = row.get(UNKNOWN_SHARE)
    if share is None:
        return []
    entry = {"name": UNKNOWN_SHARE, "current": share, "reference": tol.max_unknown_share,
             "reference_kind": "max_unknown_share"}  # fmt: skip
    table.append(entry)
    if share <= tol.max_unknown_share:
        return []
    entry["regressed"] = True
    return [
        f"{UNKNOWN_SHARE} is {share:.1%} (max_unknown_share {tol.max_unknown_share:.1%}): "
        f"{row.get('n_unknown_dropped', 0):,} of {row.get('n_test_events', 0):,} test events are of items the "
        "model does not know; is this the model trained for this data?"
    ]


def comparable(history: pl.DataFrame, row: dict, same_day: bool = False) -> pl.DataFrame:
    """Earlier runs this run is compared with: the same test data (by content), tie mode and role.

    Window runs: each day's test data differs, so the history is their trend (in date order), not
    their gate (the champion on the same sessions is); a re-run of a day replaces that day's row and
    is never compared with it (`same_day` keeps it, for the plots after the history is written)."""
    h = history
    keys = ("tie_mode", "test_fingerprint") if "as_of" not in row else ("tie_mode",)
    for key in keys:
        if key in h.columns:
            h = h.filter(pl.col(key).fill_null("") == row[key])
        elif h.height:
            h = h.clear()
    role = pl.col("role").fill_null("") if "role" in h.columns else pl.lit("")
    h = h.filter(role == row.get("role", ""))
    if "as_of" in row:
        h = h.filter(pl.col("as_of").is_not_null()) if "as_of" in h.columns else h.clear()
        if not same_day and h.height:
            h = h.filter(pl.col("as_of") < row["as_of"])
        for key in ("train_days", "test_days"):  # the same window shape only
            h = h.filter(pl.col(key) == row[key]) if key in h.columns else h.clear()
    return h


def compare(history: pl.DataFrame, row: dict, tol: Tolerances, gate_metrics: bool = True,
            gate_latency: bool = True) -> tuple[list[str], list[dict]]:  # fmt: skip
    """Regression messages and the comparison table of `row` against earlier runs (see the module
    doc). A figure that is not gated (`gate_metrics`, `gate_latency` false) is shown as the trend."""
    from gru4rec.eval.latency_gate import spread_across_runs

    regressions: list[str] = []
    table: list[dict] = []
    for figure in tol.metrics + tol.latency:
        lower_better = figure in tol.latency
        cur = row[figure]
        entry: dict[str, Any] = {"name": figure, "current": cur}
        past = (
            history[figure].cast(pl.Float64).drop_nulls().drop_nans().to_list()
            if figure in history.columns
            else []
        )
        if past:
            kind, ref = tol.reference(figure, past)
            entry.update(previous=past[-1], previous_change=_change(cur, past[-1]),
                         reference=ref, reference_change=_change(cur, ref), reference_kind=kind)  # fmt: skip
        table.append(entry)
        if not (gate_latency if lower_better else gate_metrics):
            entry["verdict"] = "trend"
            continue
        if lower_better and past:
            recent = history.tail(tol.latency_window)
            spread = spread_across_runs(recent, figure, row.get("model_export_id", ""), cur)
            entry["spread"] = spread
            if spread is None or spread > tol.allowed(figure, entry["reference"]):
                entry["verdict"] = "inconclusive"
                continue
        for which, ref in tol.checked(figure, past):
            worse = (cur - ref) if lower_better else (ref - cur)
            if math.isnan(cur) or worse > tol.allowed(figure, ref):
                entry["regressed"] = True
                unit = " ms" if lower_better else ""
                verb = "rose" if lower_better else "dropped"
                regressions.append(
                    f"{figure} {verb} to {cur:.4f}{unit} from {ref:.4f}{unit} ({which}; "
                    f"{(cur - ref) / ref * 100 if ref else float('nan'):+.1f}%, allowed "
                    f"{tol.allowed(figure, ref):.4f}{unit})"
                )
        entry.setdefault("verdict", "regression" if entry.get("regressed") else "ok")
    return regressions, table


def _change(cur: float, ref: float) -> float | None:
    return 100.0 * (cur - ref) / ref if ref else None
