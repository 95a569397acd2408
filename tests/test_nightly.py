"""Nightly evaluation: regression detection on a fabricated history, clean runs, reports, bad history.

The runs take their figures from fabricated score-stage metrics JSON files (`metrics_json`), so
these tests need no model; tests/test_benchmark.py runs the full train -> export -> score path.
"""

from __future__ import annotations

import json

import polars as pl
import pytest
from conftest import nightly_config, synthetic_files

from gru4rec.errors import UserError
from gru4rec.eval.nightly import Tolerances, compare, load_config, run

PNG = b"\x89PNG\r\n\x1a\n"


def metrics_json(path, recall=0.50, mrr=0.20, p50=2.0, p95=3.0):
    path.write_text(json.dumps({
        "metrics": {"recall@20": recall, "mrr@20": mrr, "recall@5": recall / 2, "mrr@5": mrr / 2, "n": 1000},
        "tie_mode": "standard", "cutoffs": [5, 20], "n_events": 1300, "n_sessions": 300,
        "n_unknown_dropped": 0,
        "latency": {"step_ms_p50": p50, "step_ms_p95": p95, "step_ms_p99": p95 * 1.5, "events_per_s": 5e4,
                    "sessions_per_s": 1e4, "load_s": 0.1, "replay_s": 0.5, "write_s": 0.0,
                    "provider": "CPUExecutionProvider", "batch_size": 64, "device": "cpu", "mode": "batch",
                    "n_steps": 500, "n_full_steps": 400, "ms_per_1k_events": 5.0},
        "model": "m.onnx",
    }))  # fmt: skip
    return path


def config(tmp_path, extra: str = "") -> str:
    body = f"""metrics_json = "{tmp_path / "metrics.json"}"
tie_mode = "standard"
[nightly.tolerances]
metrics = ["recall@20", "mrr@20"]
latency = ["step_ms_p50", "step_ms_p95"]
metric_drop_abs = 0.01
metric_drop_rel = 0.0
latency_rise_abs_ms = 0.5
latency_rise_rel = 0.10
{extra}
"""
    return str(nightly_config(tmp_path, body, history="history.parquet", name="nightly.toml"))


def fabricate_history(tmp_path, recalls=(0.49, 0.52, 0.50), p50s=(2.0, 2.1, 1.9)):
    rows = [
        {"run_id": f"2026010{i + 1}T020000Z", "time": f"2026-01-0{i + 1}T02:00:00+00:00", "status": "ok",
         "model": "m.onnx", "test": "", "test_fingerprint": "", "tie_mode": "standard",
         "model_export_id": "earlier", "recall@20": r, "mrr@20": 0.20, "step_ms_p50": p, "step_ms_p95": 3.0}
        for i, (r, p) in enumerate(zip(recalls, p50s, strict=True))
    ]  # fmt: skip
    pl.DataFrame(rows).write_parquet(tmp_path / "history.parquet")


def test_metric_drop_against_previous_run_exits_1(tmp_path, cli):
    fabricate_history(tmp_path)
    metrics_json(tmp_path / "metrics.json", recall=0.485)  # 0.015 below the previous 0.50: past 0.01
    proc = cli("eval", "nightly", "--config", config(tmp_path))
    assert proc.returncode == 1, proc.stderr
    assert "recall@20 dropped to 0.4850 from 0.5000 (previous run" in proc.stderr
    assert "mrr@20" not in proc.stderr and "step_ms" not in proc.stderr  # unchanged figures pass
    hist = pl.read_parquet(tmp_path / "history.parquet")
    assert hist.height == 4 and hist["status"].to_list()[-1] == "regression"
    assert hist["recall@20"].to_list()[-1] == pytest.approx(0.485)


def test_drop_against_best_run_only(tmp_path):
    """0.505 is fine against the previous run (0.50) but 0.015 below the best (0.52)."""
    fabricate_history(tmp_path)
    metrics_json(tmp_path / "metrics.json", recall=0.505)
    regressions = run(load_config(config(tmp_path)))["regressions"]
    assert len(regressions) == 1 and regressions[0].startswith(
        "recall@20 dropped to 0.5050 from 0.5200 (best run"
    )
    # The same run with the best-run comparison switched off passes.
    fabricate_history(tmp_path)
    assert run(load_config(config(tmp_path, "compare_best = false")))["regressions"] == []


def test_latency_rise_is_a_regression(tmp_path):
    fabricate_history(tmp_path)  # step_ms_p50 2.0, 2.1, 1.9: median 2.0
    metrics_json(tmp_path / "metrics.json", recall=0.52, p50=2.75)  # allowed: 0.5 + 10% of 2.0 -> 2.70
    regressions = run(load_config(config(tmp_path)))["regressions"]
    # Latency is compared with the recent median only: one message, not one per reference run.
    assert regressions == [
        "step_ms_p50 rose to 2.7500 ms from 2.0000 ms (median of the last 3 runs; +37.5%, allowed 0.7000 ms)"
    ]


def test_latency_rise_of_an_unchanged_model_is_inconclusive(tmp_path):
    """The issue's series: one export timed 5.91, 5.79, then 9.49 ms per 1k events on an idle box.
    Repeats of one model spread 3.7 ms, wider than the 1 + 25% tolerance: the machine, not the
    model, moved; reported as inconclusive, exit 0. A new export 9.49 against a tight history of
    another export is a regression."""
    rows = [
        {"run_id": f"2026010{i + 1}T020000Z", "time": "", "status": "ok", "model": "m.onnx", "test": "",
         "test_fingerprint": "", "tie_mode": "standard", "model_export_id": "same", "recall@20": 0.5,
         "mrr@20": 0.2, "ms_per_1k_events": v}
        for i, v in enumerate((5.91, 5.79))
    ]  # fmt: skip
    pl.DataFrame(rows).write_parquet(tmp_path / "history.parquet")
    report = json.loads(metrics_json(tmp_path / "metrics.json").read_text())
    report["latency"]["ms_per_1k_events"] = 9.49
    report["model_export_id"] = "same"
    (tmp_path / "metrics.json").write_text(json.dumps(report))
    tol = 'latency = ["ms_per_1k_events"]\nlatency_rise_abs_ms = 1.0\nlatency_rise_rel = 0.25\n'
    path = tmp_path / "n.toml"
    path.write_text(
        config(tmp_path)
        and open(config(tmp_path))
        .read()
        .replace('latency = ["step_ms_p50", "step_ms_p95"]\n', "")
        .replace("latency_rise_abs_ms = 0.5\nlatency_rise_rel = 0.10\n", tol)
    )
    summary = run(load_config(path))
    assert summary["regressions"] == [] and summary["latency_inconclusive"] == ["ms_per_1k_events"]
    entry = next(e for e in summary["table"] if e["name"] == "ms_per_1k_events")
    assert entry["verdict"] == "inconclusive" and entry["spread"] == pytest.approx(9.49 - 5.79)
    assert "Latency inconclusive (ms_per_1k_events)" in (tmp_path / "out" / "report.md").read_text()
    # another export, measured against a history of one export whose repeats agree: a regression
    pl.DataFrame(rows).write_parquet(tmp_path / "history.parquet")
    report["model_export_id"] = "new"
    (tmp_path / "metrics.json").write_text(json.dumps(report))
    summary = run(load_config(path))
    assert len(summary["regressions"]) == 1 and "ms_per_1k_events rose to 9.4900" in summary["regressions"][0]


def latency_history(tmp_path, p95s, exports=None):
    exports = exports or ["earlier"] * len(p95s)
    rows = [
        {"run_id": f"202601{i + 1:02d}T020000Z", "time": "", "status": "ok", "model": "m.onnx", "test": "",
         "test_fingerprint": "", "tie_mode": "standard", "model_export_id": e, "recall@20": 0.5,
         "mrr@20": 0.2, "step_ms_p50": 2.0, "step_ms_p95": p}
        for i, (p, e) in enumerate(zip(p95s, exports, strict=True))
    ]  # fmt: skip
    pl.DataFrame(rows).write_parquet(tmp_path / "history.parquet")


@pytest.mark.parametrize("lucky_at", [1, 4])  # a lucky run in the middle, and as the previous run
def test_one_lucky_fast_run_does_not_flag_an_unchanged_model(tmp_path, lucky_at):
    """An unchanged model measured at ~30 ms p95 once got 18 ms: the next ordinary run is no regression."""
    p95s = [30.0, 31.0, 29.0, 30.5, 30.0]
    p95s[lucky_at] = 18.0
    latency_history(tmp_path, p95s)
    metrics_json(tmp_path / "metrics.json", p50=2.0, p95=31.5)
    summary = run(load_config(config(tmp_path)))
    assert summary["regressions"] == []
    entry = next(e for e in summary["table"] if e["name"] == "step_ms_p95")
    # median of the five: the lucky run is the lowest, so the median is the middle of the other four
    assert entry["reference"] == pytest.approx(sorted(p95s)[2])
    assert entry["reference_kind"] == "median of the last 5 runs"
    # (against the best run, 18 ms, the allowed rise would be 2.3 ms and this run would fail)


def test_latency_doubling_against_recent_median_is_a_regression(tmp_path):
    """Only the last `latency_window` runs count: an old slow era does not hide today's slowdown.
    (The slow era is another export; each export's own repeats agree within the tolerance.)"""
    eras = ["slow"] * 3 + ["earlier"] * 5
    latency_history(tmp_path, [100.0, 100.0, 100.0, 30.0, 31.0, 29.0, 29.0, 30.0], eras)
    report = json.loads(metrics_json(tmp_path / "metrics.json", p50=2.0, p95=60.0).read_text())
    (tmp_path / "metrics.json").write_text(json.dumps({**report, "model_export_id": "new"}))
    regressions = run(load_config(config(tmp_path)))["regressions"]
    assert regressions == [
        "step_ms_p95 rose to 60.0000 ms from 30.0000 ms (median of the last 5 runs; +100.0%, allowed 3.5000 ms)"
    ]
    # a window of 8 runs takes the slow era in (median 30.5 -> still a regression, reference differs)
    latency_history(tmp_path, [100.0, 100.0, 100.0, 30.0, 31.0, 29.0, 29.0, 30.0], eras)
    summary = run(load_config(config(tmp_path, "latency_window = 8")))
    assert summary["regressions"][0].startswith(
        "step_ms_p95 rose to 60.0000 ms from 30.5000 ms (median of the last 8"
    )
    # and the run just appended (60 ms) is in the median of the next run
    assert run(load_config(config(tmp_path, "latency_window = 2")))["regressions"][0].startswith(
        "step_ms_p95 rose to 60.0000 ms from 45.0000 ms (median of the last 2 runs"
    )


def test_clean_run_exits_0_and_writes_report_and_plots(tmp_path, cli):
    fabricate_history(tmp_path)
    metrics_json(tmp_path / "metrics.json", recall=0.515, mrr=0.205, p50=2.5)  # within every tolerance
    proc = cli("eval", "nightly", "--config", config(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "ok: no regression against 3 earlier run(s)" in proc.stdout
    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    assert report.startswith("# Nightly evaluation — OK")
    assert "| recall@20 | 0.5150 | 0.5000 | +3.0% | 0.5200 | -1.0% |" in report
    for png in ("trend_metrics.png", "trend_latency.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
        assert f"]({png})" in report
    hist = pl.read_parquet(tmp_path / "history.parquet")
    assert hist["status"].to_list() == ["ok"] * 4


def test_first_run_creates_history(tmp_path):
    metrics_json(tmp_path / "metrics.json")
    assert run(load_config(config(tmp_path)))["regressions"] == []
    hist = pl.read_parquet(tmp_path / "history.parquet")
    assert hist.height == 1 and hist["recall@20"][0] == pytest.approx(0.5)
    assert (tmp_path / "out" / "trend_metrics.png").stat().st_size > 0


def test_corrupt_history_exits_2_and_is_left_untouched(tmp_path, cli):
    content = b"PAR1 this is not parquet at all"
    (tmp_path / "history.parquet").write_bytes(content)
    metrics_json(tmp_path / "metrics.json", recall=0.9)
    proc = cli("eval", "nightly", "--config", config(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "history" in lines[0], proc.stderr
    assert "left untouched" in lines[0] and "Traceback" not in proc.stderr
    assert (tmp_path / "history.parquet").read_bytes() == content
    assert not (tmp_path / "out" / "report.md").exists()


@pytest.mark.parametrize("kind", ["zeros", "truncated", "other-table"])
def test_unreadable_history_is_rejected_untouched(tmp_path, kind):
    path = tmp_path / "history.parquet"
    if kind == "zeros":
        path.write_bytes(b"\x00" * 64)
    else:
        fabricate_history(tmp_path) if kind == "truncated" else pl.DataFrame({"a": [1]}).write_parquet(path)
        if kind == "truncated":
            path.write_bytes(path.read_bytes()[:-40])
    before = path.read_bytes()
    metrics_json(tmp_path / "metrics.json")
    with pytest.raises(UserError, match="history" if kind != "other-table" else "not a nightly history"):
        run(load_config(config(tmp_path)))
    assert path.read_bytes() == before


def test_bad_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[nightly]\nhistory = "h.parquet"\n')
    with pytest.raises(UserError, match="needs 'out'"):
        load_config(bad)
    bad.write_text(f'[nightly]\nhistory = "h"\nout = "{tmp_path}"\nmetrics_json = "m.json"\nbogus = 1\n')
    with pytest.raises(UserError, match="bogus"):
        load_config(bad)
    bad.write_text("[nightly\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)


def test_tolerance_rule():
    """worse by more than abs + rel*|ref| regresses; exactly at the limit does not."""
    tol = Tolerances(metrics=["recall@20"], latency=["step_ms_p50"], metric_drop_abs=0.01, metric_drop_rel=0.5,
                     latency_rise_abs_ms=1.0, latency_rise_rel=0.5, compare_best=False)  # fmt: skip
    # two runs of one earlier export that agree: the latency gate's spread is measured and small
    hist = pl.DataFrame({"recall@20": [0.25, 0.25], "step_ms_p50": [2.0, 2.0], "model_export_id": ["a", "a"]})
    # allowed metric drop 0.01 + 0.125 = 0.135; allowed latency rise 1.0 + 1.0 = 2.0
    ok, table = compare(hist, {"recall@20": 0.25 - 0.125, "step_ms_p50": 3.5, "model_export_id": "b"}, tol)
    assert ok == [] and table[0]["previous_change"] == pytest.approx(-50.0)
    bad, _ = compare(hist, {"recall@20": 0.25 - 0.136, "step_ms_p50": 4.01, "model_export_id": "b"}, tol)
    assert len(bad) == 2 and bad[0].startswith("recall@20 dropped") and bad[1].startswith("step_ms_p50 rose")
    improved, _ = compare(hist, {"recall@20": 0.9, "step_ms_p50": 0.1}, tol)
    assert improved == []


def test_example_config_parses(tmp_path, monkeypatch):
    """The shipped example loads where the files it names exist (paths are relative to the working dir)."""
    from pathlib import Path

    example = Path("eval/configs/nightly.example.toml").resolve()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="test: file not found: demo_out/data/test.parquet"):
        load_config(example)
    (tmp_path / "demo_out" / "data").mkdir(parents=True)
    for name in ("data/test.parquet", "model.onnx"):
        (tmp_path / "demo_out" / name).write_bytes(b"x")  # existence is checked here, content later
    cfg = load_config(example)
    assert cfg.model == Path("demo_out/model.onnx") and cfg.tolerances.compare_best and 20 in cfg.cutoffs
    assert cfg.tolerances.latency_window == 5 and cfg.tie_mode == "standard" and cfg.train is None
    assert not (tmp_path / "nightly").exists()  # loading writes nothing


def test_run_api_returns_summary(tmp_path):
    fabricate_history(tmp_path)
    metrics_json(tmp_path / "metrics.json", recall=0.30)
    summary = run(load_config(config(tmp_path)))
    assert summary["n_runs"] == 4 and summary["n_comparable"] == 3
    assert any(r.startswith("recall@20 dropped to 0.3000") for r in summary["regressions"])


@pytest.mark.slow
def test_full_pipeline_train_export_score_twice(tmp_path):
    """[nightly.train] trains, exports and scores for real; the same seed twice gives no regression."""
    synthetic_files(tmp_path, 300, 50, 5)
    body = f"""test = "{tmp_path / "test.parquet"}"
batch_size = 16
[nightly.train]
train = "{tmp_path / "train.parquet"}"
preset = "demo"
params = {{ n_epochs = 1, layers = [16], n_sample = 8, batch_size = 16 }}
device = "cpu"
[nightly.tolerances]
latency_rise_abs_ms = 1000.0
min_latency_steps = 5
"""
    cfg = nightly_config(tmp_path, body, history="history.parquet")
    first = run(load_config(cfg))
    assert first["regressions"] == [] and (tmp_path / "out" / "model.onnx").is_file()
    scored = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert first["current"]["recall@20"] == scored["metrics"]["recall@20"] > 0
    second = run(load_config(cfg))
    assert second["regressions"] == [] and second["n_comparable"] == 1
    assert second["current"]["recall@20"] == pytest.approx(first["current"]["recall@20"], abs=1e-9)
