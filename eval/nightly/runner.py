"""One nightly run: cut the window, train and export, score (and the champion), judge, write.

Everything the run writes under `out` is made in a temporary folder beside it and moved in only
when the run completes, so a run that stops leaves `out` exactly as it was; the history is written
only after it was read whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

from gru4rec.errors import UserError
from gru4rec.eval.history import read_history, upsert_runs
from gru4rec.eval.nightly.config import (
    NightlyConfig,
    check_latency_steps,
    planned_steps,
    read_metrics_json,
)
from gru4rec.eval.nightly.gates import best_latency, comparable, judge
from gru4rec.eval.plots import nightly_trends
from gru4rec.io import check_output_dir, check_output_file, write_text_atomic

# Between a latency alarm and its re-measurement: lets a passing stall of the machine pass.
CONFIRM_PAUSE_S = 1.0
EXIT_REGRESSION = 1


def run(cfg: NightlyConfig, now: dt.datetime | None = None, as_of: str | None = None) -> dict:
    """Do one nightly run; returns the summary (regressions empty when all is well).

    `as_of` (window runs): the day to test on, overriding [nightly.window] as_of. Everything the run
    writes under `out` is made in a temporary folder beside it and moved in only when the run
    completes: a run that stops (bad input, too small a window) leaves `out` exactly as it was."""
    # Unusable outputs and an unreadable history stop the run before any work (and before a long
    # training), and the history is never written when it could not be read.
    check_output_file(cfg.history, inputs=_inputs(cfg))
    history = read_history(cfg.history)
    check_output_dir(cfg.out.parent)
    if cfg.out.exists() and not cfg.out.is_dir():
        raise UserError(f"{cfg.out}: output folder path is an existing file")
    if cfg.out.is_dir() and not os.access(cfg.out, os.W_OK | os.X_OK):
        raise UserError(f"{cfg.out}: output folder is not writable")
    if as_of is not None and cfg.window is None:
        raise UserError(f"--as-of needs a [nightly.window] table in {cfg.source}")
    if cfg.metrics_json is None and cfg.train is None and cfg.model.suffix == ".onnx":
        _check_catalog(cfg, cfg.model)
    if cfg.champion is not None and cfg.champion.model.is_file():
        from gru4rec.bundle import load_bundle

        load_bundle(cfg.champion.model)  # a broken champion bundle stops the run before training
    stage = Path(tempfile.mkdtemp(prefix=f".{cfg.out.name}.", suffix=".run", dir=cfg.out.parent))
    try:
        with _engine_session(cfg):
            summary = _run_staged(dataclasses.replace(cfg, out=stage), cfg.out, history, now, as_of)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if cfg.mlflow is not None:  # after the history and report are in place: tracking never loses them
        from gru4rec.eval.tracking import track_nightly

        summary["mlflow_run_ids"], summary["tracking_error"] = track_nightly(
            cfg, summary, Path(summary["current"]["model"])
        )
    return summary


def _say(text: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(text, markup=False, highlight=False)


def _run_staged(cfg: NightlyConfig, out: Path, history: pl.DataFrame, now, as_of) -> dict:
    """The run, writing into `cfg.out` (the stage), which is moved to `out` once all is written."""
    now = now or dt.datetime.now(dt.UTC)
    test, train_events, window = cfg.test, None, None
    if cfg.window is not None:
        test, train_events, window = _cut(cfg, as_of)
    if cfg.metrics_json is None and cfg.tolerances.latency:
        check_latency_steps({"latency": planned_steps(test, cfg.batch_size)}, cfg.tolerances,
                            f"{cfg.source}: scoring {test} at batch_size {cfg.batch_size} (before any training)")  # fmt: skip
    _say(f"nightly: working in {cfg.out}, moved into {out} when the run completes")
    report, model = _measure(cfg, test, train_events)
    champion_report = _score_champion(cfg, test)
    paired = _paired_latency(cfg, test, model, champion_report)
    for attempt in range(cfg.tolerances.latency_confirm + 1):
        row, champion_row, regressions, table = judge(cfg, history, report, champion_report, model, now,
                                                       test, window, paired)  # fmt: skip
        slow = [e["name"] for e in table if e.get("regressed") and e["name"] in cfg.tolerances.latency
                and "pairs" not in e]  # fmt: skip
        if not slow or cfg.metrics_json is not None or attempt == cfg.tolerances.latency_confirm:
            break
        # A stall of the machine (another job, a page-cache flush) slows one measurement, a slower
        # model slows every one: time again and keep the best, as timeit does, before crying wolf.
        report, champion_report = _time_again(cfg, test, model, report, champion_report, slow, attempt)
    row["latency_attempts"] = attempt + 1
    if attempt:
        write_text_atomic(cfg.out / "metrics.json", json.dumps(report, indent=2, default=str) + "\n")
    final = _final_paths(cfg.out, out)
    for r in (row, champion_row):
        if r is not None:
            r["model"], r["test"] = final(r["model"]), final(r["test"])
    rows = [row] + ([champion_row] if champion_row is not None else [])
    row["status"] = "regression" if regressions else "ok"
    # which figures regressed: the trend plots circle those series only
    row["regressed"] = ",".join(e["name"] for e in table if e.get("regressed"))
    promoted = None
    if cfg.champion is not None and cfg.champion.promote and not regressions:
        from gru4rec.eval.promote import promote_bundle

        promoted = promote_bundle(Path(model), cfg.champion.model)
        promoted["from"] = final(promoted["from"])
        row["status"] = "promoted"
    key = ("as_of", "role") if window is not None else None
    n_comparable = comparable(history, row).height
    inconclusive = [e["name"] for e in table if e.get("verdict") == "inconclusive"]
    summary = {
        "current": row,
        "champion": champion_row,
        "promoted": promoted,
        "regressions": regressions,
        "latency_inconclusive": inconclusive,
        "table": table,
        "window": window.info() if window is not None else None,
        "n_runs": history.height + len(rows),
        "n_comparable": n_comparable,
        "tolerances": cfg.tolerances.describe(),
        "report": str(out / "report.md"),
        "model_settings": model_settings(model, cfg),
    }
    history = upsert_runs(cfg.history, history, rows, key)
    summary["n_runs"] = history.height
    tol = cfg.tolerances
    plots = nightly_trends(
        comparable(history, row, same_day=True), cfg.out, tol.metrics, tol.latency, cfg.tie_mode
    )
    from gru4rec.eval.report import nightly_markdown

    write_text_atomic(cfg.out / "report.md", nightly_markdown(summary, plots))
    write_text_atomic(cfg.out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    _move_into(cfg.out, out)
    summary["plots"] = plots
    summary["tracking_error"] = None
    return summary


@contextlib.contextmanager
def _engine_session(cfg: NightlyConfig):
    """On Ray, one runtime (or one connection to the cluster) for every scoring and timing of the run."""
    if cfg.engine.name != "ray" or cfg.metrics_json is not None:
        yield
        return
    from gru4rec.eval.pipeline import score_engine
    from gru4rec.score.ray_engine import import_ray, ray_runtime

    with ray_runtime(import_ray(), score_engine(cfg.engine)):
        yield


def _final_paths(stage: Path, out: Path):
    """Map a path inside the stage to where it will be once moved into `out`."""

    def final(path):
        text = str(path)
        return str(out / Path(text).relative_to(stage)) if text.startswith(str(stage) + os.sep) else text

    return final


def _move_into(stage: Path, out: Path) -> None:
    """Move every file the run wrote into `out`, each replacing its namesake (other files stay)."""
    for path in sorted(p for p in stage.rglob("*") if p.is_file()):
        target = out / path.relative_to(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def _cut(cfg: NightlyConfig, as_of: str | None):
    """The window's test file (written into `out`), training events and Window."""
    from rich.console import Console

    from gru4rec.eval.window import cut_window
    from gru4rec.io import write_parquet_atomic

    window = cut_window(cfg.window, as_of)
    info = window.info()
    console = Console(stderr=True)
    if window.as_of_reason.startswith("latest"):
        console.print(f"nightly: as_of {window.as_of_reason}", markup=False, highlight=False)
    if window.empty_test_days:
        console.print(f"warning: test day(s) {', '.join(window.empty_test_days)} hold no events in "
                      f"{cfg.window.events} (as_of beyond the log?)", markup=False, highlight=False)  # fmt: skip
    console.print(
        f"nightly: window as of {info['as_of']}: train {info['window_start']} .. {info['window_boundary']} "
        f"({info['n_train_events']:,} events), test to {info['window_end']} ({info['n_window_test_events']:,} "
        f"events; {info['n_test_dropped_unseen']:,} dropped: items unseen in training); {window.n_files} file(s) read",
        markup=False, highlight=False,
    )  # fmt: skip
    test = cfg.out / "window" / "test.parquet"
    write_parquet_atomic(window.test, test)
    write_parquet_atomic(window.train, cfg.out / "window" / "train.parquet")
    return test, window.train, window


def _time_again(cfg: NightlyConfig, test: Path, model: str, report: dict, champion_report: dict | None,
                slow: list[str], attempt: int) -> tuple[dict, dict | None]:  # fmt: skip
    """Score again (after a pause) and keep each latency figure's best measurement so far."""
    from rich.console import Console

    n = cfg.tolerances.latency_confirm
    Console(stderr=True).print(
        f"nightly: {', '.join(slow)} past the tolerance; timing again to confirm ({attempt + 1}/{n})",
        markup=False, highlight=False,
    )  # fmt: skip
    time.sleep(CONFIRM_PAUSE_S)
    report = best_latency(report, _score(cfg, Path(model), test, engine=cfg.engine))
    return report, champion_report


def _score_champion(cfg: NightlyConfig, test: Path | None) -> dict | None:
    """The champion's metrics JSON on the same test sessions (None: no champion, or none installed yet)."""
    if cfg.champion is None or not cfg.champion.model.is_file():
        return None  # no champion yet: a passing challenger is installed as the first one
    from rich.console import Console

    champ = cfg.champion.model
    Console(stderr=True).print(
        f"nightly: scoring the champion {champ} on {test}", markup=False, highlight=False
    )
    return _score(cfg, champ, test, engine=cfg.engine)


def _score(cfg: NightlyConfig, model: Path, test: Path, engine=None) -> dict:
    """The score stage's metrics-JSON dict of `model` on `test` with the configured cut-offs and batch."""
    from gru4rec.eval.pipeline import score_onnx

    report, _ = score_onnx(model, test, cfg.cutoffs, cfg.tie_mode, cfg.batch_size, engine=engine)
    report["model"] = str(model)
    return report


def _paired_latency(cfg: NightlyConfig, test: Path, model: str, champion_report: dict | None) -> list | None:
    """Champion and challenger timed side by side (eval.latency_gate); a Verdict per latency figure."""
    tol = cfg.tolerances
    if champion_report is None or not tol.latency or not str(model).endswith(".onnx"):
        return None
    from rich.console import Console

    from gru4rec.eval.latency_gate import paired_verdict, time_models
    from gru4rec.eval.pipeline import score_engine

    Console(stderr=True).print(
        f"nightly: timing champion and challenger in {tol.latency_pairs} interleaved pairs",
        markup=False, highlight=False,
    )  # fmt: skip
    champ, chall = time_models([cfg.champion.model, Path(model)], test, cfg.batch_size, tol.latency_pairs,
                               tol.latency_sample_events, score_engine(cfg.engine))  # fmt: skip
    check_latency_steps({"latency": champ[0]}, tol, f"{cfg.source}: the latency sample of {test}")
    return [paired_verdict(f, [r[f] for r in champ], [r[f] for r in chall], tol) for f in tol.latency]


def _inputs(cfg: NightlyConfig) -> tuple[Path, ...]:
    paths = (cfg.test, cfg.model, cfg.metrics_json, cfg.train.train if cfg.train else None)
    return tuple(p for p in paths if p is not None)


def _check_catalog(cfg: NightlyConfig, model: Path) -> None:
    """Every cut-off must fit in the model's catalog; the scorer's own message would name CLI flags."""
    from gru4rec.bundle import read_metadata

    n_items = read_metadata(model)["n_items"]
    too_large = [k for k in cfg.cutoffs if k > n_items]
    if too_large:
        raise UserError(
            f"{cfg.source}: cut-off(s) {too_large} of [nightly] cutoffs or [nightly.tolerances] metrics exceed "
            f"the {n_items} items of {model}"
        )


def _measure(cfg: NightlyConfig, test: Path | None, train_events: pl.DataFrame | None) -> tuple[dict, str]:
    """(the score stage's metrics-JSON dict, model path): from a given JSON or by scoring now."""
    from rich.console import Console

    console = Console(stderr=True)
    if cfg.metrics_json is not None:
        return read_metrics_json(cfg.metrics_json), str(cfg.model or cfg.metrics_json)
    from gru4rec.eval.pipeline import export_onnx, train_gru4rec

    model = cfg.model
    if cfg.train is not None:
        from gru4rec.data import read_events

        t = cfg.train
        source = t.train if t.train is not None else "the window's training days"
        console.print(f"nightly: training on {source} (preset {t.preset})", markup=False, highlight=False)
        events = train_events if train_events is not None else read_events(t.train)
        model = train_gru4rec(events, t.preset, t.params, cfg.out / "model.pt", t.device, t.seed)
    if model is not None and model.suffix == ".pt":
        console.print(f"nightly: exporting {model}", markup=False, highlight=False)
        model = export_onnx(model, cfg.out / "model.onnx", top_k=cfg.train.top_k if cfg.train else 20)
        _check_catalog(cfg, model)
    console.print(f"nightly: scoring {test} with {model}", markup=False, highlight=False)
    report = _score(cfg, model, test, engine=cfg.engine)
    write_text_atomic(cfg.out / "metrics.json", json.dumps(report, indent=2, default=str) + "\n")
    return report, str(model)


def model_settings(model: str, cfg: NightlyConfig) -> dict[str, Any]:
    """The settings the report lists for the scored model: preset and key training parameters."""
    from gru4rec.eval.report import KEY_PARAMS

    settings: dict[str, Any] = {}
    params: dict[str, Any] = {}
    if cfg.train is not None:
        from gru4rec.train.params import resolve

        settings["preset"] = cfg.train.preset or "(defaults)"
        params = resolve(preset=cfg.train.preset, overrides=cfg.train.params).to_dict()
    elif model.endswith(".onnx") and Path(model).is_file():
        from gru4rec.bundle import read_metadata

        meta = read_metadata(model)
        params = meta.get("hyperparameters") or {}
        settings.update(export_id=meta.get("export_id"), n_items=meta.get("n_items"), top_k=meta.get("top_k"))
    settings.update({k: params[k] for k in KEY_PARAMS if k in params})
    return settings
