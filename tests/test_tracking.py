"""MLflow tracking of nightly runs: a local SQLite tracking store, read back with MlflowClient.

Skipped where the `mlflow` extra is not installed (`make install` installs it), except the test that
a config with [nightly.mlflow] is refused with the install line when MLflow cannot be imported.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from test_replay import make_model, random_events
from test_score import export_model

from gru4rec.bundle import load_bundle
from gru4rec.items import ItemMap

IDS = np.arange(1000, 1040, dtype=np.int64)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("track")
    onnx = export_model(make_model(len(IDS), seed=2), ItemMap(IDS), d, 20)
    random_events(200, len(IDS), seed=3).write_parquet(d / "test.parquet")
    return d, Path(onnx)


def config(tmp_path, d, onnx, mlflow: str, champion: bool = True) -> Path:
    path = tmp_path / "n.toml"
    champ = (
        f'[nightly.champion]\nmodel = "{tmp_path / "prod" / "model.onnx"}"\npromote = true\n'
        if champion
        else ""
    )
    path.write_text(
        f'[nightly]\nhistory = "{tmp_path / "h.parquet"}"\nout = "{tmp_path / "out"}"\ntest = "{d / "test.parquet"}"\n'
        f'model = "{onnx}"\nbatch_size = 8\n[nightly.tolerances]\nmin_latency_steps = 5\n{champ}'
        f"[nightly.mlflow]\n{mlflow}\n"
    )
    return path


def test_nightly_run_is_tracked_and_promoted_model_registered(tmp_path, model, run):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    d, onnx = model
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    path = config(
        tmp_path, d, onnx, f'tracking_uri = "{uri}"\nexperiment = "exp-t"\nregistered_model = "recs"'
    )
    code, out, err = run("eval", "nightly", "--config", path)
    assert code == 0, err
    assert "warning" not in err
    hist = pl.read_parquet(tmp_path / "h.parquet").row(0, named=True)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("exp-t")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    r = runs[0]
    # every metric at every cut-off, as the history holds it
    for k in (1, 5, 10, 20):
        for m in ("recall", "mrr", "ndcg"):
            assert r.data.metrics[f"{m}_at_{k}"] == pytest.approx(hist[f"{m}@{k}"], abs=1e-12)
    assert r.data.metrics["latency_ms_per_1k_events"] == pytest.approx(hist["ms_per_1k_events"])
    assert r.data.params["n_items"] == "40" and r.data.params["tie_mode"] == "standard"
    assert r.data.params["export_id"] == hist["model_export_id"] == load_bundle(onnx).meta["export_id"]
    assert r.data.tags["gru4rec.verdict"] == "promoted" and r.data.tags["gru4rec.kind"] == "nightly"
    assert r.data.tags["gru4rec.test_fingerprint"] == hist["test_fingerprint"]
    # artifacts beside the SQLite file, not in ./mlruns of whatever folder the job ran in
    assert r.info.artifact_uri.startswith((tmp_path / "mlruns-artifacts").as_uri())
    assert not (Path(__file__).resolve().parents[1] / "mlruns").exists()
    names = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"report.md", "summary.json", "model", "trend_metrics.png"} <= names
    bundle = {a.path for a in client.list_artifacts(r.info.run_id, "model")}
    assert bundle == {
        "model/m.onnx",
        "model/m.eval.onnx",
        "model/m.items.parquet",
    }  # the challenger as scored
    version = client.get_model_version_by_alias("recs", "champion")
    assert version.run_id == r.info.run_id
    # a second night: the champion is scored too, and its figures are tracked beside the challenger's
    code, _, err = run("eval", "nightly", "--config", path)
    assert code == 0, err
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    assert len(runs) == 2 and "champion_recall_at_20" in runs[0].data.metrics
    assert client.get_model_version_by_alias("recs", "champion").run_id == runs[0].info.run_id


@pytest.mark.parametrize("required", [False, True])
def test_mlflow_unreachable_warns_or_fails_but_history_is_written(tmp_path, model, run, required):
    pytest.importorskip("mlflow")
    d, onnx = model
    mlflow = 'tracking_uri = "http://127.0.0.1:9"' + ("\nmlflow_required = true" if required else "")
    code, _, err = run("eval", "nightly", "--config", config(tmp_path, d, onnx, mlflow, champion=False))
    lines = [x for x in err.splitlines() if x.startswith(("warning:", "error:"))]
    assert len(lines) == 1 and "MLflow tracking at http://127.0.0.1:9 failed" in lines[0], err
    assert lines[0].startswith("error:" if required else "warning:")
    assert code == (1 if required else 0)
    assert pl.read_parquet(tmp_path / "h.parquet").height == 1 and (tmp_path / "out" / "report.md").is_file()


def test_config_with_mlflow_refused_without_the_extra(tmp_path, model):
    """With MLflow not importable (as where the extra is not installed): exit 2 with the install line."""
    d, onnx = model
    path = config(tmp_path, d, onnx, 'tracking_uri = "sqlite:///x.db"')
    code = (
        "import sys; sys.modules['mlflow'] = None\n"  # what an absent package looks like to `import`
        "from gru4rec.cli import main\n"
        f"main(['eval', 'nightly', '--config', {str(path)!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert (
        "[nightly.mlflow] needs MLflow, which is not installed: pip install 'gru4rec[mlflow]'" in proc.stderr
    )
    assert not (tmp_path / "h.parquet").exists()


def test_benchmark_results_are_tracked_with_the_same_keys(tmp_path, model):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from gru4rec.eval.benchmark import load_config
    from gru4rec.eval.benchmark import run as bench_run

    d, _ = model
    random_events(300, len(IDS), seed=5).write_parquet(d / "train.parquet")
    uri = f"sqlite:///{tmp_path / 'b.db'}"
    path = tmp_path / "b.toml"
    path.write_text(
        f'[benchmark]\nmax_k = 20\n[benchmark.mlflow]\ntracking_uri = "{uri}"\n'
        f'[[dataset]]\nname = "tiny"\ntrain = "{d / "train.parquet"}"\ntest = "{d / "test.parquet"}"\n'
        '[[model]]\nkind = "pop"\n'
    )
    results = bench_run(load_config(path), tmp_path / "b", progress=False)
    assert results["tracking_error"] is None
    client = MlflowClient(tracking_uri=uri)
    (r,) = client.search_runs([client.get_experiment_by_name("gru4rec-benchmark").experiment_id])
    m = results["results"][0]["metrics"]["standard"]
    for k in (1, 10, 20):
        assert r.data.metrics[f"recall_at_{k}"] == pytest.approx(m[f"recall@{k}"], abs=1e-12)
        assert r.data.metrics[f"ndcg_at_{k}"] == pytest.approx(m[f"ndcg@{k}"], abs=1e-12)
    assert r.data.tags["gru4rec.kind"] == "benchmark" and r.data.params["top_n"] == "100"
    assert "report.md" in {a.path for a in client.list_artifacts(r.info.run_id)}
