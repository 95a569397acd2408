"""MLflow tracking (optional extra `gru4rec[mlflow]`): one MLflow run per nightly run or benchmark result.

    [nightly.mlflow]                      # or [benchmark.mlflow]
    tracking_uri = "sqlite:///mlruns.db"  # any URI MLflow takes: a file store, a database, a tracking server
    experiment = "gru4rec-nightly"
    registered_model = "gru4rec"          # model registry name of promoted models (alias "champion")
    mlflow_required = false               # true: a tracking failure makes the run exit 1

Keys are the same wherever a run is logged from, so runs of `eval nightly` and `eval benchmark`
compare in one MLflow view:
  params   the model's settings (training parameters, preset) and the run's (tie mode, window ...);
  metrics  `recall_at_K`, `mrr_at_K`, `ndcg_at_K`, `coverage_at_K`, `popularity_at_K` (MLflow
           names cannot hold "@"), latency figures as `latency_<name>`, data sizes;
  tags     `gru4rec.verdict` (pass / regression / promoted), `gru4rec.kind` (nightly / benchmark),
           the window's dates, test fingerprint and export id.
A tracking failure never loses the run's own outputs (history, report): it is one `warning:` line,
and an error only with `mlflow_required = true`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INSTALL = "pip install 'gru4rec[mlflow]' (or `make install`, which installs it)"
KEYS = ("tracking_uri", "experiment", "registered_model", "mlflow_required")
CHAMPION_ALIAS = "champion"


@dataclass
class MlflowSpec:
    tracking_uri: str
    experiment: str = "gru4rec-nightly"
    registered_model: str = "gru4rec"
    required: bool = False


def spec_from_table(t, default_experiment: str) -> MlflowSpec:
    """Read a [*.mlflow] config table (an eval.config.Table); refuse it when MLflow is not installed."""
    spec = MlflowSpec(
        tracking_uri=t.string("tracking_uri"),
        experiment=t.string("experiment", default_experiment),
        registered_model=t.string("registered_model", "gru4rec"),
        required=t.boolean("mlflow_required", False),
    )
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise t.error(f"needs MLflow, which is not installed: {INSTALL}") from None
    return spec


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store's file (`runs.db` ->
    `runs-artifacts/`), not MLflow's default `./mlruns` in whatever folder the job ran from; other
    stores (servers, databases) decide themselves (None)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    db = Path(tracking_uri[len(prefix) :]).absolute()
    return (db.parent / f"{db.stem}-artifacts").as_uri()


def metric_key(name: str) -> str:
    """A figure's MLflow metric name: recall@20 -> recall_at_20."""
    return name.replace("@", "_at_")


@dataclass
class TrackedRun:
    """What one MLflow run records."""

    name: str
    params: dict[str, Any]
    metrics: dict[str, float]
    tags: dict[str, str]
    artifacts: list[Path]  # files logged at the artifact root
    model_files: list[Path] | None = None  # an ONNX bundle, logged under model/
    register: bool = False  # register model/ under spec.registered_model with the alias champion


def log_runs(spec: MlflowSpec, runs: list[TrackedRun]) -> tuple[list[str], str | None]:
    """Log `runs`; (their MLflow run ids, None) or ([], one-line reason) when tracking failed."""
    # A tracking server that is down must cost seconds, not MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=spec.tracking_uri, registry_uri=spec.tracking_uri)
        experiment = client.get_experiment_by_name(spec.experiment)
        exp_id = (experiment.experiment_id if experiment
                  else client.create_experiment(spec.experiment, artifact_location=artifact_location(spec.tracking_uri)))  # fmt: skip
        return [_log_one(client, exp_id, spec, r) for r in runs], None
    except Exception as e:  # MLflow raises many types (connection, REST, SQL): all mean "not tracked"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return [], f"MLflow tracking at {spec.tracking_uri} failed ({type(e).__name__}: {first})"


def _log_one(client, exp_id: str, spec: MlflowSpec, r: TrackedRun) -> str:
    from mlflow.entities import Metric, Param, RunTag

    run = client.create_run(exp_id, run_name=r.name)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    params = [Param(k, _param(v)) for k, v in r.params.items() if v is not None]
    metrics = [Metric(metric_key(k), float(v), now, 0) for k, v in r.metrics.items() if _finite(v)]
    tags = [RunTag(k, str(v)) for k, v in r.tags.items() if v is not None]
    for lo in range(0, max(len(params), len(metrics), len(tags)), 100):  # MLflow's batch limits
        client.log_batch(run_id, metrics=metrics[lo : lo + 100], params=params[lo : lo + 100],
                         tags=tags[lo : lo + 100])  # fmt: skip
    for path in r.artifacts:
        if path.is_file():
            client.log_artifact(run_id, str(path))
    if r.model_files:
        for path in r.model_files:
            client.log_artifact(run_id, str(path), artifact_path="model")
        if r.register:
            _register(client, spec, run)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _register(client, spec: MlflowSpec, run) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(spec.registered_model)
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    version = client.create_model_version(
        spec.registered_model, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    client.set_registered_model_alias(spec.registered_model, CHAMPION_ALIAS, version.version)


def _param(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------- what the nightly and benchmark log


def track_nightly(cfg, summary: dict, model: Path) -> tuple[list[str], str | None]:
    """One MLflow run for a nightly run (`cfg`: its NightlyConfig): (run ids, the tracking error or None)."""
    row = summary["current"]
    verdict = "regression" if summary["regressions"] else "promoted" if summary["promoted"] else "pass"
    params = {**summary["model_settings"], "tie_mode": cfg.tie_mode, "cutoffs": list(cfg.cutoffs),
              "batch_size": cfg.batch_size, "test": row.get("test")}  # fmt: skip
    if cfg.train is not None:
        from gru4rec.train.params import resolve

        params.update(resolve(preset=cfg.train.preset, overrides=cfg.train.params).to_dict())
        params.update(seed=cfg.train.seed, device=cfg.train.device)
    window = summary.get("window") or {}
    params.update({k: v for k, v in window.items() if k in ("train_days", "test_days")})
    metrics = _nightly_figures(row)
    if summary.get("champion"):
        metrics.update({f"champion_{k}": v for k, v in _nightly_figures(summary["champion"]).items()})
    tags = {"gru4rec.kind": "nightly", "gru4rec.verdict": verdict, "gru4rec.role": row.get("role") or "model",
            "gru4rec.test_fingerprint": row.get("test_fingerprint"), "gru4rec.model": str(model),
            "gru4rec.regressions": "; ".join(summary["regressions"])[:5000] or None}  # fmt: skip
    tags.update({f"gru4rec.{k}": v for k, v in window.items() if k.startswith("window") or k == "as_of"})
    artifacts = [cfg.out / "report.md", cfg.out / "summary.json", cfg.out / "metrics.json"]
    artifacts += [cfg.out / p for p in summary["plots"].values()]
    bundle = None
    if model.suffix == ".onnx" and model.is_file():
        from gru4rec.eval.promote import bundle_files

        bundle = bundle_files(model)
    name = f"nightly {window['as_of']}" if window else f"nightly {row['run_id']}"
    run = TrackedRun(name, params, metrics, tags, artifacts, bundle, register=bool(summary["promoted"]))
    return log_runs(cfg.mlflow, [run])


def _nightly_figures(row: dict) -> dict[str, float]:
    """A history row's numbers as tracked metrics: every metric at every cut-off, latency, sizes."""
    from gru4rec.eval.nightly.config import LATENCY_FIGURES

    skip = {"run_id", "time", "status", "role", "model", "test", "test_fingerprint", "tie_mode", "regressed"}
    out = {}
    for k, v in row.items():
        if k in skip or isinstance(v, (bool, str)) or not isinstance(v, (int, float)):
            continue
        out[
            f"latency_{k}"
            if k in LATENCY_FIGURES or k.startswith(("n_steps", "n_full", "events_per", "sessions_per"))
            else k
        ] = v
    return out


def track_benchmark(spec: MlflowSpec, results: dict, out: Path) -> str | None:
    """One MLflow run per (dataset, model), with the nightly's keys (see the module doc); the tracking error or None."""
    mode = results["headline_mode"]
    runs = []
    for r in results["results"]:
        metrics = {k: v for k, v in r["metrics"][mode].items() if k != "n"}
        metrics.update(
            n_predictions=r["metrics"][mode].get("n"), fit_s=r.get("fit_s"), eval_s=r.get("eval_s")
        )
        for key, value in (r.get("latency") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"latency_{key}"] = value
        params = {**r.get("settings", {}), "dataset": r["dataset"], "tie_mode": mode, "kind": r["kind"]}
        tags = {"gru4rec.kind": "benchmark", "gru4rec.dataset": r["dataset"], "gru4rec.model": r["model"]}
        artifacts = [out / "report.md", out / "results.json"] + [out / p for p in r.get("plots", {}).values()]
        runs.append(TrackedRun(f"benchmark {r['dataset']} {r['model']}", params, metrics, tags, artifacts))
    return log_runs(spec, runs)[1]
