"""Nightly gates that must not cry wolf, on a real (tiny) model scored for real by the ONNX scorer.

- an unchanged model scored 10 times gives 0 regressions with the default latency gate;
- a latency past its tolerance is timed again before it is called a regression, and a real
  slowdown (here: a history of a planted much faster model) stays one after every re-measurement;
- a latency gate resting on too few replay steps is refused (exit 2), not trusted;
- a metrics JSON of other test data or of another export is refused (exit 2);
- a model scored on data it does not know fails with its reason (max_unknown_share);
- the history marks which figure regressed, and the trend plot circles only that series;
- the reports list each model's settings.
"""

from __future__ import annotations

import json

import polars as pl
import pytest

from gru4rec.eval.nightly import best_latency, load_config, regression_flags
from gru4rec.eval.nightly import run as nightly_run


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A 1-epoch GRU4Rec on small synthetic data, exported: (folder, onnx path)."""
    from gru4rec.eval.benchmark import export_onnx, train_gru4rec
    from gru4rec.synth import generate

    d = tmp_path_factory.mktemp("model")
    train, test = generate(n_sessions=800, n_items=60, seed=11)
    train.write_parquet(d / "train.parquet")
    test.write_parquet(d / "test.parquet")
    params = {"n_epochs": 1, "layers": [16], "n_sample": 8, "batch_size": 16}
    train_gru4rec(train, "demo", params, d / "model.pt", "cpu", 1)
    return d, export_onnx(d / "model.pt", d / "model.onnx")


def config(tmp_path, d, model, extra_top: str = "", tol: str = "", train: str = "") -> str:
    path = tmp_path / "nightly.toml"
    path.write_text(
        f'[nightly]\nhistory = "{tmp_path / "h.parquet"}"\nout = "{tmp_path / "out"}"\n'
        f'test = "{d / "test.parquet"}"\nmodel = "{model}"\nbatch_size = 4\n{extra_top}\n'
        f"[nightly.tolerances]\n{tol}\n{train}"
    )
    return str(path)


def test_unchanged_model_ten_runs_no_regression(tmp_path, bundle):
    """The default gate (ms_per_1k_events, median of the last 5 runs) over 10 runs of one model."""
    d, onnx = bundle
    cfg = load_config(config(tmp_path, d, onnx))
    assert cfg.tolerances.latency == ["ms_per_1k_events"]
    seen = []
    for _ in range(10):
        summary = nightly_run(cfg)
        assert summary["regressions"] == [], summary["regressions"]
        seen.append(summary["current"]["ms_per_1k_events"])
    hist = pl.read_parquet(tmp_path / "h.parquet")
    assert hist.height == 10 and hist["status"].to_list() == ["ok"] * 10
    assert hist["recall@20"].n_unique() == 1  # same model, same data: the same metrics
    assert min(hist["n_steps"]) >= cfg.tolerances.min_latency_steps
    assert all(v > 0 for v in seen)
    assert set(hist["latency_attempts"].to_list()) <= {1, 2, 3}


def plant_faster_export(tmp_path) -> None:
    """The history as if an earlier export, timed twice alike, had been 1000x faster."""
    first = pl.read_parquet(tmp_path / "h.parquet")
    fast = first.with_columns(
        pl.col("ms_per_1k_events") / 1000, pl.lit("earlier-export").alias("model_export_id")
    )
    pl.concat([fast, fast]).write_parquet(tmp_path / "h.parquet")


def test_real_slowdown_is_confirmed_by_timing_again(tmp_path, bundle, run):
    """Against a history of another export 1000x faster, every re-measurement is slow too: exit 1 after 1 + 2 timings,
    the row says 3 attempts, and the figure recorded is the best of the three measurements."""
    d, onnx = bundle
    path = config(tmp_path, d, onnx)
    cfg = load_config(path)
    first = nightly_run(cfg)["current"]
    assert first["latency_attempts"] == 1
    plant_faster_export(tmp_path)
    code, _, err = run("eval", "nightly", "--config", path)
    assert code == 1, err
    assert err.count("timing again to confirm") == 2 and "(2/2)" in err
    assert "ms_per_1k_events rose to" in err and "Traceback" not in err
    hist = pl.read_parquet(tmp_path / "h.parquet")
    assert hist["latency_attempts"].to_list() == [1, 1, 3]
    assert hist["status"].to_list()[-1] == "regression"
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["latency"]["ms_per_1k_events"] == pytest.approx(hist["ms_per_1k_events"][-1])


def test_latency_confirm_zero_flags_at_once(tmp_path, bundle, run):
    d, onnx = bundle
    path = config(tmp_path, d, onnx, tol="latency_confirm = 0")
    nightly_run(load_config(path))
    plant_faster_export(tmp_path)
    code, _, err = run("eval", "nightly", "--config", path)
    assert code == 1 and "timing again" not in err, err
    assert pl.read_parquet(tmp_path / "h.parquet")["latency_attempts"].to_list() == [1, 1, 1]


def test_same_export_much_faster_in_history_is_inconclusive_not_a_regression(tmp_path, bundle, run):
    """The same export cannot have slowed down: history of it 1000x faster means the repeats of one
    model spread far wider than the tolerance; exit 0, 'inconclusive' in the report."""
    d, onnx = bundle
    path = config(tmp_path, d, onnx)
    nightly_run(load_config(path))
    fast = pl.read_parquet(tmp_path / "h.parquet").with_columns(pl.col("ms_per_1k_events") / 1000)
    fast.write_parquet(tmp_path / "h.parquet")
    code, _, err = run("eval", "nightly", "--config", path)
    assert code == 0 and "timing again" not in err, err
    assert "Latency inconclusive (ms_per_1k_events)" in (tmp_path / "out" / "report.md").read_text()


def test_best_latency_keeps_each_figures_minimum():
    a = {"metrics": {"recall@20": 0.5}, "latency": {"ms_per_1k_events": 30.0, "full_step_ms_p50": 1.0,
                                                   "step_ms_p95": float("nan"), "n_steps": 40}}  # fmt: skip
    b = {"metrics": {"recall@20": 0.5}, "latency": {"ms_per_1k_events": 20.0, "full_step_ms_p50": 2.0,
                                                   "step_ms_p95": 3.0, "n_steps": 40}}  # fmt: skip
    best = best_latency(a, b)
    assert best["latency"] == {"ms_per_1k_events": 20.0, "full_step_ms_p50": 1.0, "step_ms_p95": 3.0,
                               "n_steps": 40}  # fmt: skip
    assert best["metrics"] == a["metrics"] and a["latency"]["ms_per_1k_events"] == 30.0  # input untouched


def test_latency_gate_on_too_few_steps_is_refused(tmp_path, bundle, run):
    """p95 over a handful of steps is noise: refused with the reason, history untouched."""
    d, onnx = bundle
    path = config(tmp_path, d, onnx, tol='latency = ["step_ms_p95"]\nmin_latency_steps = 100000')
    code, _, err = run("eval", "nightly", "--config", path)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the latency gate on step_ms_p95 needs at least" in errors[0]
    assert "Traceback" not in err
    assert not (tmp_path / "h.parquet").exists()
    # the same refusal comes before a training run, not after it
    train = f'[nightly.train]\ntrain = "{d / "train.parquet"}"\npreset = "demo"\ndevice = "cpu"\n'
    path = config(
        tmp_path, d, onnx, train=train, tol='latency = ["full_step_ms_p50"]\nmin_latency_steps = 1000'
    )
    code, _, err = run("eval", "nightly", "--config", path)
    assert code == 2 and "(before any training)" in err and "full_step_ms_p50" in err, err
    assert not (tmp_path / "out" / "model.pt").exists()


def test_planned_steps_equal_the_scorers_steps(bundle):
    from gru4rec.eval.nightly import planned_steps
    from gru4rec.score.scorer import ScoreConfig, score

    d, onnx = bundle
    for batch in (4, 7, 64):
        lat = score(onnx, d / "test.parquet", config=ScoreConfig(batch_size=batch))["latency"]
        assert planned_steps(d / "test.parquet", batch) == {
            "n_steps": lat["n_steps"],
            "n_full_steps": lat["n_full_steps"],
        }


def score_metrics(onnx, sessions, out):
    from gru4rec.score.scorer import ScoreConfig, score

    return score(onnx, sessions, metrics=out, config=ScoreConfig(batch_size=4))


def test_metrics_json_records_fingerprint_and_export_and_nightly_refuses_mismatch(tmp_path, bundle, run):
    from gru4rec.bundle import read_metadata
    from gru4rec.score.scorer import sessions_fingerprint

    d, onnx = bundle
    report = score_metrics(onnx, d / "test.parquet", tmp_path / "m.json")
    assert report["model_export_id"] == read_metadata(onnx)["export_id"]
    assert report["test_fingerprint"] == sessions_fingerprint(d / "test.parquet")
    # other test data: the same sessions with one event's item changed
    other = pl.read_parquet(d / "test.parquet")
    other = other.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.col("item_id").shift(-1))
                               .otherwise(pl.col("item_id")).alias("item_id"))  # fmt: skip
    other.write_parquet(tmp_path / "other.parquet")
    assert sessions_fingerprint(tmp_path / "other.parquet") != report["test_fingerprint"]

    def nightly(test, model):
        path = tmp_path / "n.toml"
        path.write_text(f'[nightly]\nhistory = "{tmp_path / "h.parquet"}"\nout = "{tmp_path / "out"}"\n'
                        f'test = "{test}"\nmodel = "{model}"\nmetrics_json = "{tmp_path / "m.json"}"\n')  # fmt: skip
        return run("eval", "nightly", "--config", path)

    code, _, err = nightly(tmp_path / "other.parquet", onnx)
    assert code == 2 and "was scored on other test data" in err, err
    assert not (tmp_path / "h.parquet").exists()
    # another export of the same checkpoint: another export id
    from gru4rec.eval.benchmark import export_onnx

    again = export_onnx(d / "model.pt", tmp_path / "again.onnx")
    code, _, err = nightly(d / "test.parquet", again)
    assert code == 2 and "was scored with export" in err, err
    code, _, err = nightly(d / "test.parquet", onnx)
    assert code == 0, err
    row = pl.read_parquet(tmp_path / "h.parquet").row(0, named=True)
    assert (
        row["test_fingerprint"] == report["test_fingerprint"]
        and row["n_predictions"] == report["n_predictions"]
    )


def test_fingerprint_does_not_depend_on_chunking(tmp_path, bundle):
    from gru4rec.score.scorer import ScoreConfig, score

    d, onnx = bundle
    small = score(onnx, d / "test.parquet", config=ScoreConfig(batch_size=4, chunk_events=37))
    whole = score(onnx, d / "test.parquet", config=ScoreConfig(batch_size=4))
    assert small["test_fingerprint"] == whole["test_fingerprint"]
    assert small["metrics"] == pytest.approx(whole["metrics"])


def test_model_on_unknown_items_fails_with_reason(tmp_path, bundle, run):
    """98% of the events of items the model never saw: exit 1 and why, not zeros with exit 0."""
    d, onnx = bundle
    test = pl.read_parquet(d / "test.parquet")
    # every session but a few (about 2% of the events) gets item ids the model never saw
    sessions = test["session_id"].unique().sort()
    known = sessions.gather(list(range(0, len(sessions), 50)))
    keep = pl.col("session_id").is_in(known.implode())
    test.with_columns(pl.when(keep).then(pl.col("item_id")).otherwise(pl.col("item_id") + 10**9)
                      .alias("item_id")).write_parquet(tmp_path / "foreign.parquet")  # fmt: skip
    n_unknown = test.filter(~keep).height
    path = tmp_path / "n.toml"
    path.write_text(f'[nightly]\nhistory = "{tmp_path / "h.parquet"}"\nout = "{tmp_path / "out"}"\n'
                    f'test = "{d / "test.parquet"}"\nmodel = "{onnx}"\nbatch_size = 4\n')  # fmt: skip
    assert run("eval", "nightly", "--config", path)[0] == 0  # the model's own data passes
    text = path.read_text().replace(str(d / "test.parquet"), str(tmp_path / "foreign.parquet"))
    path.write_text(text + "[nightly.tolerances]\nmin_latency_steps = 1\n")
    code, _, err = run("eval", "nightly", "--config", path)
    assert code == 1, err
    assert n_unknown / test.height > 0.9
    assert f"unknown_share is {n_unknown / test.height:.1%}" in err
    assert "is this the model trained for this data?" in err


def test_only_the_regressed_series_is_flagged(tmp_path):
    """A run where recall@20 dropped flags recall@20 only: mrr@20 and latency are not circled."""
    rows = [
        {"run_id": f"r{i}", "time": "", "status": "ok", "tie_mode": "standard", "test_fingerprint": "",
         "recall@20": 0.5, "mrr@20": 0.2,
         "ms_per_1k_events": 3.0, "n_steps": 100}
        for i in range(3)
    ]  # fmt: skip
    pl.DataFrame(rows).write_parquet(tmp_path / "h.parquet")
    (tmp_path / "m.json").write_text(json.dumps({
        "metrics": {"recall@20": 0.40, "mrr@20": 0.2, "n": 100}, "tie_mode": "standard", "n_events": 130,
        "n_unknown_dropped": 0, "latency": {"ms_per_1k_events": 3.0, "n_steps": 100},
    }))  # fmt: skip
    path = tmp_path / "n.toml"
    path.write_text(f'[nightly]\nhistory = "{tmp_path / "h.parquet"}"\nout = "{tmp_path / "out"}"\n'
                    f'metrics_json = "{tmp_path / "m.json"}"\n')  # fmt: skip
    summary = nightly_run(load_config(path))
    assert len(summary["regressions"]) == 2  # against the previous and the best run, both recall@20
    hist = pl.read_parquet(tmp_path / "h.parquet")
    assert hist["regressed"].to_list() == [None, None, None, "recall@20"]
    flags = regression_flags(hist, ["recall@20", "mrr@20", "ms_per_1k_events"])
    assert flags == {"recall@20": [False, False, False, True], "mrr@20": [False] * 4,
                     "ms_per_1k_events": [False] * 4}  # fmt: skip


def test_nightly_report_lists_model_settings(tmp_path, bundle):
    d, onnx = bundle
    nightly_run(load_config(config(tmp_path, d, onnx)))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Model settings: " in report and "n_epochs=1" in report and "layers=[16]" in report


def test_benchmark_report_lists_settings_and_explains_undertrained_bprmf(tmp_path, bundle):
    from gru4rec.eval.benchmark import BenchmarkConfig, DatasetSpec, ModelSpec
    from gru4rec.eval.benchmark import run as bench_run

    d, onnx = bundle
    cfg = BenchmarkConfig([DatasetSpec("s", d / "train.parquet", d / "test.parquet")],
                          [ModelSpec("gru4rec", "GRU4Rec", onnx=onnx), ModelSpec("pop", "POP"),
                           ModelSpec("bprmf", "BPR-MF", options={"epochs": 2})])  # fmt: skip
    bench_run(cfg, tmp_path / "b", progress=False)
    report = (tmp_path / "b" / "report.md").read_text()
    assert "Settings: top_n=100." in report  # POP with its default filled in
    bpr = next(line for line in report.splitlines() if line.startswith("- **BPR-MF**"))
    assert "epochs=2" in bpr and "fewer than its default 10: it is under-trained" in bpr
    gru = next(line for line in report.splitlines() if line.startswith("- **GRU4Rec**"))
    assert "n_epochs=1" in gru and "layers=[16]" in gru
