"""The nightly's latency verdicts (eval/latency_gate.py).

The rule is checked on fixed numbers (no clock involved); the timing itself on real ONNX models: a
challenger that really does far more work (a 512-unit GRU against a 16-unit one over the same
items) is a regression in every run, and a model timed against itself never is.
"""

from __future__ import annotations

import pytest
from test_replay import make_model
from test_score import export_model

from gru4rec.eval.latency_gate import paired_verdict, relative_spread, spread_across_runs
from gru4rec.eval.nightly import Tolerances

TOL = Tolerances(latency=["ms_per_1k_events"], latency_rise_abs_ms=1.0, latency_rise_rel=0.25)


def test_relative_spread_leaves_out_the_slowest_repeat():
    assert relative_spread([10.0, 10.0, 10.0, 50.0]) == 0.0  # one stall
    assert relative_spread([10.0, 12.0, 11.0]) == pytest.approx((11 - 10) / 11)
    assert relative_spread([10.0, 12.0]) == pytest.approx(2 / 11)


@pytest.mark.parametrize(
    "champion, challenger, verdict",
    [
        ([10.0] * 7, [10.2, 9.9, 10.1, 10.0, 10.3, 9.8, 10.0], "ok"),  # the same model
        ([10.0] * 7, [20.0] * 7, "regression"),  # slower by 10 ms > 1 + 2.5 in every pair
        ([10.0] * 7, [13.6] * 5 + [13.4] * 2, "ok"),  # past 3.5 in 5 of 7 pairs: not three quarters (6)
        ([10.0] * 7, [13.6] * 6 + [13.4], "regression"),
        ([10.0, 14.0, 10.0, 14.0, 10.0, 14.0, 10.0], [30.0] * 7, "inconclusive"),  # repeats spread 4 > 3.5
        ([10.0] * 7, [20.0, 30.0, 20.0, 30.0, 20.0, 30.0, 20.0], "inconclusive"),  # the challenger's too
    ],
)
def test_paired_verdict(champion, challenger, verdict):
    v = paired_verdict("ms_per_1k_events", champion, challenger, TOL)
    assert v.verdict == verdict
    assert v.allowed == pytest.approx(1.0 + 0.25 * 10.0) and v.pairs == 7


def test_spread_across_runs_needs_one_export_run_twice():
    import polars as pl

    hist = pl.DataFrame({"model_export_id": ["a", "b"], "ms_per_1k_events": [5.0, 7.0]})
    assert spread_across_runs(hist, "ms_per_1k_events", "c", 6.0) is None  # nothing repeated
    assert spread_across_runs(hist, "ms_per_1k_events", "a", 9.0) == pytest.approx(4.0)  # this run counts
    assert spread_across_runs(hist.clear(), "ms_per_1k_events", "a", 9.0) is None


@pytest.fixture(scope="module")
def slow_and_fast(tmp_path_factory):
    import numpy as np
    import polars as pl

    from gru4rec.items import ItemMap
    from gru4rec.synth import generate

    d = tmp_path_factory.mktemp("gate")
    _, test = generate(n_sessions=400, n_items=80, seed=5)
    test.write_parquet(d / "test.parquet")
    items = ItemMap(np.sort(pl.read_parquet(d / "test.parquet")["item_id"].unique().to_numpy()))
    fast, slow = d / "fast", d / "slow"
    fast.mkdir(), slow.mkdir()
    export_model(make_model(len(items), hidden=16, seed=1), items, fast, 20)
    export_model(make_model(len(items), hidden=512, seed=2), items, slow, 20)
    return d


def nightly_config(tmp_path, d, challenger, champion, extra="") -> str:
    path = tmp_path / "n.toml"
    path.write_text(
        f'[nightly]\nhistory = "{tmp_path / "h.parquet"}"\nout = "{tmp_path / "out"}"\n'
        f'test = "{d / "test.parquet"}"\nmodel = "{challenger}"\nbatch_size = 8\n'
        f'[nightly.champion]\nmodel = "{champion}"\npromote = true\n'
        f"[nightly.tolerances]\nmin_latency_steps = 5\nlatency_pairs = 5\n{extra}"
    )
    return str(path)


def test_a_really_slower_challenger_is_a_regression_and_the_champion_stays(tmp_path, slow_and_fast, run):
    """32x the GRU width: the allowance is generous (1 ms + 100%) and the verdict still clear."""
    d = slow_and_fast
    champion = tmp_path / "prod" / "m.onnx"
    champion.parent.mkdir()
    from gru4rec.eval.promote import promote_bundle

    promote_bundle(d / "fast" / "m.onnx", champion)
    before = champion.read_bytes()
    path = nightly_config(
        tmp_path, d, d / "slow" / "m.onnx", champion, "latency_rise_rel = 1.0\nmetric_drop_abs = 1.0\n"
    )
    code, _, err = run("eval", "nightly", "--config", path)
    assert code == 1, err
    assert "challenger ms_per_1k_events" in err and "in 5 of 5 interleaved pairs" in err, err
    assert champion.read_bytes() == before
    report = (tmp_path / "out" / "report.md").read_text()
    assert "regression (slower in 5/5 pairs" in report


def test_a_model_against_itself_is_never_a_regression(tmp_path, slow_and_fast, run):
    d = slow_and_fast
    champion = tmp_path / "prod" / "m.onnx"
    champion.parent.mkdir()
    from gru4rec.eval.promote import promote_bundle

    promote_bundle(d / "fast" / "m.onnx", champion)
    path = nightly_config(tmp_path, d, d / "fast" / "m.onnx", champion)
    for _ in range(3):
        code, _, err = run("eval", "nightly", "--config", path)
        assert code == 0, err
        assert "slower than the champion" not in err
